//! Who may talk to the coordinator: scoped credentials, and the legacy token.
//!
//! A credential has one [`Scope`]: an agent credential lets a build host join the job bus
//! and fetch over the git tunnel; a client credential lets a program submit and cancel jobs,
//! read logs and status and drain agents through the control API. A leaked agent credential
//! therefore cannot run commands of its own choosing on the other agents, and a leaked
//! client credential cannot impersonate an agent and receive other people's jobs. Several
//! credentials per scope may exist at once, so they rotate without downtime: create the new
//! one, roll it out, revoke the old one. They live hashed in a [`CredentialStore`].
//!
//! The legacy token (the token file's value, or `BUILDPOOL_TOKEN`) keeps an existing
//! single-token setup working. It has the agent scope as long as the store holds no agent
//! credential: creating the first one is how an operator says "build hosts now have their
//! own credentials", and the copies of the token on build hosts stop working. It always
//! keeps the client scope: it lives in the owner's private config directory next to the
//! store, so whoever can read it can already create any credential and it grants nothing
//! new; the workstation's own CLI and MCP server use it. `buildpool token revoke legacy`
//! replaces it for when copies of it went where they should not.

mod limiter;
mod store;

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

pub use store::{Credential, CredentialStore, StoreError};

pub use limiter::Limited;
use limiter::{Failures, Verdict};

pub const TOKEN_ENV: &str = "BUILDPOOL_TOKEN";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read token file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("cannot create token file {0}: {1}")]
    Create(PathBuf, std::io::Error),
    #[error("token file {0} is empty")]
    Empty(PathBuf),
    #[error("cannot replace token file {0}: {1}")]
    Replace(PathBuf, std::io::Error),
}

/// Where the token lives unless configured: `$XDG_CONFIG_HOME/buildpool/token`.
pub fn default_token_file() -> PathBuf {
    config_home().join("buildpool").join("token")
}

pub fn config_home() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// A fresh random token: 32 bytes from the kernel, hex encoded.
pub fn generate() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// The token and where it came from.
#[derive(Debug, Clone)]
pub struct Token {
    pub value: String,
    /// `None` when it came from the environment.
    pub file: Option<PathBuf>,
    pub generated: bool,
}

/// Reads the token from `BUILDPOOL_TOKEN` or `file`; creates the file (mode 0600) with a new
/// token if it does not exist and `create` is set.
pub fn load(file: &Path, create: bool) -> Result<Token, TokenError> {
    if let Ok(value) = std::env::var(TOKEN_ENV)
        && !value.trim().is_empty()
    {
        return Ok(Token {
            value: value.trim().to_owned(),
            file: None,
            generated: false,
        });
    }
    match std::fs::read_to_string(file) {
        Ok(text) if text.trim().is_empty() => Err(TokenError::Empty(file.to_owned())),
        Ok(text) => Ok(Token {
            value: text.trim().to_owned(),
            file: Some(file.to_owned()),
            generated: false,
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && create => {
            let value = generate().map_err(|e| TokenError::Create(file.to_owned(), e))?;
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir).map_err(|e| TokenError::Create(file.to_owned(), e))?;
            }
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(file)
                .map_err(|e| TokenError::Create(file.to_owned(), e))?;
            writeln!(out, "{value}").map_err(|e| TokenError::Create(file.to_owned(), e))?;
            Ok(Token {
                value,
                file: Some(file.to_owned()),
                generated: true,
            })
        }
        Err(error) => Err(TokenError::Read(file.to_owned(), error)),
    }
}

/// Replaces the token in the existing `file` with a fresh one (atomically, mode 0600), so
/// every copy of the old value stops working; returns the new value. Running coordinators
/// whose [`Authenticator`] follows this file accept only the new value from their next
/// check on.
pub fn regenerate(file: &Path) -> Result<String, TokenError> {
    std::fs::metadata(file).map_err(|e| TokenError::Read(file.to_owned(), e))?;
    let value = generate().map_err(|e| TokenError::Replace(file.to_owned(), e))?;
    store::write_atomically(file, format!("{value}\n").as_bytes())
        .map_err(|e| TokenError::Replace(file.to_owned(), e))?;
    Ok(value)
}

/// Compares tokens in time independent of where they differ, so timing tells an attacker
/// nothing about how much of a guess was right (a length is no secret: tokens and hashes
/// have fixed lengths).
pub fn matches(expected: &str, presented: &str) -> bool {
    expected.as_bytes().ct_eq(presented.as_bytes()).into()
}

/// What a credential may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Register as an agent: the job bus and the git tunnel.
    Agent,
    /// Use the control API: submit, cancel, logs, status, drain.
    Client,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Client => "client",
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown scope {0:?}: expected agent or client")]
pub struct UnknownScope(String);

impl std::str::FromStr for Scope {
    type Err = UnknownScope;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "agent" => Ok(Self::Agent),
            "client" => Ok(Self::Client),
            _ => Err(UnknownScope(text.to_owned())),
        }
    }
}

/// Which credential a caller presented; safe to log (never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialName {
    Legacy,
    Id(String),
}

impl std::fmt::Display for CredentialName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Legacy => f.write_str("legacy"),
            Self::Id(id) => f.write_str(id),
        }
    }
}

/// An authenticated caller: its credential and the scope it was admitted with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub credential: CredentialName,
    pub scope: Scope,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("too many failed attempts {by}; retry in {} s", ceil_secs(*.retry_after))]
    RateLimited { by: Limited, retry_after: Duration },
    #[error("invalid credential")]
    Invalid,
    #[error("credential {credential} has the {has} scope; this needs the {needs} scope")]
    WrongScope {
        credential: String,
        has: Scope,
        needs: Scope,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// Failed attempts an address, or naming one credential id, may make per [`FAILURE_WINDOW`]
/// before its further failed attempts are answered only "too many failed attempts".
const MAX_FAILURES: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses, and credential ids, the limits remember; 4096 entries each are a few hundred
/// KB at most.
const LIMITER_CAPACITY: usize = 4096;
/// How often a credential's last use is written to the store: often enough for
/// `buildpool token list` to tell a live credential from a forgotten one, rarely enough that
/// a busy coordinator does not rewrite the file per request.
const PERSIST_LAST_USE_EVERY: Duration = Duration::from_secs(60);

/// Checks presented secrets for the servers. Shared behind an `Arc` by every connection
/// task; each check takes a short lock and stats the store (and the token file) to pick up
/// `buildpool token create`, `revoke` and `revoke legacy` without a restart.
pub struct Authenticator {
    store: CredentialStore,
    /// The file the legacy token came from, followed so `revoke legacy` reaches running
    /// coordinators; `None` for a token from the environment, which cannot change.
    legacy_file: Option<PathBuf>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("store", &self.store)
            .field("legacy_file", &self.legacy_file)
            .finish_non_exhaustive()
    }
}

struct State {
    legacy: String,
    /// The token file version `legacy` was read from (`None` until first read), held open
    /// (see [`store::Version`]).
    legacy_seen: Option<store::Version<()>>,
    /// The store as last read; `None` until first read, `Some(None)` for no file.
    cached: Option<Option<store::Version<Vec<Credential>>>>,
    failures: Failures,
    /// When each credential's last use was last written to the store.
    persisted: HashMap<String, Instant>,
}

impl Authenticator {
    /// `legacy` is the token as [`load`] returned it; see the module documentation for the
    /// scopes it has.
    pub fn new(legacy: Token, store: CredentialStore) -> Self {
        Self {
            store,
            legacy_file: legacy.file,
            state: Mutex::new(State {
                legacy: legacy.value,
                legacy_seen: None,
                cached: None,
                failures: Failures::new(MAX_FAILURES, FAILURE_WINDOW, LIMITER_CAPACITY),
                persisted: HashMap::new(),
            }),
        }
    }

    /// Admits `presented` for `scope`. `peer`: the remote IP, whose failed attempts are
    /// rate-limited; `None` for in-process callers, which are never rate-limited.
    ///
    /// The credential is checked first, always: a valid one is admitted whatever bad
    /// attempts its address (a shared agent host, 127.0.0.1) or its id saw, so no job or
    /// local process can lock others out. Hearing a bad attempt costs one SHA-256 and a
    /// lookup, so refusing it unheard would save next to nothing. Only a failed attempt
    /// meets the limits, which answer it "too many failed attempts" once its address, or
    /// the credential id it names, is over the limit.
    pub fn check(
        &self,
        presented: &str,
        scope: Scope,
        peer: Option<IpAddr>,
    ) -> Result<Principal, AuthError> {
        self.check_at(presented, scope, peer, Instant::now())
    }

    /// [`check`](Self::check) at `now`, which drives the rate limit and the last-use writes.
    pub fn check_at(
        &self,
        presented: &str,
        scope: Scope,
        peer: Option<IpAddr>,
        now: Instant,
    ) -> Result<Principal, AuthError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let outcome = self.verify(&mut state, presented, scope);
        let mut last_use = None;
        let mut limited = None;
        match &outcome {
            Ok(Principal {
                credential: CredentialName::Id(id),
                ..
            }) => {
                let due = state
                    .persisted
                    .get(id)
                    .is_none_or(|at| now.saturating_duration_since(*at) >= PERSIST_LAST_USE_EVERY);
                if due {
                    state.persisted.insert(id.clone(), now);
                    last_use = Some(id.clone());
                }
            }
            Err(error @ (AuthError::Invalid | AuthError::WrongScope { .. })) => {
                let named = store::secret_id(presented);
                let verdict = peer.map(|ip| (ip, state.failures.fail(ip, named, now)));
                match verdict {
                    Some((
                        ip,
                        Verdict::Blocked {
                            by,
                            retry_after,
                            first_refusal,
                        },
                    )) => {
                        if first_refusal {
                            tracing::warn!(
                                peer = %ip,
                                "too many failed credential attempts {by}; refusing them for {} s",
                                ceil_secs(retry_after)
                            );
                        }
                        // A genuine credential in the wrong place proves it is no guess:
                        // it is told what it may do instead.
                        if matches!(error, AuthError::Invalid) {
                            limited = Some(AuthError::RateLimited { by, retry_after });
                        }
                    }
                    _ => {
                        let peer =
                            peer.map_or_else(|| "in-process".to_owned(), |ip| ip.to_string());
                        match named {
                            Some(id) => tracing::warn!(%peer, credential = id, "refused: {error}"),
                            None => tracing::warn!(%peer, "refused: {error}"),
                        }
                    }
                }
            }
            _ => {}
        }
        // The write takes the store's file lock and syncs; other checks need not wait.
        drop(state);
        if let Some(id) = last_use
            && let Err(error) = self
                .store
                .record_last_used(&id, buildpool_core::time::unix_millis())
        {
            tracing::warn!(credential = %id, "cannot record the credential's last use: {error}");
        }
        match limited {
            Some(error) => Err(error),
            None => outcome,
        }
    }

    fn verify(
        &self,
        state: &mut State,
        presented: &str,
        scope: Scope,
    ) -> Result<Principal, AuthError> {
        if presented.is_empty() {
            return Err(AuthError::Invalid);
        }
        self.refresh_legacy(state);
        if matches(&state.legacy, presented) {
            // The client scope does not depend on the store, so a broken store never locks
            // the owner's own CLI out.
            let agents_have_own = scope == Scope::Agent
                && self
                    .credentials(state)?
                    .iter()
                    .any(|c| c.scope == Scope::Agent);
            return if agents_have_own {
                Err(AuthError::WrongScope {
                    credential: CredentialName::Legacy.to_string(),
                    has: Scope::Client,
                    needs: Scope::Agent,
                })
            } else {
                Ok(Principal {
                    credential: CredentialName::Legacy,
                    scope,
                })
            };
        }
        let Some(id) = store::secret_id(presented) else {
            return Err(AuthError::Invalid);
        };
        let hash = store::hash(presented);
        let credential = self
            .credentials(state)?
            .iter()
            .find(|c| c.id == id && matches(&c.sha256, &hash))
            .ok_or(AuthError::Invalid)?;
        if credential.scope != scope {
            return Err(AuthError::WrongScope {
                credential: credential.id.clone(),
                has: credential.scope,
                needs: scope,
            });
        }
        Ok(Principal {
            credential: CredentialName::Id(credential.id.clone()),
            scope,
        })
    }

    /// The store's credentials, re-read if the file changed since the last read.
    fn credentials<'a>(&self, state: &'a mut State) -> Result<&'a [Credential], StoreError> {
        let current = self.store.stamp()?;
        let stale = state
            .cached
            .as_ref()
            .is_none_or(|cached| cached.as_ref().map(|version| version.stamp) != current);
        if stale {
            state.cached = Some(self.store.load()?);
        }
        Ok(state
            .cached
            .as_ref()
            .and_then(Option::as_ref)
            .map_or(&[][..], |version| &version.content))
    }

    /// Re-reads the legacy token if its file changed. A missing file keeps the last value,
    /// as does an unreadable or empty one (with a warning): `serve` recreates a missing token
    /// file, and refusing the owner's own CLI would help nobody.
    fn refresh_legacy(&self, state: &mut State) {
        let Some(file) = &self.legacy_file else {
            return;
        };
        let Ok(Some(current)) = store::stamp(file) else {
            return;
        };
        if state
            .legacy_seen
            .as_ref()
            .is_some_and(|seen| seen.stamp == current)
        {
            return;
        }
        match store::read_version(file) {
            Ok(Some(version)) => {
                let value = version.content.trim();
                if value.is_empty() {
                    tracing::warn!(file = %file.display(), "token file is empty; keeping the previous token");
                } else {
                    state.legacy = value.to_owned();
                }
                state.legacy_seen = Some(store::Version {
                    stamp: version.stamp,
                    content: (),
                    file: version.file,
                });
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(file = %file.display(), "cannot re-read the token file, keeping the previous token: {error}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_reads_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sub/token");
        let first = load(&path, true).expect("generated");
        assert!(first.generated);
        assert_eq!(first.value.len(), 64);
        let mode = std::fs::metadata(&path).expect("exists").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let second = load(&path, true).expect("read");
        assert!(!second.generated);
        assert_eq!(first.value, second.value);
        assert!(load(&dir.path().join("missing"), false).is_err());
    }

    #[test]
    fn comparison_is_exact() {
        assert!(matches("abc", "abc"));
        assert!(!matches("abc", "abd"));
        assert!(!matches("abc", "ab"));
        assert!(!matches("abc", "abcd"));
        assert!(!matches("abc", ""));
    }

    /// A token file with a legacy token and the store next to it.
    fn setup() -> (tempfile::TempDir, Token, CredentialStore) {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("buildpool/token");
        std::fs::create_dir_all(file.parent().expect("parent")).expect("dir");
        std::fs::write(&file, "legacy-secret\n").expect("token file");
        let token = Token {
            value: "legacy-secret".into(),
            file: Some(file.clone()),
            generated: false,
        };
        (dir, token, CredentialStore::next_to(&file))
    }

    fn scope_of(result: Result<Principal, AuthError>) -> Option<Scope> {
        result.ok().map(|principal| principal.scope)
    }

    #[test]
    fn credentials_work_only_in_their_scope() {
        let (_dir, token, store) = setup();
        let (agent, agent_secret) = store.create(Scope::Agent).expect("agent");
        let (_, client_secret) = store.create(Scope::Client).expect("client");
        let auth = Authenticator::new(token, store);
        assert_eq!(
            auth.check(&agent_secret, Scope::Agent, None)
                .expect("agent"),
            Principal {
                credential: CredentialName::Id(agent.id.clone()),
                scope: Scope::Agent
            }
        );
        let error = auth
            .check(&agent_secret, Scope::Client, None)
            .expect_err("not a client");
        assert_eq!(
            error.to_string(),
            format!(
                "credential {} has the agent scope; this needs the client scope",
                agent.id
            )
        );
        assert_eq!(
            scope_of(auth.check(&client_secret, Scope::Client, None)),
            Some(Scope::Client)
        );
        assert!(matches!(
            auth.check(&client_secret, Scope::Agent, None),
            Err(AuthError::WrongScope {
                has: Scope::Client,
                needs: Scope::Agent,
                ..
            })
        ));
        let mut forged = agent_secret.clone();
        forged.pop();
        forged.push(if agent_secret.ends_with('0') {
            '1'
        } else {
            '0'
        });
        assert!(matches!(
            auth.check(&forged, Scope::Agent, None),
            Err(AuthError::Invalid)
        ));
        assert!(matches!(
            auth.check("", Scope::Client, None),
            Err(AuthError::Invalid)
        ));
    }

    #[test]
    fn legacy_token_loses_the_agent_scope_to_the_first_agent_credential() {
        let (_dir, token, store) = setup();
        let auth = Authenticator::new(token, store.clone());
        assert_eq!(
            scope_of(auth.check("legacy-secret", Scope::Agent, None)),
            Some(Scope::Agent)
        );
        store.create(Scope::Client).expect("client");
        assert_eq!(
            scope_of(auth.check("legacy-secret", Scope::Agent, None)),
            Some(Scope::Agent),
            "client credentials change nothing for agents"
        );
        let (agent, _) = store.create(Scope::Agent).expect("agent");
        assert!(matches!(
            auth.check("legacy-secret", Scope::Agent, None),
            Err(AuthError::WrongScope { credential, .. }) if credential == "legacy"
        ));
        assert_eq!(
            auth.check("legacy-secret", Scope::Client, None)
                .expect("client")
                .credential,
            CredentialName::Legacy
        );
        store.revoke(&agent.id).expect("revoked");
        assert_eq!(
            scope_of(auth.check("legacy-secret", Scope::Agent, None)),
            Some(Scope::Agent)
        );
    }

    #[test]
    fn revocation_reaches_a_running_authenticator() {
        let (_dir, token, store) = setup();
        let (credential, secret) = store.create(Scope::Client).expect("client");
        let auth = Authenticator::new(token, store.clone());
        assert!(auth.check(&secret, Scope::Client, None).is_ok());
        store.revoke(&credential.id).expect("revoked");
        assert!(matches!(
            auth.check(&secret, Scope::Client, None),
            Err(AuthError::Invalid)
        ));
        let (_, later) = store.create(Scope::Client).expect("client");
        assert!(auth.check(&later, Scope::Client, None).is_ok());
    }

    #[test]
    fn revoking_legacy_replaces_the_token_file_value() {
        let (_dir, token, store) = setup();
        let file = token.file.clone().expect("file");
        let auth = Authenticator::new(token, store);
        assert!(auth.check("legacy-secret", Scope::Client, None).is_ok());
        let fresh = regenerate(&file).expect("regenerated");
        assert_ne!(fresh, "legacy-secret");
        assert_eq!(load(&file, false).expect("read").value, fresh);
        let mode = std::fs::metadata(&file).expect("exists").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(matches!(
            auth.check("legacy-secret", Scope::Client, None),
            Err(AuthError::Invalid)
        ));
        assert!(auth.check(&fresh, Scope::Client, None).is_ok());
        assert!(matches!(
            regenerate(&file.with_file_name("missing")),
            Err(TokenError::Read(..))
        ));
    }

    #[test]
    fn a_corrupt_store_refuses_agents_but_not_the_owners_cli() {
        let (_dir, token, store) = setup();
        store.create(Scope::Agent).expect("agent");
        std::fs::write(store.path(), "garbage").expect("corrupted");
        let auth = Authenticator::new(token, store.clone());
        let error = auth
            .check("legacy-secret", Scope::Agent, None)
            .expect_err("store unreadable");
        assert!(matches!(
            error,
            AuthError::Store(StoreError::Corrupt { .. })
        ));
        assert!(
            error
                .to_string()
                .contains(&store.path().display().to_string())
        );
        assert!(auth.check("legacy-secret", Scope::Client, None).is_ok());
    }

    #[test]
    fn a_valid_credential_is_never_refused_by_the_limiter() {
        let (_dir, token, store) = setup();
        let (_, secret) = store.create(Scope::Agent).expect("agent");
        let (_, client) = store.create(Scope::Client).expect("client");
        let auth = Authenticator::new(token, store);
        let peer = Some(IpAddr::from([192, 0, 2, 7]));
        let start = Instant::now();
        for _ in 0..MAX_FAILURES {
            assert!(matches!(
                auth.check_at("wrong", Scope::Agent, peer, start),
                Err(AuthError::Invalid)
            ));
        }
        // The address is over its limit: its bad attempts are refused unheard...
        let error = auth
            .check_at("wrong", Scope::Agent, peer, start)
            .expect_err("limited");
        assert_eq!(
            error.to_string(),
            "too many failed attempts from this address; retry in 60 s"
        );
        // ...but every valid credential from it still gets in: the agent's, the owner's
        // token file and a client credential.
        assert!(auth.check_at(&secret, Scope::Agent, peer, start).is_ok());
        assert!(
            auth.check_at("legacy-secret", Scope::Client, peer, start)
                .is_ok()
        );
        assert!(auth.check_at(&client, Scope::Client, peer, start).is_ok());
        // A genuine credential in the wrong place is told so, not that it was limited.
        assert!(matches!(
            auth.check_at(&client, Scope::Agent, peer, start),
            Err(AuthError::WrongScope { .. })
        ));
        // Other addresses are not limited; the limited one is heard again after the window.
        assert!(matches!(
            auth.check_at(
                "wrong",
                Scope::Agent,
                Some(IpAddr::from([192, 0, 2, 8])),
                start
            ),
            Err(AuthError::Invalid)
        ));
        assert!(matches!(
            auth.check_at("wrong", Scope::Agent, peer, start + FAILURE_WINDOW),
            Err(AuthError::Invalid)
        ));
    }

    #[test]
    fn failures_naming_a_credential_are_limited_per_credential() {
        let (_dir, token, store) = setup();
        let (credential, secret) = store.create(Scope::Agent).expect("agent");
        let auth = Authenticator::new(token, store);
        // A guess at the credential's key: its id, a wrong key.
        let guess = format!("bp_{}_{}", credential.id, "0".repeat(64));
        let start = Instant::now();
        for i in 0..MAX_FAILURES {
            let peer = Some(IpAddr::from([
                198,
                51,
                100,
                u8::try_from(i).expect("small"),
            ]));
            assert!(matches!(
                auth.check_at(&guess, Scope::Agent, peer, start),
                Err(AuthError::Invalid)
            ));
        }
        // A fresh address guessing at the same credential is limited...
        let fresh = Some(IpAddr::from([203, 0, 113, 1]));
        let error = auth
            .check_at(&guess, Scope::Agent, fresh, start)
            .expect_err("limited");
        assert_eq!(
            error.to_string(),
            format!(
                "too many failed attempts with credential {}; retry in 60 s",
                credential.id
            )
        );
        // ...while its own bad attempts naming nothing are not, and the credential itself
        // still gets in from anywhere.
        assert!(matches!(
            auth.check_at("wrong", Scope::Agent, fresh, start),
            Err(AuthError::Invalid)
        ));
        assert!(auth.check_at(&secret, Scope::Agent, fresh, start).is_ok());
        // In-process checks (the re-check of connected agents) are never limited.
        assert!(matches!(
            auth.check_at(&guess, Scope::Agent, None, start),
            Err(AuthError::Invalid)
        ));
    }

    #[test]
    fn last_use_is_written_at_most_once_a_minute() {
        let (_dir, token, store) = setup();
        let (credential, secret) = store.create(Scope::Client).expect("client");
        let auth = Authenticator::new(token, store.clone());
        let last_used = || store.list().expect("listed")[0].last_used_unix_ms;
        let start = Instant::now();
        assert!(auth.check_at(&secret, Scope::Client, None, start).is_ok());
        let first = last_used().expect("recorded");
        assert!(first >= credential.created_unix_ms);
        let stamp = store.stamp().expect("stamp");
        assert!(
            auth.check_at(
                &secret,
                Scope::Client,
                None,
                start + Duration::from_secs(59)
            )
            .is_ok()
        );
        assert_eq!(store.stamp().expect("stamp"), stamp, "not rewritten");
        // The store keeps a newer wall-clock time only: let the clock pass the first one.
        while buildpool_core::time::unix_millis() <= first {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            auth.check_at(&secret, Scope::Client, None, start + PERSIST_LAST_USE_EVERY)
                .is_ok()
        );
        assert_ne!(store.stamp().expect("stamp"), stamp, "rewritten");
        assert!(last_used().expect("recorded") >= first);
    }

    #[test]
    fn scopes_parse_and_print() {
        for scope in [Scope::Agent, Scope::Client] {
            assert_eq!(scope.to_string().parse::<Scope>().expect("parsed"), scope);
        }
        assert!("admin".parse::<Scope>().is_err());
    }
}
