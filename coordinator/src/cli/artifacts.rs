//! `buildpool run ... --artifacts`: the job's executables into the worktree's `target/`.
//!
//! Every file is written to a temporary file beside its destination, with its mode, and
//! checked against the SHA-256 the agent computed. Only when all of them arrived and match
//! are they renamed into place, so a broken transfer leaves `target/` as it was.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use buildpool_core::ArtifactChunk;
use buildpool_core::job::artifact_path_is_safe;
use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;

/// The file being received.
struct Current {
    index: u32,
    rel_path: String,
    file: NamedTempFile,
    hasher: Sha256,
    written: u64,
}

/// Receives a job's executables chunk by chunk into `target`.
pub(crate) struct Receiver {
    target: PathBuf,
    count: Option<u32>,
    current: Option<Current>,
    /// Received and verified, waiting to be renamed into place.
    done: Vec<(NamedTempFile, PathBuf)>,
    bytes: u64,
}

impl Receiver {
    pub fn new(target: &Path) -> Self {
        Self {
            target: target.to_owned(),
            count: None,
            current: None,
            done: Vec::new(),
            bytes: 0,
        }
    }

    /// Takes the next chunk in order.
    pub fn take(&mut self, chunk: &ArtifactChunk) -> anyhow::Result<()> {
        if *self.count.get_or_insert(chunk.count) != chunk.count {
            bail!("the executables' file count changed during the transfer");
        }
        if chunk.count == 0 {
            return Ok(());
        }
        let current = match &mut self.current {
            Some(current) => current,
            None => {
                let expected = u32::try_from(self.done.len()).unwrap_or(u32::MAX);
                if chunk.index != expected || chunk.offset != 0 || chunk.index >= chunk.count {
                    bail!("executable {} arrived out of order", chunk.rel_path);
                }
                if !artifact_path_is_safe(&chunk.rel_path) {
                    bail!("refusing the executable path {:?}", chunk.rel_path);
                }
                let destination = self.target.join(&chunk.rel_path);
                let dir = destination
                    .parent()
                    .context("an executable path without a directory")?;
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let file = tempfile::Builder::new()
                    .prefix(".buildpool-")
                    .tempfile_in(dir)
                    .with_context(|| format!("cannot write in {}", dir.display()))?;
                file.as_file()
                    .set_permissions(std::fs::Permissions::from_mode(chunk.mode & 0o777))?;
                self.current.insert(Current {
                    index: chunk.index,
                    rel_path: chunk.rel_path.clone(),
                    file,
                    hasher: Sha256::new(),
                    written: 0,
                })
            }
        };
        if chunk.index != current.index || chunk.offset != current.written {
            bail!("executable {} arrived out of order", current.rel_path);
        }
        current
            .file
            .write_all(&chunk.data)
            .with_context(|| format!("cannot write {}", current.rel_path))?;
        current.hasher.update(&chunk.data);
        current.written += chunk.data.len() as u64;
        self.bytes += chunk.data.len() as u64;
        if let Some(expected) = &chunk.sha256 {
            let Some(current) = self.current.take() else {
                return Ok(());
            };
            let actual = hex::encode(current.hasher.finalize());
            if &actual != expected {
                bail!(
                    "executable {} is corrupt: its SHA-256 is {actual}, the agent sent {expected}",
                    current.rel_path
                );
            }
            let destination = self.target.join(&current.rel_path);
            self.done.push((current.file, destination));
        }
        Ok(())
    }

    /// Renames every file into place once all arrived intact; returns how many and their
    /// bytes.
    pub fn finish(self) -> anyhow::Result<(usize, u64)> {
        let count = self.count.unwrap_or(0) as usize;
        if self.current.is_some() || self.done.len() != count {
            bail!(
                "the transfer of the executables ended early: {} of {count} arrived",
                self.done.len()
            );
        }
        for (file, destination) in self.done {
            file.persist(&destination)
                .with_context(|| format!("cannot write {}", destination.display()))?;
        }
        Ok((count, self.bytes))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn chunk(data: &'static [u8], offset: u64, sha256: Option<String>) -> ArtifactChunk {
        ArtifactChunk {
            index: 0,
            count: 1,
            rel_path: "debug/app".to_owned(),
            mode: 0o755,
            offset,
            data: Bytes::from_static(data),
            sha256,
        }
    }

    #[test]
    fn a_verified_file_lands_executable_and_a_corrupt_one_not_at_all() {
        let target = tempfile::tempdir().expect("temp");
        let good = hex::encode(Sha256::digest(b"hello world"));

        let mut receiver = Receiver::new(target.path());
        receiver.take(&chunk(b"hello ", 0, None)).expect("first");
        receiver
            .take(&chunk(b"world", 6, Some(good.clone())))
            .expect("last");
        assert_eq!(receiver.finish().expect("complete"), (1, 11));
        let path = target.path().join("debug/app");
        assert_eq!(std::fs::read(&path).expect("copied"), b"hello world");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o755);

        std::fs::remove_file(&path).expect("remove");
        let mut receiver = Receiver::new(target.path());
        receiver.take(&chunk(b"hello ", 0, None)).expect("first");
        let corrupt = receiver.take(&chunk(b"w0rld", 6, Some(good)));
        let error = corrupt.expect_err("mismatch").to_string();
        assert!(error.contains("debug/app is corrupt"), "{error}");
        drop(receiver);
        assert!(!path.exists());
        let leftovers = std::fs::read_dir(target.path().join("debug")).expect("dir");
        assert_eq!(leftovers.count(), 0, "no temporary file left behind");
    }

    /// Chunks as a rogue agent or a broken coordinator might send them: paths that climb,
    /// are absolute or empty, indexes, counts and offsets out of order, wrong checksums.
    fn hostile_chunk() -> impl proptest::strategy::Strategy<Value = ArtifactChunk> {
        use proptest::prelude::*;
        (
            0u32..3,
            0u32..3,
            prop_oneof![
                Just("debug/app".to_owned()),
                Just("../outside".to_owned()),
                Just("/etc/passwd".to_owned()),
                Just("debug/../../x".to_owned()),
                Just(String::new()),
                "[a-z./]{0,12}",
            ],
            0u64..16,
            proptest::collection::vec(any::<u8>(), 0..8),
            proptest::option::of("[0-9a-f]{64}"),
        )
            .prop_map(
                |(index, count, rel_path, offset, data, sha256)| ArtifactChunk {
                    index,
                    count,
                    rel_path,
                    mode: 0o4755,
                    offset,
                    data: Bytes::from(data),
                    sha256,
                },
            )
    }

    proptest::proptest! {
        /// No sequence of chunks panics the receiver or puts anything outside `target/`,
        /// and nothing set-uid arrives.
        #[test]
        fn hostile_chunks_never_land_outside_the_target(
            chunks in proptest::collection::vec(hostile_chunk(), 0..12),
        ) {
            let root = tempfile::tempdir().expect("temp");
            let target = root.path().join("target");
            let mut receiver = Receiver::new(&target);
            for chunk in &chunks {
                if receiver.take(chunk).is_err() {
                    break;
                }
            }
            let _ = receiver.finish();
            let outside: Vec<_> = std::fs::read_dir(root.path())
                .expect("root")
                .flatten()
                .map(|entry| entry.file_name())
                .filter(|name| name != "target")
                .collect();
            proptest::prop_assert!(outside.is_empty(), "{outside:?}");
            for entry in walk(&target) {
                let mode = std::fs::symlink_metadata(&entry).expect("meta").permissions().mode();
                proptest::prop_assert_eq!(mode & 0o7000, 0, "{}", entry.display());
            }
        }
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(walk(&path));
            }
            found.push(path);
        }
        found
    }

    #[test]
    fn a_transfer_that_ends_early_copies_nothing() {
        let target = tempfile::tempdir().expect("temp");
        let mut receiver = Receiver::new(target.path());
        receiver.take(&chunk(b"hello ", 0, None)).expect("first");
        let error = receiver.finish().expect_err("incomplete").to_string();
        assert!(error.contains("ended early"), "{error}");
        assert!(!target.path().join("debug/app").exists());
        let escape = ArtifactChunk {
            rel_path: "../outside".to_owned(),
            ..chunk(b"x", 0, None)
        };
        assert!(Receiver::new(target.path()).take(&escape).is_err());
    }
}
