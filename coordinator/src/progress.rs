//! The one-line progress `buildpool run` keeps at the bottom of a terminal: queued, then
//! assigned to AGENT, compiling N/M crates, testing.
//!
//! Pure: it follows the job's events and cargo's output (line by line, bounded) and says
//! what the line reads; `run` draws it. cargo prints no progress bar when its output is not
//! a terminal (on the agent it never is), so crates are counted from its `Compiling`
//! lines, against the packages of the worktree's `Cargo.lock` (an upper bound: fresh and
//! other platforms' crates are never compiled).

/// Longest partial line kept while waiting for its end; longer lines are not progress.
const MAX_LINE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Starting,
    Queued { reason: String },
    Assigned { agent: String },
    Compiling { done: usize },
    Testing { binaries: usize },
}

/// What the progress line reads, as events and output arrive.
#[derive(Debug)]
pub struct Progress {
    phase: Phase,
    /// Packages in the worktree's lockfile; 0 when unknown.
    crates: usize,
    partial: Vec<u8>,
}

impl Progress {
    /// `crates`: packages in the worktree's `Cargo.lock`, 0 if unknown.
    pub fn new(crates: usize) -> Self {
        Self {
            phase: Phase::Starting,
            crates,
            partial: Vec::new(),
        }
    }

    pub fn queued(&mut self, reason: &str) {
        self.phase = Phase::Queued {
            reason: reason.to_owned(),
        };
    }

    pub fn assigned(&mut self, agent: &str) {
        self.phase = Phase::Assigned {
            agent: agent.to_owned(),
        };
    }

    /// Follows cargo's output (either stream).
    pub fn output(&mut self, data: &[u8]) {
        for &byte in data {
            if byte == b'\n' {
                let line = std::mem::take(&mut self.partial);
                self.line(&String::from_utf8_lossy(&line));
            } else if self.partial.len() < MAX_LINE {
                self.partial.push(byte);
            }
        }
    }

    fn line(&mut self, line: &str) {
        let line = line.trim_start();
        if line.starts_with("Compiling ") || line.starts_with("Checking ") {
            let done = match self.phase {
                Phase::Compiling { done } => done + 1,
                _ => 1,
            };
            self.phase = Phase::Compiling { done };
        } else if line.starts_with("Running ") || line.starts_with("Doc-tests ") {
            let binaries = match self.phase {
                Phase::Testing { binaries } => binaries + 1,
                _ => 1,
            };
            self.phase = Phase::Testing { binaries };
        }
    }

    /// The line as it reads now.
    pub fn render(&self) -> String {
        let text = match &self.phase {
            Phase::Starting => "starting".to_owned(),
            Phase::Queued { reason } if reason.is_empty() => "queued".to_owned(),
            Phase::Queued { reason } => format!("queued ({reason})"),
            Phase::Assigned { agent } => format!("assigned to {agent}"),
            Phase::Compiling { done } if self.crates >= *done => {
                format!("compiling {done}/{} crates", self.crates)
            }
            Phase::Compiling { done } => format!("compiling {done} crates"),
            Phase::Testing { binaries: 1 } => "testing".to_owned(),
            Phase::Testing { binaries } => format!("testing (test binary {binaries})"),
        };
        format!("[buildpool] {text}")
    }
}

/// Packages in a `Cargo.lock`'s text.
pub fn lockfile_packages(lockfile: &str) -> usize {
    lockfile
        .lines()
        .filter(|line| line.trim() == "[[package]]")
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_follows_queue_assignment_compilation_and_tests() {
        let mut progress = Progress::new(3);
        assert_eq!(progress.render(), "[buildpool] starting");
        progress.queued("all 2 agent slots busy");
        assert_eq!(
            progress.render(),
            "[buildpool] queued (all 2 agent slots busy)"
        );
        progress.assigned("worker-1");
        assert_eq!(progress.render(), "[buildpool] assigned to worker-1");
        progress.output(b"   Compiling util v0.1.0 (/build/repo/crates/util)\n   Compi");
        assert_eq!(progress.render(), "[buildpool] compiling 1/3 crates");
        progress.output(b"ling app v0.1.0 (/build/repo/app)\n");
        assert_eq!(progress.render(), "[buildpool] compiling 2/3 crates");
        progress.output(b"    Finished `test` profile\n     Running unittests src/lib.rs\n");
        assert_eq!(progress.render(), "[buildpool] testing");
        progress.output(b"test a ... ok\n     Running tests/more.rs\n");
        assert_eq!(progress.render(), "[buildpool] testing (test binary 2)");
    }

    #[test]
    fn more_crates_than_the_lockfile_names_are_counted_without_a_total() {
        let mut progress = Progress::new(1);
        progress.output(b"Compiling a\nCompiling b\n");
        assert_eq!(progress.render(), "[buildpool] compiling 2 crates");
    }

    #[test]
    fn lockfile_packages_are_counted() {
        let lock = "version = 4\n\n[[package]]\nname = \"a\"\n\n[[package]]\nname = \"b\"\n";
        assert_eq!(lockfile_packages(lock), 2);
    }
}
