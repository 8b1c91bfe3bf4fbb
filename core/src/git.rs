//! Running `git` with a deadline and a clear error.
//!
//! Shared by the agent's git cache and the coordinator's snapshots and git daemon, so every git call in
//! buildpool runs without hooks, without prompts and with a time limit.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// Default deadline for local git operations.
pub const LOCAL_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("could not run git: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("`git {args}` timed out after {timeout:?}")]
    TimedOut { args: String, timeout: Duration },
    #[error("`git {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("`git {args}` wrote more than {limit} bytes")]
    TooLarge { args: String, limit: usize },
}

/// A git invocation under construction.
pub struct Git {
    command: tokio::process::Command,
    display: String,
    timeout: Duration,
    /// What git reads on its standard input; `None`: nothing (stdin is /dev/null).
    input: Option<Vec<u8>>,
}

/// Shows the arguments only: the environment may hold a credential (the git tunnel's).
impl std::fmt::Debug for Git {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Git")
            .field("args", &self.display)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Git {
    /// `git -C dir ...`, with hooks disabled and terminal prompts off.
    pub fn new(dir: &Path) -> Self {
        let mut command = tokio::process::Command::new("git");
        command
            .arg("-C")
            .arg(dir)
            .args(["-c", "core.hooksPath=/dev/null"])
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_AUTHOR_NAME", "buildpool")
            .env("GIT_AUTHOR_EMAIL", "buildpool@localhost")
            .env("GIT_COMMITTER_NAME", "buildpool")
            .env("GIT_COMMITTER_EMAIL", "buildpool@localhost")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        Self {
            command,
            display: String::new(),
            timeout: LOCAL_TIMEOUT,
            input: None,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        let arg = arg.as_ref();
        if !self.display.is_empty() {
            self.display.push(' ');
        }
        self.display.push_str(&arg.to_string_lossy());
        self.command.arg(arg);
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(self, args: I) -> Self {
        args.into_iter().fold(self, Self::arg)
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Gives git `input` on its standard input, e.g. the commands of `update-ref --stdin`,
    /// so many changes cost one process.
    pub fn input(mut self, input: impl Into<Vec<u8>>) -> Self {
        self.command.stdin(Stdio::piped());
        self.input = Some(input.into());
        self
    }

    /// Spawns git, feeds it its input while collecting its output, and waits for it.
    async fn run(&mut self) -> std::io::Result<std::process::Output> {
        let mut child = self.command.spawn()?;
        let stdin = child.stdin.take();
        let input = self.input.take();
        let feed = async move {
            if let (Some(mut stdin), Some(input)) = (stdin, input) {
                // A git that exits early closes the pipe; its exit status says why.
                let _ = tokio::io::AsyncWriteExt::write_all(&mut stdin, &input).await;
            }
        };
        let ((), output) = tokio::join!(feed, child.wait_with_output());
        output
    }

    /// Runs git and returns its stdout with the trailing newline removed.
    pub async fn output(mut self) -> Result<String, GitError> {
        let timeout = self.timeout;
        let output = match tokio::time::timeout(timeout, self.run()).await {
            Ok(result) => result.map_err(GitError::Spawn)?,
            Err(_) => {
                return Err(GitError::TimedOut {
                    args: self.display,
                    timeout: self.timeout,
                });
            }
        };
        if output.status.success() {
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            while text.ends_with('\n') {
                text.pop();
            }
            Ok(text)
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
            let stderr = if stderr.is_empty() {
                format!("exit status {}", output.status)
            } else {
                stderr
            };
            Err(GitError::Failed {
                args: self.display,
                stderr,
            })
        }
    }

    /// Runs git and returns its standard output as bytes, at most `limit` of them: git is
    /// killed as soon as it writes more, and that is an error.
    pub async fn output_bytes(mut self, limit: usize) -> Result<Vec<u8>, GitError> {
        use tokio::io::AsyncReadExt;
        let run = async {
            let mut child = self.command.spawn()?;
            let (stdin, stdout, stderr) =
                (child.stdin.take(), child.stdout.take(), child.stderr.take());
            let input = self.input.take();
            let feed = async move {
                if let (Some(mut stdin), Some(input)) = (stdin, input) {
                    // A git that exits early closes the pipe; its exit status says why.
                    let _ = tokio::io::AsyncWriteExt::write_all(&mut stdin, &input).await;
                }
            };
            // Git is stopped as soon as it overflows: it would block on the full pipe, and
            // its standard error would never end.
            let read_stdout = async {
                let mut bytes = Vec::new();
                if let Some(stdout) = stdout {
                    stdout
                        .take(limit as u64 + 1)
                        .read_to_end(&mut bytes)
                        .await?;
                }
                if bytes.len() > limit {
                    child.start_kill()?;
                }
                std::io::Result::Ok(bytes)
            };
            let read_stderr = async move {
                let mut bytes = Vec::new();
                if let Some(mut stderr) = stderr {
                    stderr.read_to_end(&mut bytes).await?;
                }
                std::io::Result::Ok(bytes)
            };
            let ((), stdout, stderr) = tokio::join!(feed, read_stdout, read_stderr);
            let (stdout, stderr) = (stdout?, stderr?);
            if stdout.len() > limit {
                child.wait().await?;
                return Ok(None);
            }
            let status = child.wait().await?;
            std::io::Result::Ok(Some((status, stdout, stderr)))
        };
        let (status, stdout, stderr) = match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(Some(output))) => output,
            Ok(Ok(None)) => {
                return Err(GitError::TooLarge {
                    args: self.display,
                    limit,
                });
            }
            Ok(Err(error)) => return Err(GitError::Spawn(error)),
            Err(_) => {
                return Err(GitError::TimedOut {
                    args: self.display,
                    timeout: self.timeout,
                });
            }
        };
        if status.success() {
            return Ok(stdout);
        }
        let stderr = String::from_utf8_lossy(&stderr).trim().to_owned();
        Err(GitError::Failed {
            args: self.display,
            stderr: if stderr.is_empty() {
                format!("exit status {status}")
            } else {
                stderr
            },
        })
    }

    /// Runs git and reports only whether it succeeded.
    pub async fn succeeds(self) -> bool {
        self.output().await.is_ok()
    }
}

/// Whether `part` is one component of a ref name as buildpool makes them (letters, digits,
/// `-`, `_`): a name it may write or read as a file itself, where anything else goes to git.
pub fn is_plain_ref_component(part: &str) -> bool {
    !part.is_empty()
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Writes the ref `name` of the repository `git_dir` as git writes a loose ref: its lock
/// file, taken exclusively as git takes it, renamed into place (one git process less than
/// `update-ref`). The caller knows the files ref storage is in use and the directory is
/// there.
pub fn write_loose_ref(git_dir: &Path, name: &str, id: &str) -> std::io::Result<()> {
    use std::io::Write;
    let path = git_dir.join(name);
    let lock = git_dir.join(format!("{name}.lock"));
    let mut file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(&lock)?;
    let written = file
        .write_all(format!("{id}\n").as_bytes())
        .and_then(|()| std::fs::rename(&lock, &path));
    if written.is_err() {
        let _ = std::fs::remove_file(&lock);
    }
    written
}

/// Where the object `id` lies as a loose object of the repository whose object store is
/// `<git_dir>/objects`; `None` for what is no object id.
pub fn loose_object_path(git_dir: &Path, id: &str) -> Option<PathBuf> {
    if !is_object_id(id) {
        return None;
    }
    let (fan_out, rest) = id.split_at(2);
    Some(git_dir.join("objects").join(fan_out).join(rest))
}

/// Whether the object `id` is a loose object of the repository `git_dir`: a stat instead
/// of a git process. `false` says nothing: the object may be packed, or stored elsewhere.
pub fn has_loose_object(git_dir: &Path, id: &str) -> bool {
    loose_object_path(git_dir, id).is_some_and(|path| path.is_file())
}

/// Whether `text` is a full hexadecimal object id.
pub fn is_object_id(text: &str) -> bool {
    matches!(text.len(), 40 | 64) && text.bytes().all(|b| b.is_ascii_hexdigit())
}
