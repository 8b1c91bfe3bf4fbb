//! Who may use the coordinator: credentials checked for a scope, and when a client last
//! made a request.

use std::sync::atomic::{AtomicU64, Ordering};

use buildpool_core::time::unix_millis;

use crate::auth::{AuthError, Authenticator, CredentialName, Scope};

#[derive(Debug)]
pub(crate) struct Access {
    auth: Authenticator,
    /// When the control API last admitted a request (unix milliseconds): a coordinator
    /// started in the background stops only after clients fell silent.
    last_request: AtomicU64,
}

impl Access {
    pub fn new(auth: Authenticator) -> Self {
        Self {
            auth,
            last_request: AtomicU64::new(unix_millis()),
        }
    }

    /// Checks a credential presented for `scope` from `peer` (`None`: in-process) and
    /// names the credential it was; the error is what the peer is told. Failures are
    /// logged by the authenticator.
    pub fn authorize(
        &self,
        presented: &str,
        scope: Scope,
        peer: Option<std::net::IpAddr>,
    ) -> Result<CredentialName, String> {
        match self.auth.check(presented, scope, peer) {
            Ok(principal) => Ok(principal.credential),
            Err(AuthError::Invalid) => Err(match scope {
                Scope::Agent => "invalid credential: give the agent a credential from \
                                 `buildpool token create --scope agent` (or the coordinator's token file)",
                Scope::Client => "invalid credential: use a credential from \
                                  `buildpool token create --scope client` (or the coordinator's token file)",
            }
            .to_owned()),
            Err(AuthError::WrongScope {
                credential,
                has,
                needs,
            }) if credential == CredentialName::Legacy.to_string() => Err(format!(
                "the coordinator's token file no longer admits {needs}s since {needs} credentials \
                 exist (it keeps the {has} scope): run `buildpool token create --scope {needs}` \
                 and install the new credential here"
            )),
            Err(AuthError::Store(error)) => {
                tracing::error!("credential store: {error}");
                Err("the coordinator cannot read its credential store; see its log".to_owned())
            }
            Err(error) => Err(error.to_string()),
        }
    }

    /// Notes that a client's request was admitted now.
    pub fn client_seen(&self) {
        self.last_request.store(unix_millis(), Ordering::Relaxed);
    }

    /// When a client's request was last admitted (unix milliseconds).
    pub fn last_request(&self) -> u64 {
        self.last_request.load(Ordering::Relaxed)
    }

    /// Whether an agent's credential was definitely refused since it connected (revoked, or
    /// the token file's once agent credentials exist). An unreadable store is no refusal:
    /// it must not disconnect everyone.
    pub fn revoked(&self, credential: &str) -> bool {
        matches!(
            self.auth.check(credential, Scope::Agent, None),
            Err(AuthError::Invalid | AuthError::WrongScope { .. })
        )
    }
}
