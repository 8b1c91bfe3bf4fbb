//! A client's way to a coordinator: the repository's running one, or an in-process one.
//!
//! `buildpool run` and the MCP server both go through here, so "no coordinator running"
//! behaves the same for both: the job still runs, through an in-process coordinator with
//! its embedded local agent (same snapshot, fetch, workspace and env code path), and the
//! caller is told.

use crate::client::{self, Client, ClientError};
use crate::config::CoordinatorConfig;
use crate::repo::Repo;
use crate::server::Coordinator;

/// Where jobs submitted through a [`Route`] run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// The repository's coordinator (`buildpool serve`).
    Coordinator,
    /// An in-process coordinator, because the repository's was unreachable (the reason).
    InProcess(String),
}

/// A connected client plus what it is connected to.
#[derive(Debug)]
pub struct Route {
    pub client: Client,
    pub via: Via,
}

/// Lazily started in-process coordinator, kept for the session's lifetime so repeated jobs
/// reuse its warm local agent.
#[derive(Debug, Default)]
pub struct Fallback {
    running: tokio::sync::Mutex<Option<(Coordinator, Client)>>,
}

impl Fallback {
    /// A client to the repository's coordinator if one answers, else to the in-process one.
    pub async fn route(&self, repo: &Repo, force_local: bool) -> anyhow::Result<Route> {
        let reason = if force_local {
            "requested".to_owned()
        } else {
            match client::connect_to_running(repo).await {
                Ok((client, _)) => {
                    return Ok(Route {
                        client,
                        via: Via::Coordinator,
                    });
                }
                Err(ClientError::NotRunning(_)) => {
                    "no coordinator running for this repository".to_owned()
                }
                Err(error) => error.to_string(),
            }
        };
        let mut running = self.running.lock().await;
        if running.is_none() {
            let token = crate::auth::generate()?;
            let config = CoordinatorConfig::in_process(&repo.worktree)?;
            let coordinator = Coordinator::start(repo.clone(), config, token.clone()).await?;
            let client =
                client::connect(&format!("http://{}", coordinator.control_addr), &token).await?;
            *running = Some((coordinator, client));
        }
        let client = running
            .as_ref()
            .map(|(_, client)| client.clone())
            .ok_or_else(|| anyhow::anyhow!("in-process coordinator missing"))?;
        Ok(Route {
            client,
            via: Via::InProcess(reason),
        })
    }

    /// The in-process coordinator's client, if one is running.
    pub async fn running_client(&self) -> Option<Client> {
        self.running
            .lock()
            .await
            .as_ref()
            .map(|(_, client)| client.clone())
    }

    /// Stops the in-process coordinator, if one was started.
    pub async fn shutdown(&self) {
        if let Some((coordinator, _)) = self.running.lock().await.take() {
            coordinator.shutdown().await;
        }
    }
}
