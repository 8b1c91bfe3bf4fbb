//! `buildpool ui`: the address of the running coordinator's dashboard.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};

use crate::discovery;
use crate::repo::Repo;

/// Prints the dashboard's URL. Beyond loopback the dashboard asks for a client credential,
/// so the URL carries this host's (`?token=`, kept in a cookie after the first visit).
pub async fn ui(dir: &Path) -> anyhow::Result<ExitCode> {
    let repo = Repo::discover(dir).await?;
    let Some(found) = discovery::read(&repo.state_dir()) else {
        bail!(
            "no coordinator is running for this repository: start one with `buildpool serve` \
             (or run a job: the first starts one in the background)"
        );
    };
    let Some(url) = found.http_url else {
        bail!("this coordinator serves no dashboard; restart it with a newer `buildpool serve`");
    };
    if url.starts_with("https://") {
        let token_file = found
            .token_file
            .unwrap_or_else(crate::auth::default_token_file);
        let token = crate::auth::load(&token_file, false)
            .context("the dashboard beyond loopback needs a client credential")?;
        println!("{url}/?token={}", token.value);
    } else {
        println!("{url}/");
    }
    Ok(ExitCode::SUCCESS)
}
