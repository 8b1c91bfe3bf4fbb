//! `credentials.json`: the scoped credentials, as hashes only.
//!
//! Only SHA-256 hashes are stored so that a copy of the file (a backup, a dotfiles repository)
//! admits nobody. Every change is a read-modify-write under an exclusive `flock` on a sibling
//! lock file, so a `buildpool token` command and the coordinators of several repositories
//! sharing one store never lose each other's updates; the new content is written to a temp
//! file and renamed over the old one, so readers (which take no lock) never see half a file.

use std::fs::{File, Metadata, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::Scope;
use crate::atomic_file::parent_dir;

const FILE_NAME: &str = "credentials.json";
const LOCK_FILE_NAME: &str = "credentials.json.lock";
/// Bumped on an incompatible change, so an older buildpool refuses a newer file instead of
/// misreading it.
const FORMAT_VERSION: u32 = 1;
const SECRET_PREFIX: &str = "bp_";
const ID_LEN: usize = 8;
const KEY_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read credential store {file}: {error}")]
    Read {
        file: PathBuf,
        error: std::io::Error,
    },
    #[error("credential store {file} is corrupt ({error}); repair it or restore a backup")]
    Corrupt {
        file: PathBuf,
        error: serde_json::Error,
    },
    #[error(
        "credential store {file} has format version {found}; this buildpool reads version {FORMAT_VERSION}"
    )]
    Version { file: PathBuf, found: u32 },
    #[error("cannot write credential store {file}: {error}")]
    Write {
        file: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot lock credential store {file}: {error}")]
    Lock {
        file: PathBuf,
        error: std::io::Error,
    },
    #[error("no credential with id {0:?} (see `buildpool token list`)")]
    UnknownId(String),
    #[error("the system random number generator failed")]
    Random,
}

/// One stored credential. The secret itself is never stored, only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// 8 lowercase hex characters, also embedded in the secret so a check finds the entry
    /// without trying every hash, and so logs can name a credential without its secret.
    pub id: String,
    pub scope: Scope,
    /// SHA-256 of the whole secret, lowercase hex.
    pub sha256: String,
    pub created_unix_ms: u64,
    /// Accurate to a minute: running coordinators persist use at most once a minute.
    pub last_used_unix_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoreFile {
    version: u32,
    credentials: Vec<Credential>,
}

/// Identifies one version of a file: a rename gives a new inode, an in-place edit a new
/// mtime or length. Cheap to take on every check, which is how running coordinators notice
/// `buildpool token create` and `revoke` without a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl Stamp {
    fn of(metadata: &Metadata) -> Self {
        Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
            len: metadata.len(),
            mtime: metadata.mtime(),
            mtime_nsec: metadata.mtime_nsec(),
        }
    }
}

/// The stamp of `path`, `None` if it does not exist.
pub(super) fn stamp(path: &Path) -> std::io::Result<Option<Stamp>> {
    match std::fs::metadata(path) {
        Ok(metadata) => Ok(Some(Stamp::of(&metadata))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

/// One version of a file as read.
#[derive(Debug)]
pub(super) struct Version<T> {
    /// Taken from the open file, not the path, so a concurrent rename cannot pair old
    /// content with a new stamp.
    pub(super) stamp: Stamp,
    pub(super) content: T,
    /// The file it was read from. Holding it open keeps its inode from being reused, so with
    /// every writer renaming a new file into place, a later version always has another
    /// inode, even when written within one mtime tick at the same length.
    pub(super) file: File,
}

/// Reads `path`; `None` if it does not exist.
pub(super) fn read_version(path: &Path) -> std::io::Result<Option<Version<String>>> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let stamp = Stamp::of(&file.metadata()?);
    let mut content = String::new();
    file.read_to_string(&mut content)?;
    Ok(Some(Version {
        stamp,
        content,
        file,
    }))
}

/// Credentials are secrets: only their owner reads the files that hold them.
pub(super) fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    crate::atomic_file::write(path, contents, 0o600)
}

/// SHA-256 of a secret as stored, lowercase hex.
pub(super) fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The id inside a well-formed secret `bp_<8 hex>_<64 hex>`, `None` for anything else
/// (the legacy token, garbage).
pub(super) fn secret_id(secret: &str) -> Option<&str> {
    let (id, key) = secret.strip_prefix(SECRET_PREFIX)?.split_once('_')?;
    let lower_hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    (lower_hex(id, ID_LEN) && lower_hex(key, KEY_LEN)).then_some(id)
}

fn random_hex(len_bytes: usize) -> Result<String, StoreError> {
    let mut bytes = vec![0u8; len_bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| StoreError::Random)?;
    Ok(hex::encode(bytes))
}

/// The credential store of one token file. Cheap to clone; holds no open files.
#[derive(Debug, Clone)]
pub struct CredentialStore {
    file: PathBuf,
}

impl CredentialStore {
    /// The store in the token file's directory: the owner's private config directory, whose
    /// token already grants everything the store could (see [`super`]).
    pub fn next_to(token_file: &Path) -> Self {
        Self {
            file: parent_dir(token_file).join(FILE_NAME),
        }
    }

    pub fn path(&self) -> &Path {
        &self.file
    }

    /// All credentials, oldest first. A missing file is an empty store.
    pub fn list(&self) -> Result<Vec<Credential>, StoreError> {
        Ok(self
            .load()?
            .map_or_else(Vec::new, |version| version.content))
    }

    /// Creates a credential and returns it with its secret, the only time the secret exists
    /// outside the holder's hands.
    pub fn create(&self, scope: Scope) -> Result<(Credential, String), StoreError> {
        self.update(|credentials| {
            let id = loop {
                let id = random_hex(ID_LEN / 2)?;
                if credentials.iter().all(|c| c.id != id) {
                    break id;
                }
            };
            let secret = format!("{SECRET_PREFIX}{id}_{}", random_hex(KEY_LEN / 2)?);
            let credential = Credential {
                id,
                scope,
                sha256: hash(&secret),
                created_unix_ms: buildpool_core::time::unix_millis(),
                last_used_unix_ms: None,
            };
            credentials.push(credential.clone());
            Ok(((credential, secret), true))
        })
    }

    /// Removes a credential; running coordinators refuse it from their next check on.
    pub fn revoke(&self, id: &str) -> Result<Credential, StoreError> {
        self.update(|credentials| {
            let index = credentials
                .iter()
                .position(|c| c.id == id)
                .ok_or_else(|| StoreError::UnknownId(id.to_owned()))?;
            Ok((credentials.remove(index), true))
        })
    }

    /// Records a use, never moving `last_used` backwards (another coordinator may have
    /// recorded a later one); a credential revoked meanwhile stays revoked.
    pub(super) fn record_last_used(&self, id: &str, unix_ms: u64) -> Result<(), StoreError> {
        self.update(|credentials| {
            let entry = credentials.iter_mut().find(|c| c.id == id);
            let changed = match entry {
                Some(c) if c.last_used_unix_ms.is_none_or(|last| last < unix_ms) => {
                    c.last_used_unix_ms = Some(unix_ms);
                    true
                }
                _ => false,
            };
            Ok(((), changed))
        })
    }

    pub(super) fn stamp(&self) -> Result<Option<Stamp>, StoreError> {
        stamp(&self.file).map_err(|error| self.read_error(error))
    }

    /// The current version of the store; `None` if there is no file (an empty store).
    pub(super) fn load(&self) -> Result<Option<Version<Vec<Credential>>>, StoreError> {
        let Some(version) = read_version(&self.file).map_err(|error| self.read_error(error))?
        else {
            return Ok(None);
        };
        let parsed: StoreFile =
            serde_json::from_str(&version.content).map_err(|error| StoreError::Corrupt {
                file: self.file.clone(),
                error,
            })?;
        if parsed.version != FORMAT_VERSION {
            return Err(StoreError::Version {
                file: self.file.clone(),
                found: parsed.version,
            });
        }
        Ok(Some(Version {
            stamp: version.stamp,
            content: parsed.credentials,
            file: version.file,
        }))
    }

    /// Read-modify-write under the store's exclusive lock. `change` returns its result and
    /// whether it changed anything; an unchanged store is not rewritten.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut Vec<Credential>) -> Result<(T, bool), StoreError>,
    ) -> Result<T, StoreError> {
        let dir = parent_dir(&self.file);
        let lock_path = dir.join(LOCK_FILE_NAME);
        let lock_error = |error| StoreError::Lock {
            file: lock_path.clone(),
            error,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(lock_error)?;
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(lock_error)?;
        // Released when `lock` is dropped, after the rename.
        lock.lock().map_err(lock_error)?;
        let mut credentials = self
            .load()?
            .map_or_else(Vec::new, |version| version.content);
        let (result, changed) = change(&mut credentials)?;
        if changed {
            let file = StoreFile {
                version: FORMAT_VERSION,
                credentials,
            };
            let mut text =
                serde_json::to_string_pretty(&file).map_err(|error| StoreError::Write {
                    file: self.file.clone(),
                    error: error.into(),
                })?;
            text.push('\n');
            write_atomically(&self.file, text.as_bytes()).map_err(|error| StoreError::Write {
                file: self.file.clone(),
                error,
            })?;
        }
        Ok(result)
    }

    fn read_error(&self, error: std::io::Error) -> StoreError {
        StoreError::Read {
            file: self.file.clone(),
            error,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn store() -> (tempfile::TempDir, CredentialStore) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = CredentialStore::next_to(&dir.path().join("config/token"));
        (dir, store)
    }

    #[test]
    fn missing_file_is_an_empty_store() {
        let (_dir, store) = store();
        assert_eq!(store.list().expect("empty"), Vec::new());
    }

    #[test]
    fn create_list_revoke_round_trip() {
        let (_dir, store) = store();
        let (agent, secret) = store.create(Scope::Agent).expect("created");
        let (client, _) = store.create(Scope::Client).expect("created");
        assert_eq!(secret_id(&secret), Some(agent.id.as_str()));
        assert_eq!(agent.sha256, hash(&secret));
        assert_eq!(
            store.list().expect("listed"),
            vec![agent.clone(), client.clone()]
        );
        assert_eq!(store.revoke(&agent.id).expect("revoked"), agent);
        assert_eq!(store.list().expect("listed"), vec![client]);
        assert!(matches!(
            store.revoke(&agent.id),
            Err(StoreError::UnknownId(id)) if id == agent.id
        ));
    }

    #[test]
    fn file_holds_no_secret_and_is_private() {
        let (_dir, store) = store();
        let (_, secret) = store.create(Scope::Client).expect("created");
        let text = std::fs::read_to_string(store.path()).expect("written");
        assert!(!text.contains(&secret));
        assert!(!text.contains(&secret[secret.len() - KEY_LEN..]));
        let mode = std::fs::metadata(store.path())
            .expect("exists")
            .permissions();
        assert_eq!(mode.mode() & 0o777, 0o600);
    }

    #[test]
    fn secrets_have_the_documented_form() {
        let (_dir, store) = store();
        let (credential, secret) = store.create(Scope::Agent).expect("created");
        assert_eq!(secret.len(), 3 + ID_LEN + 1 + KEY_LEN);
        assert!(secret.starts_with(&format!("bp_{}_", credential.id)));
        assert_eq!(secret_id("bp_0123abcd_short"), None);
        assert_eq!(secret_id(&secret.to_uppercase()), None);
        assert_eq!(secret_id(&"a".repeat(64)), None);
    }

    #[test]
    fn corrupt_store_is_an_error_naming_the_file() {
        let (_dir, store) = store();
        store.create(Scope::Agent).expect("created");
        std::fs::write(store.path(), "{ not json").expect("overwritten");
        let error = store.list().expect_err("corrupt");
        assert!(matches!(error, StoreError::Corrupt { .. }));
        assert!(
            error
                .to_string()
                .contains(&store.path().display().to_string())
        );
        assert!(store.create(Scope::Client).is_err(), "never overwritten");
        std::fs::write(store.path(), r#"{"version":2,"credentials":[]}"#).expect("overwritten");
        assert!(matches!(
            store.list(),
            Err(StoreError::Version { found: 2, .. })
        ));
    }

    #[test]
    fn last_use_only_moves_forward_and_skips_revoked() {
        let (_dir, store) = store();
        let (credential, _) = store.create(Scope::Agent).expect("created");
        store
            .record_last_used(&credential.id, 2000)
            .expect("recorded");
        store
            .record_last_used(&credential.id, 1000)
            .expect("recorded");
        let listed = store.list().expect("listed");
        assert_eq!(listed[0].last_used_unix_ms, Some(2000));
        store.revoke(&credential.id).expect("revoked");
        store
            .record_last_used(&credential.id, 3000)
            .expect("ignored");
        assert_eq!(store.list().expect("listed"), Vec::new());
    }

    #[test]
    fn concurrent_handles_lose_nothing() {
        let (dir, store) = store();
        let token_file = dir.path().join("config/token");
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let store = CredentialStore::next_to(&token_file);
                std::thread::spawn(move || {
                    (0..10)
                        .map(|_| store.create(Scope::Agent).expect("created").0.id)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut created: Vec<String> = threads
            .into_iter()
            .flat_map(|thread| thread.join().expect("thread"))
            .collect();
        let mut stored: Vec<String> = store
            .list()
            .expect("listed")
            .into_iter()
            .map(|c| c.id)
            .collect();
        created.sort();
        stored.sort();
        assert_eq!(created.len(), 40);
        assert_eq!(stored, created);
    }
}
