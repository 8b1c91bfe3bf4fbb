//! The agent's identity key: what makes its id its own.
//!
//! Any holder of an agent credential could connect under any agent id; a shared credential
//! is common. So at its first start an agent makes a random key (as an SSH host key is
//! made) and shows each coordinator a proof of it in every hello. A coordinator binds an
//! agent id to the first proof and credential it saw, lets that agent reconnect and take
//! over its own connections at once, and refuses anyone else the id.

use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Where the key lives in the agent's git cache directory: kept across restarts like the
/// caches, and hidden from jobs with them. No repository id starts with a dot.
pub const KEY_FILE: &str = ".agent-key";
/// Bytes of key.
const KEY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read or create the agent's identity key {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the agent's identity key {0} is damaged; remove it to make a new one (coordinators then refuse this agent id until the old key has been away for a while)"
    )]
    Damaged(std::path::PathBuf),
    #[error("no random source for the agent's identity key")]
    Random,
}

/// The key in `dir`, made (readable by the agent's user only) when there is none yet.
pub fn load_or_create(dir: &Path) -> Result<Vec<u8>, IdentityError> {
    let path = dir.join(KEY_FILE);
    let io = |source| IdentityError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => return decode(text.trim()).ok_or_else(|| IdentityError::Damaged(path.clone())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(io(error)),
    }
    let mut key = vec![0; KEY_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| IdentityError::Random)?;
    std::fs::create_dir_all(dir).map_err(io)?;
    // Written whole under a temporary name (mode 0600) and linked into place: two agents
    // starting on one directory at once agree on the first key.
    let temporary = tempfile::Builder::new()
        .prefix(".agent-key-")
        .tempfile_in(dir)
        .map_err(io)?;
    writeln!(temporary.as_file(), "{}", hex::encode(&key)).map_err(io)?;
    temporary.as_file().sync_all().map_err(io)?;
    match temporary.persist_noclobber(&path) {
        Ok(_) => Ok(key),
        Err(error) if error.error.kind() == std::io::ErrorKind::AlreadyExists => {
            let text = std::fs::read_to_string(&path).map_err(io)?;
            decode(text.trim()).ok_or(IdentityError::Damaged(path))
        }
        Err(error) => Err(io(error.error)),
    }
}

/// What the agent shows the coordinator at `coordinator_url` of `key`: SHA-256 over the
/// key and the URL, in lowercase hex. Each coordinator sees a proof of its own, so one
/// coordinator cannot pass itself off as the agent to another.
pub fn proof(key: &[u8], coordinator_url: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(key);
    hasher.update([0]);
    hasher.update(coordinator_url.as_bytes());
    hex::encode(hasher.finalize())
}

fn decode(text: &str) -> Option<Vec<u8>> {
    hex::decode(text).ok().filter(|key| key.len() == KEY_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_made_once_and_kept_private() {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = load_or_create(dir.path()).expect("made");
        assert_eq!(key.len(), KEY_BYTES);
        assert_eq!(load_or_create(dir.path()).expect("read"), key);
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .expect("key file")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        std::fs::write(dir.path().join(KEY_FILE), "not hex").expect("damage");
        assert!(matches!(
            load_or_create(dir.path()),
            Err(IdentityError::Damaged(_))
        ));
    }

    #[test]
    fn each_coordinator_sees_its_own_proof() {
        let key = [7u8; KEY_BYTES];
        let first = proof(&key, "wss://a:8081/ws");
        assert_eq!(first.len(), 64);
        assert_eq!(first, proof(&key, "wss://a:8081/ws"));
        assert_ne!(first, proof(&key, "wss://b:8081/ws"));
        assert_ne!(first, proof(&[8u8; KEY_BYTES], "wss://a:8081/ws"));
    }
}
