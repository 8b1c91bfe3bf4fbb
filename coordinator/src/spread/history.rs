//! How long each test binary's tests ran in earlier spread runs of a repository, which
//! balances the next run's slices. Kept beside the coordinator's state in the common git
//! dir (`buildpool/test-durations.json`), so every worktree's runs share it; written whole
//! (a reader sees the old file or the new), read leniently (a missing or damaged file is
//! no history, never a failed run).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::repo::Repo;

/// Binaries remembered at most; the ones not seen for longest go first.
const MAX_BINARIES: usize = 4096;

/// The history's file for `repo`.
pub fn path(repo: &Repo) -> PathBuf {
    repo.common_dir
        .join("buildpool")
        .join("test-durations.json")
}

/// Milliseconds by nextest binary id; empty when there is no usable history.
pub fn load(path: &Path) -> BTreeMap<String, u64> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return BTreeMap::new();
    };
    let read: BTreeMap<String, u64> = serde_json::from_str(&text).unwrap_or_default();
    // An id goes into a filterset as it is: only the characters binary ids are made of.
    read.into_iter()
        .filter(|(id, _)| {
            !id.is_empty()
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-:/.".contains(c))
        })
        .collect()
}

/// Records what a run measured: its binaries' new durations replace their old ones.
pub fn save(path: &Path, measured: &BTreeMap<String, u64>) -> std::io::Result<()> {
    if measured.is_empty() {
        return Ok(());
    }
    let mut history = load(path);
    history.extend(measured.iter().map(|(id, ms)| (id.clone(), *ms)));
    while history.len() > MAX_BINARIES {
        // Nothing says which was seen last: keep the run's own, drop others by name.
        let Some(old) = history
            .keys()
            .find(|id| !measured.contains_key(*id))
            .cloned()
        else {
            break;
        };
        history.remove(&old);
    }
    std::fs::create_dir_all(crate::atomic_file::parent_dir(path))?;
    let text = serde_json::to_vec_pretty(&history).map_err(std::io::Error::other)?;
    crate::atomic_file::write(path, &text, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_replaces_its_binaries_and_keeps_the_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("buildpool/test-durations.json");
        assert!(load(&file).is_empty());
        let first = BTreeMap::from([("app".to_owned(), 900), ("app::api".to_owned(), 300)]);
        save(&file, &first).expect("saved");
        save(&file, &BTreeMap::from([("app".to_owned(), 1200)])).expect("saved");
        assert_eq!(
            load(&file),
            BTreeMap::from([("app".to_owned(), 1200), ("app::api".to_owned(), 300)])
        );
    }

    #[test]
    fn a_damaged_file_or_an_id_that_is_no_binary_id_is_no_history() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("test-durations.json");
        std::fs::write(&file, "{not json").expect("write");
        assert!(load(&file).is_empty());
        std::fs::write(&file, r#"{"app) | all() | (x": 5, "app::api": 7}"#).expect("write");
        assert_eq!(load(&file), BTreeMap::from([("app::api".to_owned(), 7)]));
    }
}
