//! `hook [ROUNDS]`: what the Claude Code hook adds to every Bash call of a session, as the
//! wall time of one `buildpool hook claude` process (start, read the event, answer, exit),
//! for commands it rewrites and for commands it passes through.

use std::time::Instant;

use anyhow::bail;
use buildpool_tests::{Fixture, bash_event, run_hook};

/// Commands typed in the fixture's worktree, and whether the hook rewrites each.
const CASES: &[(&str, bool)] = &[
    ("RUST_BACKTRACE=1 cargo test -p app -- --nocapture", true),
    ("cd crates/util && cargo clippy --all-targets", true),
    ("cargo test 2>&1 | tail -20", false),
    ("git status", false),
];

pub fn hook(rounds: usize) -> anyhow::Result<()> {
    let fixture = Fixture::new()?;
    let root = fixture.root();
    println!("buildpool hook claude, {rounds} calls per command:");
    for &(command, rewrites) in CASES {
        let event = bash_event(command, &root);
        let mut samples = Vec::with_capacity(rounds);
        // One call first, so the binary is in the page cache like a session's later calls.
        for round in 0..=rounds {
            let started = Instant::now();
            let out = run_hook(&event, &[])?;
            let elapsed = started.elapsed();
            if out.code != Some(0) || out.stdout.is_empty() == rewrites {
                bail!("unexpected answer to {command:?}: {out}");
            }
            if round > 0 {
                samples.push(elapsed);
            }
        }
        let min = samples.iter().min().copied().unwrap_or_default();
        let max = samples.iter().max().copied().unwrap_or_default();
        println!(
            "  {}: median {:.2} ms (min {:.2}, max {:.2}) for {command:?}",
            if rewrites { "rewrite" } else { "pass-through" },
            super::ms(super::median(samples)),
            super::ms(min),
            super::ms(max),
        );
    }
    Ok(())
}
