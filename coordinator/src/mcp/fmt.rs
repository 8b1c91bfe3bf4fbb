//! The `fmt` tool: `cargo fmt --check` in the worktree itself, not as a job.
//!
//! A formatting check compiles nothing and reads only the worktree, in well under a second:
//! a job's snapshot, queue and fetch would cost more than the check. Run here, it sees the
//! worktree exactly as it is, names files by their paths in it, and uses the rustfmt the
//! developer formats with.

use std::path::Path;
use std::time::Duration;

use build_agent::process::{self, CommandSpec, ProcessEnd, RunLimits};
use buildpool_core::OutputStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::answer::FmtAnswer;
use crate::report::cap;

/// Longest a formatting check may take.
const FMT_TIMEOUT: Duration = Duration::from_secs(120);
/// Most files remembered from the diff; the answer lists fewer.
const MAX_FILES: usize = 10_000;
/// Most change lines remembered per file; the answer lists fewer.
const MAX_LINES_PER_FILE: usize = 100;
/// Most stderr bytes kept to explain a check that could not run.
const MAX_STDERR: usize = 64 * 1024;
/// Longest diff line kept whole; only a line's first characters matter here.
const MAX_LINE: usize = 64 * 1024;

/// Files in rustfmt's diff output and the lines where changes start, in order of
/// appearance. A hunk's header gives its first line, `Diff in /abs/file.rs:12:` (rustfmt
/// 1.5 and later) or `Diff in /abs/file.rs at line 12:` (older), context included; the
/// change's own line is counted from there through the context (` `) and removed (`-`)
/// lines. Paths under `root` become relative to it.
#[derive(Debug, Default)]
pub struct DiffFiles {
    files: Vec<(String, Vec<u64>)>,
    /// The line of the file as it is that the next hunk line stands for; `None` outside a
    /// hunk or when the header had no number.
    next_line: Option<u64>,
    /// The previous hunk line was a change, so this one continues it.
    in_change: bool,
}

impl DiffFiles {
    pub fn line(&mut self, line: &str, root: &Path) {
        if let Some(rest) = line.strip_prefix("Diff in ") {
            self.header(rest, root);
            return;
        }
        let Some(number) = self.next_line else {
            return;
        };
        match line.chars().next() {
            Some('-' | '+') => {
                if !self.in_change
                    && let Some((_, lines)) = self.files.last_mut()
                    && lines.len() < MAX_LINES_PER_FILE
                {
                    lines.push(number);
                }
                self.in_change = true;
                if line.starts_with('-') {
                    self.next_line = Some(number + 1);
                }
            }
            _ => {
                self.in_change = false;
                self.next_line = Some(number + 1);
            }
        }
    }

    fn header(&mut self, rest: &str, root: &Path) {
        let rest = rest.trim_end().trim_end_matches(':');
        let (path, number) = match rest.rsplit_once(" at line ") {
            Some((path, number)) => (path, number),
            None => match rest.rsplit_once(':') {
                Some((path, number)) => (path, number),
                None => (rest, ""),
            },
        };
        let path = Path::new(path);
        let file = path
            .strip_prefix(root)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned();
        self.next_line = number.parse::<u64>().ok();
        self.in_change = false;
        // rustfmt reports a file's hunks together, one header each.
        if self.files.last().is_none_or(|(name, _)| *name != file) && self.files.len() < MAX_FILES {
            self.files.push((file, Vec::new()));
        }
    }

    pub fn into_files(self) -> Vec<(String, Vec<u64>)> {
        self.files
    }
}

/// Runs `cargo fmt --check [-p PACKAGE]` in `worktree` and answers with the files to format.
/// It runs as an owned process group under a deadline, like a job's cargo: dropping the
/// call (a cancelled tool call) kills the group.
pub async fn check(worktree: &Path, package: Option<&str>) -> FmtAnswer {
    // Paths in the diff are canonical; the worktree may have been reached through a link.
    let root = worktree
        .canonicalize()
        .unwrap_or_else(|_| worktree.to_owned());
    let mut args = vec!["fmt".into(), "--check".into()];
    if let Some(package) = package {
        args.extend(["-p".into(), package.into()]);
    }
    // Plain lines: rustfmt colours its diff even into a pipe.
    args.extend(["--".into(), "--color".into(), "never".into()]);
    let spec = CommandSpec {
        program: "cargo".into(),
        args,
        cwd: worktree.to_owned(),
        env: Vec::new(),
        clear_env: false,
        registry: None,
        options_on_fd3: None,
    };
    let limits = RunLimits {
        timeout: FMT_TIMEOUT,
        kill_grace: Duration::from_secs(1),
    };
    let (sender, mut chunks) = mpsc::channel(16);
    let run = process::run(spec, limits, sender, CancellationToken::new());
    let read = async {
        let (mut diff, mut stdout, mut stderr) = (DiffFiles::default(), Vec::new(), Vec::new());
        while let Some(chunk) = chunks.recv().await {
            if chunk.stream == OutputStream::Stderr {
                let room = MAX_STDERR.saturating_sub(stderr.len());
                stderr.extend_from_slice(&chunk.data[..chunk.data.len().min(room)]);
                continue;
            }
            for piece in chunk.data.split_inclusive(|b| *b == b'\n') {
                if stdout.len() < MAX_LINE {
                    stdout.extend_from_slice(piece);
                }
                if piece.ends_with(b"\n") {
                    diff.line(String::from_utf8_lossy(&stdout).trim_end(), &root);
                    stdout.clear();
                }
            }
        }
        (diff, String::from_utf8_lossy(&stderr).into_owned())
    };
    let (ended, (diff, stderr)) = tokio::join!(run, read);
    let files = diff.into_files();
    match ended.map(|result| result.end) {
        Ok(ProcessEnd::Exited { code: 0 }) => FmtAnswer::of(files),
        Ok(ProcessEnd::Exited { .. }) if !files.is_empty() => FmtAnswer::of(files),
        Ok(ProcessEnd::TimedOut) => FmtAnswer::error(&format!(
            "cargo fmt --check did not finish within {FMT_TIMEOUT:?}"
        )),
        Err(error) => FmtAnswer::error(&format!("cargo fmt could not start: {error}")),
        Ok(_) if stderr.contains("no such command: `fmt`") => {
            FmtAnswer::error("rustfmt is not installed here (rustup component add rustfmt)")
        }
        Ok(end) => {
            let tail: Vec<&str> = stderr.lines().rev().take(12).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            FmtAnswer::error(&cap(
                &format!("cargo fmt --check failed ({end:?}): {}", tail.join("\n")),
                1200,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real `cargo fmt --check -- --color never` output (rustfmt 1.9) for two files, and
    /// the older form of the header line.
    #[test]
    fn diff_lines_name_files_relative_to_the_worktree_with_the_changed_lines() {
        let output = "Diff in /tmp/nx/src/extra.rs:1:\n-pub fn h()->i32{1}\n+pub fn h() -> i32 {\n+    1\n+}\n \nDiff in /tmp/nx/src/lib.rs:1:\n-pub fn f() -> i32 { 2 }\n+pub fn f() -> i32 {\n+    2\n+}\n #[cfg(test)]\n mod tests {\n     #[test]\nDiff in /tmp/nx/src/lib.rs:5:\n     #[test]\n     fn a() {}\n \n-    fn ok() { assert_eq!(super::f(), 2); }\n+    fn ok() {\n+        assert_eq!(super::f(), 2);\n+    }\n     #[test]\n-    fn b() { }\n+    fn b() {}\n     #[test]\nDiff in /elsewhere/x.rs at line 7:\n \n+\n";
        let mut diff = DiffFiles::default();
        for line in output.lines() {
            diff.line(line, Path::new("/tmp/nx"));
        }
        assert_eq!(
            diff.into_files(),
            [
                ("src/extra.rs".to_owned(), vec![1]),
                ("src/lib.rs".to_owned(), vec![1, 8, 10]),
                ("/elsewhere/x.rs".to_owned(), vec![8]),
            ]
        );
    }
}
