//! Threads for background file work, at a lower priority than the async workers.

/// How much nicer than the rest the coordinator's background writer threads are (see
/// [`spawn_background`]).
#[cfg(target_os = "linux")]
const BACKGROUND_NICER: i32 = 10;

/// Starts a thread for background file work (the job logs' writer, the job store's
/// checkpoints) at a lower priority than the tokio workers. Their work is queued to them
/// and can wait a little; the workers' cannot: a submission is dispatched, a frame sent, by
/// a worker. On a busy two-core machine the job logs' writer (a sixth of the coordinator's
/// CPU at 5,000 jobs a second: a file per job) taking the CPU from the workers was a large
/// part of the p99 submit-to-assign (`bench scale`: 3.9-4.0 ms with this, 4.2-5.1 ms
/// without). The price is paid only when other programs keep every CPU busy: then output
/// reaches followers, and so a job's end its client, a few milliseconds later. The store's
/// writer is not one of these: answers to submissions and acknowledgements of results wait
/// for its commits. Linux keeps nice values per thread and raising one needs no privilege
/// (a coordinator started niced stays below: 10 more, at most 19); elsewhere the thread
/// keeps the process's priority.
pub(crate) fn spawn_background(
    name: &str,
    work: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            // Who 0 is the calling thread on Linux; best effort.
            #[cfg(target_os = "linux")]
            if let Ok(nice) = rustix::process::getpriority_process(None) {
                let _ = rustix::process::setpriority_process(None, nicer(nice));
            }
            work();
        })
}

/// The nice value of a background thread started by one at `nice`.
#[cfg(target_os = "linux")]
fn nicer(nice: i32) -> i32 {
    (nice + BACKGROUND_NICER).min(19)
}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn background_threads_run_at_a_lower_priority_than_the_rest() {
        let own = rustix::process::getpriority_process(None).expect("own priority");
        let background = super::spawn_background("test-background", move || {
            let nice = rustix::process::getpriority_process(None).expect("priority");
            assert_eq!(nice, super::nicer(own));
            assert!(own == 19 || nice > own, "{nice} is not below {own}");
        })
        .expect("spawns")
        .join();
        assert!(background.is_ok(), "the background thread's check failed");
        assert_eq!(
            rustix::process::getpriority_process(None).expect("own priority"),
            own,
            "only the background thread was lowered"
        );
    }
}
