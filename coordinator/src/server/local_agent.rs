//! The coordinator's embedded local agent.
//!
//! It is a real [`build_agent::Agent`] (same executor: git cache, warm workspaces, env
//! selection, process groups) connected to this coordinator's job bus over an in-memory
//! stream instead of TCP. The scheduler gives it work only while no other agent is
//! connected. It fetches snapshots straight from the repository's git dir, and test
//! archives straight from the coordinator's artifact store.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use build_agent::archives::{ArchiveError, ArchiveSource, Fetching};
use build_agent::executor::ExecutorConfig;
use build_agent::{Agent, AgentIdentity, GitLocator, JobSources, connection};
use buildpool_core::{EnvMode, JobId};
use tokio_util::sync::CancellationToken;

use super::artifacts::ArtifactStore;
use super::bus;
use super::scheduler::LOCAL_AGENT_ID;
use super::shared::Shared;

/// Bytes in flight in each direction of the in-memory connection.
const PIPE_CAPACITY: usize = 256 * 1024;

pub(crate) async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let dir = &shared.config.local_worktree_dir;
    build_agent::process::reap_orphans(dir);
    let agent = Agent::new(
        AgentIdentity {
            id: LOCAL_AGENT_ID.to_owned(),
            labels: Vec::new(),
            system: build_agent::agent::local_system(),
            // In-process: the bus does not ask it for a credential.
            token: String::new(),
            key: Vec::new(),
        },
        ExecutorConfig {
            // Repository ids never start with a dot, so the cache cannot clash with them.
            git_cache_dir: dir.join(".git-cache"),
            worktree_dir: dir.clone(),
            slots: shared.config.local_max_jobs as usize,
            env_mode: EnvMode::Auto,
            default_timeout: shared.config.job_default_timeout,
            kill_grace: Duration::from_secs(5),
            sandbox: None,
            sccache: false,
            shared_cache: None,
            disk: None,
        },
    );
    let sources = JobSources {
        git: GitLocator::Fixed(format!("file://{}", shared.repo.common_dir.display())),
        archives: Some(Arc::new(StoreArchives(Arc::clone(&shared.artifacts)))),
    };
    let link = agent.register_link("local");
    while !shutdown.is_cancelled() {
        let (coordinator_end, agent_end) = tokio::io::duplex(PIPE_CAPACITY);
        let server = tokio::spawn(bus::handle_stream(
            Arc::clone(&shared),
            coordinator_end,
            bus::Peer::Local,
            shutdown.clone(),
            None,
        ));
        if let Err(error) =
            connection::serve_stream(&agent, link, agent_end, &sources, shutdown.clone()).await
        {
            tracing::error!("embedded local agent: {error}");
        }
        let _ = server.await;
        if shutdown.is_cancelled() {
            // The coordinator is stopping: its local jobs stop with it.
            agent.stop().await;
        } else {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = shutdown.cancelled() => {}
            }
        }
    }
}

/// Test archives read from this coordinator's own store, checked as an agent across the
/// network checks them.
#[derive(Debug)]
struct StoreArchives(Arc<ArtifactStore>);

impl ArchiveSource for StoreArchives {
    fn fetch<'a>(&'a self, job_id: JobId, dest: &'a Path) -> Fetching<'a> {
        Box::pin(async move {
            let failed = |reason: String| ArchiveError { job_id, reason };
            let archive = self
                .0
                .archive(job_id)
                .await
                .map_err(|e| failed(e.to_string()))?;
            build_agent::archives::receive(archive, dest)
                .await
                .map_err(failed)
        })
    }
}
