//! `buildpool token create|list|revoke`: manages credentials in the store next to the token
//! file. Works on files only, so it needs no running coordinator; running ones pick the
//! changes up at their next check.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::auth::{Credential, CredentialStore, Scope};

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The coordinator's token file; credentials.json lives next to it
    /// [default: $XDG_CONFIG_HOME/buildpool/token].
    #[arg(long, global = true, value_name = "PATH")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    action: TokenAction,
}

#[derive(Debug, Subcommand)]
enum TokenAction {
    /// Create a credential and print its secret; it is shown only this once.
    Create {
        /// agent (job bus, git tunnel) or client (control API).
        #[arg(long)]
        scope: Scope,
    },
    /// List credentials: id, scope, created, last used (to within a minute).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a credential by id, or `legacy` to replace the token file's value.
    Revoke { id: String },
}

/// The argument of `revoke` that means the token file rather than a stored credential.
const LEGACY: &str = "legacy";

pub fn token(args: TokenArgs) -> anyhow::Result<ExitCode> {
    let token_file = args
        .token_file
        .unwrap_or_else(crate::auth::default_token_file);
    let store = CredentialStore::next_to(&token_file);
    match args.action {
        TokenAction::Create { scope } => create(&store, scope),
        TokenAction::List { json } => list(&store, json),
        TokenAction::Revoke { id } if id == LEGACY => {
            crate::auth::regenerate(&token_file)?;
            println!("replaced the legacy token in {}", token_file.display());
            if std::env::var_os(crate::auth::TOKEN_ENV).is_some() {
                eprintln!(
                    "note: {} is set here and overrides the file for this shell's clients",
                    crate::auth::TOKEN_ENV
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        TokenAction::Revoke { id } => {
            let revoked = store.revoke(&id)?;
            println!("revoked {} ({})", revoked.id, revoked.scope);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn create(store: &CredentialStore, scope: Scope) -> anyhow::Result<ExitCode> {
    let first_agent = scope == Scope::Agent
        && !store
            .list()?
            .iter()
            .any(|credential| credential.scope == Scope::Agent);
    let (credential, secret) = store.create(scope)?;
    println!("{secret}");
    match scope {
        Scope::Agent => eprintln!(
            "agent credential {}: put it in the build host's /etc/build-agent/token (mode 0600) or BUILDPOOL_TOKEN; it is not shown again",
            credential.id
        ),
        Scope::Client => eprintln!(
            "client credential {}: give it to the client as BUILDPOOL_TOKEN or in its --token-file; it is not shown again",
            credential.id
        ),
    }
    if first_agent {
        eprintln!(
            "the legacy token no longer admits agents: give every build host an agent credential"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn list(store: &CredentialStore, json: bool) -> anyhow::Result<ExitCode> {
    let credentials = store.list()?;
    if json {
        let rows: Vec<_> = credentials
            .iter()
            .map(|c| {
                serde_json::json!({
                    "id": c.id,
                    "scope": c.scope,
                    "created_unix_ms": c.created_unix_ms,
                    "last_used_unix_ms": c.last_used_unix_ms,
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&rows).context("cannot encode the list")?;
        println!("{text}");
    } else if credentials.is_empty() {
        println!("no credentials (only the legacy token in the token file)");
    } else {
        print!("{}", table(&credentials));
    }
    Ok(ExitCode::SUCCESS)
}

fn table(credentials: &[Credential]) -> String {
    let mut out = format!(
        "{:<8}  {:<6}  {:<19}  LAST USED\n",
        "ID", "SCOPE", "CREATED"
    );
    for c in credentials {
        let last_used = c.last_used_unix_ms.map_or_else(|| "never".to_owned(), utc);
        out.push_str(&format!(
            "{:<8}  {:<6}  {:<19}  {last_used}\n",
            c.id,
            c.scope.as_str(),
            utc(c.created_unix_ms)
        ));
    }
    out
}

/// `YYYY-MM-DD HH:MM:SS` in UTC (the proleptic Gregorian calendar, Howard Hinnant's
/// days-to-civil algorithm), so the list reads the same on every host without a date crate.
fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, time) = (secs / 86_400, secs % 86_400);
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        time / 3600,
        time / 60 % 60,
        time % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(utc(1_709_251_199_999), "2024-02-29 23:59:59");
        assert_eq!(utc(4_102_444_800_000), "2100-01-01 00:00:00");
    }

    #[test]
    fn table_shows_never_for_unused() {
        let credential = Credential {
            id: "0123abcd".into(),
            scope: Scope::Client,
            sha256: String::new(),
            created_unix_ms: 0,
            last_used_unix_ms: None,
        };
        assert_eq!(
            table(&[credential]),
            "ID        SCOPE   CREATED              LAST USED\n\
             0123abcd  client  1970-01-01 00:00:00  never\n"
        );
    }
}
