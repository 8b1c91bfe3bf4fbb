use std::time::Duration;

use buildpool_core::{Completion, JobEnd, JobKind, JobSpec};

use buildpool_proto::convert::submission_to_bytes;

use super::*;

fn submission(n: u32) -> Submission {
    let mut spec = JobSpec::new(JobKind::Test);
    spec.cargo_args = vec![format!("case{n}")];
    Submission {
        spec,
        commit: "a".repeat(40),
        git_ref: format!("refs/buildpool/snapshots/{n}"),
        worktree: "/w".to_owned(),
        base_commit: "b".repeat(40),
    }
}

fn result() -> JobResult {
    JobResult {
        completion: Completion::new(JobEnd::Exited { code: 3 }),
        agent_id: "a1".to_owned(),
        attempt: 2,
        local: false,
        queue_time: Duration::from_millis(40),
    }
}

#[tokio::test]
async fn jobs_survive_reopening_in_their_state_and_order() {
    let dir = tempfile::tempdir().expect("temp");
    let (store, loaded) = Store::open(dir.path()).expect("open");
    assert_eq!((loaded.unfinished.len(), loaded.highest_id), (0, 0));
    for id in [3, 4, 5] {
        store.submitted(
            id,
            &submission(id as u32),
            1000 + id,
            &dir.path().join(format!("{id}.log")),
        );
    }
    store.assigned(4, "a1", 1);
    store.assigned(5, "a1", 1);
    store.requeued(5, 1, 1);
    store.assigned(3, "a1", 2);
    store.finished(3, &result());
    store
        .committed_since(WritePosition(0))
        .await
        .expect("committed");
    drop(store);

    let (store, loaded) = Store::open(dir.path()).expect("reopen");
    assert_eq!(loaded.highest_id, 5);
    let summary: Vec<_> = loaded
        .unfinished
        .iter()
        .map(|job| {
            (
                job.job_id,
                job.attempt,
                job.lost_attempts,
                job.agent_id.clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![(4, 1, 0, Some("a1".to_owned())), (5, 1, 1, None)]
    );
    assert_eq!(loaded.unfinished[0].submission, submission(4));
    let (stored, log) = store.result(3).await.expect("read").expect("finished");
    assert_eq!(stored, result());
    assert_eq!(log, dir.path().join("3.log"));
    assert!(
        store.result(4).await.expect("read").is_none(),
        "not finished"
    );
}

/// Commits reach the database file itself while the store stays open, copied there by the
/// checkpoint thread; the writer would copy them itself only at 10,000 pages of log.
#[tokio::test]
async fn committed_jobs_are_checkpointed_into_the_database_off_the_writer() {
    let dir = tempfile::tempdir().expect("temp");
    let (store, _) = Store::open(dir.path()).expect("open");
    for id in 1..=3 {
        store.submitted(id, &submission(id as u32), 1000, &dir.path().join("x.log"));
    }
    store
        .committed_since(WritePosition(0))
        .await
        .expect("committed");
    let copies = tempfile::tempdir().expect("temp");
    let rows_in_the_database_file = || {
        // The database file alone, without its write-ahead log: what was checkpointed.
        let copy = copies
            .path()
            .join(format!("{}.db", buildpool_core::time::unix_millis()));
        std::fs::copy(store.path(), &copy).ok()?;
        Connection::open(&copy)
            .ok()?
            .query_row("SELECT count(*) FROM jobs", [], |row| row.get::<_, i64>(0))
            .ok()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while rows_in_the_database_file() != Some(3) {
        assert!(
            Instant::now() < deadline,
            "the commits never reached the database file (rows there: {:?})",
            rows_in_the_database_file()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(store);
}

#[tokio::test]
async fn a_corrupt_store_is_moved_aside_and_a_fresh_one_starts() {
    let dir = tempfile::tempdir().expect("temp");
    std::fs::write(dir.path().join(FILE_NAME), vec![0x5a; 8192]).expect("write");
    let (store, loaded) = Store::open(dir.path()).expect("open despite corruption");
    assert!(loaded.unfinished.is_empty());
    let aside: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("jobs.db.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    store.submitted(1, &submission(1), 1, &dir.path().join("1.log"));
    store
        .committed_since(WritePosition(0))
        .await
        .expect("the fresh store works");
}

#[test]
fn a_store_from_a_newer_coordinator_is_set_aside_not_misread() {
    let dir = tempfile::tempdir().expect("temp");
    let path = dir.path().join(FILE_NAME);
    let connection = Connection::open(&path).expect("create");
    connection
        .execute_batch("PRAGMA user_version = 99;")
        .expect("version");
    drop(connection);
    let (_store, loaded) = Store::open(dir.path()).expect("open");
    assert!(loaded.unfinished.is_empty());
    assert!(
        std::fs::read_dir(dir.path())
            .expect("list")
            .flatten()
            .any(|entry| entry
                .file_name()
                .to_string_lossy()
                .starts_with("jobs.db.corrupt-"))
    );
}

#[tokio::test]
async fn a_write_that_failed_is_never_reported_stored_whichever_transaction_it_was_in() {
    let dir = tempfile::tempdir().expect("temp");
    let (store, _) = Store::open(dir.path()).expect("open");
    let log = dir.path().join("1.log");
    store.submitted(1, &submission(1), 1, &log);
    store
        .committed_since(WritePosition(0))
        .await
        .expect("committed");
    // Another process takes the table away: the writer's next transaction fails.
    let intruder = Connection::open(dir.path().join(FILE_NAME)).expect("open");
    intruder
        .execute_batch("ALTER TABLE jobs RENAME TO jobs_aside")
        .expect("rename");
    let from = store.position();
    let second = store.submitted(2, &submission(2), 2, &log);
    // Waits until that transaction was tried, whatever came of it.
    store.settled().await.expect("the writer runs");
    intruder
        .execute_batch("ALTER TABLE jobs_aside RENAME TO jobs")
        .expect("rename back");
    // The submitter asks only now, so its barrier is in a later transaction, which
    // commits; what it asks about did not.
    let error = store
        .committed(second)
        .await
        .expect_err("job 2 was not stored");
    assert!(error.to_string().contains("no such table"), "{error}");
    let third = store.submitted(3, &submission(3), 3, &log);
    store.committed(third).await.expect("the store recovered");
    // Asked by position range, the failed write in it counts; asked by its own position,
    // a write that committed is not blamed for another.
    store
        .committed_since(from)
        .await
        .expect_err("job 2 is in the range");
    store.committed(third).await.expect("job 3 alone");
    drop(store);
    let (_store, loaded) = Store::open(dir.path()).expect("reopen");
    let ids: Vec<JobId> = loaded.unfinished.iter().map(|job| job.job_id).collect();
    assert_eq!(ids, [1, 3]);
}

#[tokio::test]
async fn reserved_job_ids_are_never_handed_out_again_after_reopening() {
    let dir = tempfile::tempdir().expect("temp");
    let (store, _) = Store::open(dir.path()).expect("open");
    // Ids are reserved before their jobs are stored (or even when they never are, as
    // when a coordinator crashes while a job it assigned is being stored).
    for id in 1..=200 {
        store.reserve_id(id).await.expect("reserved");
    }
    store.submitted(7, &submission(7), 7, &dir.path().join("7.log"));
    store.settled().await.expect("the writer runs");
    drop(store);
    let (store, loaded) = Store::open(dir.path()).expect("reopen");
    assert!(
        (200..=200 + RESERVED_AHEAD).contains(&loaded.highest_id),
        "{}",
        loaded.highest_id
    );
    // The next ids go on from there, and are reserved in turn.
    let next = loaded.highest_id + 1;
    store.reserve_id(next).await.expect("reserved");
    drop(store);
    let (_store, loaded) = Store::open(dir.path()).expect("reopen");
    assert!(loaded.highest_id >= next, "{}", loaded.highest_id);
}

#[tokio::test]
async fn an_id_whose_reservation_failed_is_refused_and_the_next_one_asks_again() {
    let dir = tempfile::tempdir().expect("temp");
    let (store, _) = Store::open(dir.path()).expect("open");
    let intruder = Connection::open(dir.path().join(FILE_NAME)).expect("open");
    intruder
        .execute_batch("ALTER TABLE job_ids RENAME TO job_ids_aside")
        .expect("rename");
    let error = store.reserve_id(1).await.expect_err("not reserved");
    assert!(error.to_string().contains("no such table"), "{error}");
    intruder
        .execute_batch("ALTER TABLE job_ids_aside RENAME TO job_ids")
        .expect("rename back");
    store
        .reserve_id(2)
        .await
        .expect("asked again, and reserved");
    drop(store);
    let (_store, loaded) = Store::open(dir.path()).expect("reopen");
    assert!(loaded.highest_id >= 2, "{}", loaded.highest_id);
}

#[tokio::test]
async fn a_version_1_store_gains_its_own_rows_and_reservations_and_keeps_its_jobs() {
    let dir = tempfile::tempdir().expect("temp");
    let path = dir.path().join(FILE_NAME);
    let old = Connection::open(&path).expect("create");
    old.execute_batch(&format!("{JOBS_TABLE} PRAGMA user_version = 1;"))
        .expect("the schema before `job_ids`");
    old.execute(
        "INSERT INTO jobs (id, submission, submitted_unix_ms, state, log_path)
         VALUES (41, ?1, 5, 'queued', '41.log')",
        [submission_to_bytes(submission(41))],
    )
    .expect("a queued job");
    old.execute(
        "INSERT INTO jobs (id, submission, submitted_unix_ms, state, log_path, result)
         VALUES (40, ?1, 4, 'finished', '40.log', ?2)",
        (
            submission_to_bytes(submission(40)),
            buildpool_proto::convert::result_to_bytes(result()),
        ),
    )
    .expect("a finished job");
    drop(old);
    let (store, loaded) = Store::open(dir.path()).expect("migrated");
    let ids: Vec<JobId> = loaded.unfinished.iter().map(|job| job.job_id).collect();
    assert_eq!((ids, loaded.highest_id), (vec![41], 41));
    // Version 1 kept the control API's messages; they read back the same from the store's
    // own rows.
    assert_eq!(loaded.unfinished[0].submission, submission(41));
    let (finished, log) = store.result(40).await.expect("read").expect("kept");
    assert_eq!((finished, log), (result(), PathBuf::from("40.log")));
    store.reserve_id(42).await.expect("reserved");
    drop(store);
    let (_store, loaded) = Store::open(dir.path()).expect("reopen");
    assert!(loaded.highest_id > 42, "{}", loaded.highest_id);
}

#[tokio::test]
async fn a_reservation_that_failed_while_nobody_waited_does_not_refuse_a_later_id() {
    let dir = tempfile::tempdir().expect("temp");
    let (store, _) = Store::open(dir.path()).expect("open");
    store.reserve_id(1).await.expect("reserved");
    // Ids reserved; the next reservation is asked for ahead, with nobody waiting for it,
    // and fails.
    let intruder = Connection::open(dir.path().join(FILE_NAME)).expect("open");
    intruder
        .execute_batch("ALTER TABLE job_ids RENAME TO job_ids_aside")
        .expect("rename");
    let first = lock(&store.requested).0;
    let mut id = 2;
    while lock(&store.requested).0 == first {
        store.reserve_id(id).await.expect("still covered");
        id += 1;
    }
    store.settled().await.expect("the writer runs");
    intruder
        .execute_batch("ALTER TABLE job_ids_aside RENAME TO job_ids")
        .expect("rename back");
    // The store works again: ids past what was reserved are reserved afresh, not refused
    // for the reservation that failed before.
    let beyond = store.reserved.load(Ordering::Acquire) + 1;
    store.reserve_id(beyond).await.expect("reserved afresh");
    drop(store);
    let (_store, loaded) = Store::open(dir.path()).expect("reopen");
    assert!(loaded.highest_id >= beyond, "{}", loaded.highest_id);
}
