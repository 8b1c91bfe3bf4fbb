//! The coordinator's durable job table: SQLite (`jobs.db` in `<common git dir>/buildpool/`).
//!
//! Why SQLite: one file, transactions that survive `kill -9` and never leave it corrupt, a
//! versioned schema (`PRAGMA user_version`), and a library compiled in (`bundled`), so
//! nothing to install or run beside the coordinator. WAL mode lets the read connection
//! (results for clients that come back) work while the writer commits.
//!
//! Durable means: against the coordinator's crash, `kill -9` or upgrade. A commit is in
//! the write-ahead log, in the operating system's hands, before it returns
//! (`synchronous = NORMAL`); it is not flushed to the device each time. Flushing would cost
//! every submission an fsync, and an fsync waits for whatever else the machine is writing:
//! after a local build it takes 5 to 70 ms (`bench crate`), against under 1 ms without. What
//! that gives
//! up is the last commits when the machine itself loses power; the clients on it are gone
//! then too, and an agent whose acknowledged result was lost sees its job run again.
//!
//! The scheduler stays pure: the state mutex's holder only *queues* a write here (an
//! unbounded channel, never I/O under the lock); one writer thread owns the write connection
//! and commits whatever queued up in one transaction. Where an acknowledgement must mean
//! "stored" (a submission before the client hears of its job, a result before the agent's
//! `ResultAck`), the caller waits for the write by its position in the queue:
//! [`Store::committed`] for a write whose position it has (a submission),
//! [`Store::committed_since`] for the writes since a position it noted (a result, queued
//! inside a scheduler step). Either answers once everything queued before is committed,
//! and with an error if such a write failed, in whichever transaction it was.
//!
//! Checkpoints (copying the write-ahead log into the database, with its flushes to the
//! device) run on a thread of their own with their own connection, every half second. On
//! the writer's thread, every 1,000 pages of log as SQLite does by default, a checkpoint's
//! flushes took 20 to 50 ms every half second at a thousand jobs a second, and every
//! submission waiting on a barrier meanwhile waited for them too. The writer still
//! checkpoints once the log holds 10,000 pages: the log starts over only when all of it was
//! copied as a transaction begins, which a steady stream of commits rarely allows. That is
//! a wait of 4 to 6 ms every two seconds or so at five thousand jobs a second. The log file
//! then keeps its size (it is cut back only beyond 64 MB): cutting it back to 16 MB each
//! time frees 25 MB of blocks inside the writer's next commit, which then takes 10 to 12 ms
//! more, and every submission waiting on a barrier meanwhile waits too.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use buildpool_core::status::Submission;
use buildpool_core::{JobId, JobResult};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

mod rows;

/// The schema this coordinator writes; older ones are migrated up at opening.
const SCHEMA_VERSION: i64 = 2;
const FILE_NAME: &str = "jobs.db";
/// Finished jobs whose results are kept (twice the logs kept, so every kept log has one).
const KEPT_RESULTS: i64 = 2 * super::joblog::KEPT_LOGS as i64;
/// Finished jobs between two prunings of old results.
const PRUNE_EVERY: u64 = 256;
/// Job ids reserved ahead of use (see [`Store::reserve_id`]), and so at most skipped after
/// a restart: a reservation is asked for when fewer than half of these are left.
const RESERVED_AHEAD: JobId = 256;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("the job store's writer stopped")]
    Stopped,
    /// A write that failed, as the writer reported it (naming the store).
    #[error("{0}")]
    Failed(String),
    #[error("job store: {0}")]
    Write(String),
}

/// A job that had not ended when the coordinator stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredJob {
    pub job_id: JobId,
    pub submission: Submission,
    pub submitted_unix_ms: u64,
    /// The last attempt the store saw assigned.
    pub attempt: u32,
    pub lost_attempts: u32,
    /// The agent running the last attempt; `None` while queued.
    pub agent_id: Option<String>,
}

/// What the store held at opening.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Unfinished jobs in submission order.
    pub unfinished: Vec<StoredJob>,
    /// The highest job id ever stored or reserved (ids never repeat).
    pub highest_id: JobId,
}

enum Command {
    Submitted {
        job_id: JobId,
        submission: String,
        submitted_unix_ms: u64,
        log_path: String,
    },
    Assigned {
        job_id: JobId,
        agent_id: String,
        attempt: u32,
    },
    Requeued {
        job_id: JobId,
        attempt: u32,
        lost_attempts: u32,
    },
    Finished {
        job_id: JobId,
        result: String,
        finished_unix_ms: u64,
    },
    /// Job ids through `through` are taken.
    ReserveIds { through: JobId },
    /// Answered once everything queued before it was tried: an error if a write at a
    /// position from `from` up to `until` (else up to the barrier) failed.
    Barrier {
        from: WritePosition,
        until: Option<WritePosition>,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// A place in the store's queue, counted in commands queued since it opened. A caller notes
/// it before its writes and asks [`Store::committed_since`] after them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct WritePosition(u64);

/// The durable job table: a queue to the writer thread and a read connection.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    /// The queue to the writer, and the position of the next command in it: both under
    /// one lock, so a position names exactly one command.
    writes: std::sync::Mutex<(mpsc::Sender<Command>, u64)>,
    reader: std::sync::Arc<std::sync::Mutex<Connection>>,
    /// Job ids through this one are committed as taken (the writer raises it).
    reserved: std::sync::Arc<AtomicU64>,
    /// The latest reservation asked for: through which id, and its write.
    requested: std::sync::Mutex<(JobId, WritePosition)>,
    /// Dropped with the store, which ends the checkpoint thread.
    _checkpoints: mpsc::Sender<()>,
}

impl Store {
    /// Opens (or creates) the store in `state_dir` and reads the unfinished jobs. A store
    /// that is corrupt, unreadable or from a newer schema is moved aside
    /// (`jobs.db.corrupt-<unix ms>`) with a warning and a fresh one started: a damaged file
    /// must never keep the coordinator from starting.
    pub fn open(state_dir: &Path) -> Result<(Self, Loaded), StoreError> {
        let path = state_dir.join(FILE_NAME);
        let (writer, loaded) = match open_and_load(&path) {
            Ok(opened) => opened,
            Err(error) => {
                let aside = state_dir.join(format!(
                    "{FILE_NAME}.corrupt-{}",
                    buildpool_core::time::unix_millis()
                ));
                tracing::warn!(
                    "the job store {} cannot be used ({error}); moved it to {} and starting \
                     with an empty one: jobs queued or running before are not resumed",
                    path.display(),
                    aside.display()
                );
                move_aside(&path, &aside);
                open_and_load(&path)?
            }
        };
        let reader = Connection::open(&path).map_err(|source| sqlite(&path, source))?;
        let checkpointer = Connection::open(&path).map_err(|source| sqlite(&path, source))?;
        checkpointer
            .busy_timeout(CHECKPOINT_EVERY)
            .map_err(|source| sqlite(&path, source))?;
        let written = std::sync::Arc::new(AtomicBool::new(false));
        let (checkpoints, stop) = mpsc::channel();
        let thread_path = path.clone();
        let thread_written = std::sync::Arc::clone(&written);
        super::threads::spawn_background("job-store-wal", move || {
            checkpoint_loop(&thread_path, &checkpointer, &thread_written, &stop);
        })
        .map_err(|e| StoreError::Write(e.to_string()))?;
        let (writes, commands) = mpsc::channel();
        let thread_path = path.clone();
        let reserved = std::sync::Arc::new(AtomicU64::new(loaded.highest_id));
        let thread_reserved = std::sync::Arc::clone(&reserved);
        // At the workers' priority: submissions' answers and results' acknowledgements wait
        // for its commits (see `super::threads::spawn_background`).
        std::thread::Builder::new()
            .name("job-store".to_owned())
            .spawn(move || {
                write_loop(&thread_path, &writer, &commands, &written, &thread_reserved);
            })
            .map_err(|e| StoreError::Write(e.to_string()))?;
        Ok((
            Self {
                path,
                writes: std::sync::Mutex::new((writes, 0)),
                reader: std::sync::Arc::new(std::sync::Mutex::new(reader)),
                requested: std::sync::Mutex::new((loaded.highest_id, WritePosition(0))),
                reserved,
                _checkpoints: checkpoints,
            },
            loaded,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues `command`; its position.
    fn queue(&self, command: Command) -> WritePosition {
        let mut writes = lock(&self.writes);
        let (sender, next) = &mut *writes;
        let position = WritePosition(*next);
        *next += 1;
        // The writer outlives every sender but the last; a send can fail only at exit.
        let _ = sender.send(command);
        position
    }

    /// Where the next write goes in the queue: note it before writes whose commit you will
    /// wait for with [`Store::committed_since`].
    pub fn position(&self) -> WritePosition {
        WritePosition(lock(&self.writes).1)
    }

    /// Returns once job ids through `id` are committed as taken, so that `id` is never
    /// handed out again, even after a crash that lost its job's own write: a job is
    /// assigned while that write is being committed, and an agent may run it under that
    /// id meanwhile. Ids are reserved [`RESERVED_AHEAD`] at a time, asked for while half
    /// are left: only the first id after opening, or one that outran its reservation,
    /// waits for a commit.
    ///
    /// What counts is what the writer committed (`reserved`), never a barrier's answer
    /// alone: the reservation waited on may have failed with nobody waiting (it was asked
    /// for ahead) or long ago, and a later one may have covered `id` meanwhile. An id the
    /// latest reservation did not cover gets one fresh reservation of its own.
    pub async fn reserve_id(&self, id: JobId) -> Result<(), StoreError> {
        let reserved = || id <= self.reserved.load(Ordering::Acquire);
        let latest = self.request_ids(id, false);
        if reserved() {
            return Ok(());
        }
        // The latest reservation covers `id`: it is at least half a reservation ahead.
        let _ = self.committed(latest).await;
        if reserved() {
            return Ok(());
        }
        self.committed(self.request_ids(id, true)).await?;
        if reserved() {
            Ok(())
        } else {
            Err(StoreError::Failed(format!(
                "job store {}: job id {id} could not be reserved",
                self.path.display()
            )))
        }
    }

    /// The write of the latest reservation of job ids, asked for now when `fresh` or when
    /// fewer than half a reservation is left beyond `id`.
    fn request_ids(&self, id: JobId, fresh: bool) -> WritePosition {
        let mut requested = lock(&self.requested);
        if fresh || requested.0 < id + RESERVED_AHEAD / 2 {
            let through = id + RESERVED_AHEAD;
            *requested = (through, self.queue(Command::ReserveIds { through }));
        }
        requested.1
    }

    /// Records a new job (queued); the write's position, for [`Store::committed`].
    pub fn submitted(
        &self,
        job_id: JobId,
        submission: &Submission,
        submitted_unix_ms: u64,
        log_path: &Path,
    ) -> WritePosition {
        self.queue(Command::Submitted {
            job_id,
            submission: rows::submission_to_text(submission),
            submitted_unix_ms,
            log_path: log_path.display().to_string(),
        })
    }

    pub fn assigned(&self, job_id: JobId, agent_id: &str, attempt: u32) {
        let _ = self.queue(Command::Assigned {
            job_id,
            agent_id: agent_id.to_owned(),
            attempt,
        });
    }

    pub fn requeued(&self, job_id: JobId, attempt: u32, lost_attempts: u32) {
        let _ = self.queue(Command::Requeued {
            job_id,
            attempt,
            lost_attempts,
        });
    }

    pub fn finished(&self, job_id: JobId, result: &JobResult) {
        let _ = self.queue(Command::Finished {
            job_id,
            result: rows::result_to_text(result),
            finished_unix_ms: buildpool_core::time::unix_millis(),
        });
    }

    /// Waits until every write queued before this call is committed; an error if one queued
    /// since `from` failed (its transaction rolled back), whichever transaction it was in.
    ///
    /// Why a position and not just the barrier's own transaction: a write and the barrier
    /// queued right after it can land in two transactions, and the first can fail while
    /// the second commits. The barrier would then say "stored" of a write that was not.
    /// Others' writes queued in the window count too: where the caller knows its write's
    /// position, [`Store::committed`] asks about that one alone.
    pub async fn committed_since(&self, from: WritePosition) -> Result<(), StoreError> {
        self.barrier(from, None).await
    }

    /// Waits until the write at `write` (and everything before it) is tried; an error if it
    /// failed.
    pub async fn committed(&self, write: WritePosition) -> Result<(), StoreError> {
        self.barrier(write, Some(WritePosition(write.0 + 1))).await
    }

    /// Waits until every write queued before this call was tried, whatever came of it (the
    /// writer logs a failure); only an error if the writer stopped.
    pub async fn settled(&self) -> Result<(), StoreError> {
        match self.barrier(self.position(), None).await {
            Err(StoreError::Stopped) => Err(StoreError::Stopped),
            _ => Ok(()),
        }
    }

    async fn barrier(
        &self,
        from: WritePosition,
        until: Option<WritePosition>,
    ) -> Result<(), StoreError> {
        let (done, committed) = oneshot::channel();
        let _ = self.queue(Command::Barrier { from, until, done });
        committed
            .await
            .map_err(|_| StoreError::Stopped)?
            .map_err(StoreError::Failed)
    }

    /// A finished job's result and log file, if the store still has them.
    pub async fn result(&self, job_id: JobId) -> Result<Option<(JobResult, PathBuf)>, StoreError> {
        let reader = std::sync::Arc::clone(&self.reader);
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let connection = lock(&reader);
            let row: Option<(String, String)> = connection
                .query_row(
                    "SELECT result, log_path FROM jobs WHERE id = ?1 AND state = 'finished'",
                    [job_id as i64],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()
                .map_err(|source| sqlite(&path, source))?;
            row.map(|(text, log)| {
                rows::result_from_text(&text)
                    .map(|result| (result, PathBuf::from(log)))
                    .map_err(|e| StoreError::Write(format!("stored result of job {job_id}: {e}")))
            })
            .transpose()
        })
        .await
        .map_err(|_| StoreError::Stopped)?
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn sqlite(path: &Path, source: rusqlite::Error) -> StoreError {
    StoreError::Sqlite {
        path: path.to_owned(),
        source,
    }
}

/// Moves the database and its WAL files aside; a missing file is no error.
fn move_aside(path: &Path, aside: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", path.display()));
        let to = PathBuf::from(format!("{}{suffix}", aside.display()));
        if from.exists()
            && let Err(error) = std::fs::rename(&from, &to)
        {
            tracing::warn!("cannot move {} aside: {error}", from.display());
            let _ = std::fs::remove_file(&from);
        }
    }
}

/// Opens the write connection, checks and migrates the schema, and reads what is unfinished.
fn open_and_load(path: &Path) -> Result<(Connection, Loaded), StoreError> {
    let err = |source| sqlite(path, source);
    let connection = Connection::open(path).map_err(err)?;
    // WAL: readers do not block the writer. NORMAL: a commit survives the coordinator's
    // crash before it returns, and the device is flushed at checkpoints (module docs).
    let mode: String = connection
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(
            "the job store runs in {mode} journal mode (WAL unavailable on this filesystem)"
        );
    }
    // The checkpoint thread copies the log into the database. The log starts over only
    // when everything in it was copied as a transaction begins, which under a steady stream
    // of commits can take long; so the writer checkpoints itself (and the log starts over)
    // once it holds 10,000 pages (40 MB). The file is reused at that size, not cut back
    // (module docs); only a log that grew past 64 MB (a long reader) is.
    connection
        .execute_batch(
            "PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;
             PRAGMA wal_autocheckpoint = 10000; PRAGMA journal_size_limit = 67108864;",
        )
        .map_err(err)?;
    let check: String = connection
        .query_row("PRAGMA quick_check", [], |row| row.get(0))
        .map_err(err)?;
    if check != "ok" {
        return Err(StoreError::Write(format!("integrity check: {check}")));
    }
    migrate(&connection).map_err(err)?;
    let loaded = load(&connection).map_err(err)?;
    Ok((connection, loaded))
}

/// The job table. Since version 2 its `submission` and `result` hold the store's own JSON
/// ([`rows`]); version 1 held the control API's protobuf messages there.
const JOBS_TABLE: &str = "
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        submission TEXT NOT NULL,
        submitted_unix_ms INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'finished')),
        attempt INTEGER NOT NULL DEFAULT 0,
        lost_attempts INTEGER NOT NULL DEFAULT 0,
        agent_id TEXT,
        result TEXT,
        log_path TEXT NOT NULL,
        finished_unix_ms INTEGER
    );
    CREATE INDEX jobs_unfinished ON jobs (state) WHERE state <> 'finished';";

/// Brings the schema to [`SCHEMA_VERSION`]; one step per version, each in a transaction.
fn migrate(connection: &Connection) -> rusqlite::Result<()> {
    let version: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "schema version {version} is newer than this coordinator's {SCHEMA_VERSION}"
        )));
    }
    if version < 1 {
        connection.execute_batch(&format!(
            "BEGIN; {JOBS_TABLE} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        ))?;
    } else if version == 1 {
        rows_from_protobuf(connection)?;
    }
    // Added to version 1 as a table older coordinators ignore (they then take ids past the
    // highest stored, as they always did), so that going back a version keeps the jobs: a
    // newer version number would have them move the whole store aside.
    connection.execute_batch(
        "CREATE TABLE IF NOT EXISTS job_ids (
             id INTEGER PRIMARY KEY CHECK (id = 0),
             reserved_through INTEGER NOT NULL
         );
         INSERT OR IGNORE INTO job_ids VALUES (0, 0);",
    )?;
    Ok(())
}

/// Version 1 to 2: each job's submission and result, stored as the control API's protobuf
/// messages, rewritten as the store's own JSON ([`rows`]), in one transaction. A row that
/// cannot be read is dropped with a warning, as loading would drop it.
fn rows_from_protobuf(connection: &Connection) -> rusqlite::Result<()> {
    use buildpool_proto::convert::{result_from_bytes, submission_from_bytes};
    let transaction = connection.unchecked_transaction()?;
    let stored: Vec<(i64, Vec<u8>, Option<Vec<u8>>)> = transaction
        .prepare("SELECT id, submission, result FROM jobs")?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (id, submission, result) in stored {
        let submission = submission_from_bytes(&submission).map_err(|e| e.to_string());
        let result = result
            .map(|bytes| result_from_bytes(&bytes).map_err(|e| e.to_string()))
            .transpose();
        match (submission, result) {
            (Ok(submission), Ok(result)) => transaction.execute(
                "UPDATE jobs SET submission = ?2, result = ?3 WHERE id = ?1",
                params![
                    id,
                    rows::submission_to_text(&submission),
                    result.as_ref().map(rows::result_to_text)
                ],
            )?,
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(job_id = id, "stored job cannot be read ({error}); dropped");
                transaction.execute("DELETE FROM jobs WHERE id = ?1", [id])?
            }
        };
    }
    transaction.execute_batch("PRAGMA user_version = 2;")?;
    transaction.commit()
}

fn load(connection: &Connection) -> rusqlite::Result<Loaded> {
    let highest_id: i64 = connection.query_row(
        "SELECT max(coalesce((SELECT max(id) FROM jobs), 0), reserved_through)
         FROM job_ids WHERE id = 0",
        [],
        |row| row.get(0),
    )?;
    let mut statement = connection.prepare(
        "SELECT id, submission, submitted_unix_ms, state, attempt, lost_attempts, agent_id
         FROM jobs WHERE state <> 'finished' ORDER BY id",
    )?;
    let rows = statement.query_map([], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, i64>(2)?,
            row.get::<_, String>(3)?,
            row.get::<_, u32>(4)?,
            row.get::<_, u32>(5)?,
            row.get::<_, Option<String>>(6)?,
        ))
    })?;
    let mut unfinished = Vec::new();
    for row in rows {
        let (id, text, submitted, state, attempt, lost_attempts, agent_id) = row?;
        match rows::submission_from_text(&text) {
            Ok(submission) => unfinished.push(StoredJob {
                job_id: id as JobId,
                submission,
                submitted_unix_ms: submitted as u64,
                attempt,
                lost_attempts,
                agent_id: agent_id.filter(|_| state == "running"),
            }),
            Err(error) => {
                tracing::warn!(job_id = id, "stored job cannot be read ({error}); dropped")
            }
        }
    }
    Ok(Loaded {
        unfinished,
        highest_id: highest_id as JobId,
    })
}

/// Least time from one commit's start to the next: a commit costs a write to the log, which
/// at thousands of jobs a second and a few changes per commit costs more than the changes. A
/// commit that would come sooner waits out the rest, gathering what arrives meanwhile; at
/// a low rate nothing waits.
const GROUP_COMMIT: Duration = Duration::from_millis(1);
/// Most changes in one commit.
const MAX_BATCH: usize = 4096;

/// How often the checkpoint thread copies what was committed into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// The checkpoint thread: every [`CHECKPOINT_EVERY`] that anything was committed, a passive
/// checkpoint (it neither waits for nor blocks the writer); one that could not copy all
/// it found (a reader still on older pages) or failed is tried again next time, so what
/// was committed reaches the database file even when nothing more comes. Ends when the
/// [`Store`] is dropped.
fn checkpoint_loop(
    path: &Path,
    connection: &Connection,
    written: &AtomicBool,
    stop: &mpsc::Receiver<()>,
) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        if !written.swap(false, Ordering::Relaxed) {
            continue;
        }
        // (blocked, pages in the log, pages copied); -1 pages when it could not start.
        let outcome = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, i64>(2)?,
            ))
        });
        let complete = match outcome {
            Ok((blocked, in_log, copied)) => blocked == 0 && copied >= in_log,
            Err(error) => {
                tracing::warn!("{}", sqlite(path, error));
                false
            }
        };
        if !complete {
            written.store(true, Ordering::Relaxed);
        }
    }
}

/// Failed transactions the writer remembers for barriers to come (the newest).
const REMEMBERED_FAILURES: usize = 1024;

/// The writes of a transaction that failed: positions `first..=last` (barriers between them
/// aside) and why.
struct Failure {
    first: u64,
    last: u64,
    error: String,
}

/// The writer thread: takes what queued up, commits it in one transaction, answers the
/// barriers among it. Ends when the [`Store`] is dropped.
fn write_loop(
    path: &Path,
    connection: &Connection,
    commands: &mpsc::Receiver<Command>,
    written: &AtomicBool,
    reserved: &AtomicU64,
) {
    let mut finished_since_prune = 0u64;
    let mut last_commit: Option<Instant> = None;
    // Commands received so far: the position of the next one, as `Store::position` counts.
    let mut received = 0u64;
    let mut failures: std::collections::VecDeque<Failure> = Default::default();
    while let Ok(first) = commands.recv() {
        let mut batch = vec![first];
        // One sleep, not a wake-up per change that arrives meanwhile.
        if let Some(left) =
            last_commit.and_then(|at| (at + GROUP_COMMIT).checked_duration_since(Instant::now()))
        {
            std::thread::sleep(left);
        }
        let room = MAX_BATCH.saturating_sub(batch.len());
        batch.extend(commands.try_iter().take(room));
        // A job that ended in this batch needs only its end: its assignment or requeue
        // before it would be overwritten in the same transaction.
        let ended: HashSet<JobId> = batch
            .iter()
            .filter_map(|command| match command {
                Command::Finished { job_id, .. } => Some(*job_id),
                _ => None,
            })
            .collect();
        let mut barriers = Vec::new();
        let mut writes = Vec::new();
        let mut reserving = None;
        let mut write_positions: Option<(u64, u64)> = None;
        for command in batch {
            let position = received;
            received += 1;
            if !matches!(command, Command::Barrier { .. }) {
                let first = write_positions.map_or(position, |(first, _)| first);
                write_positions = Some((first, position));
            }
            match command {
                Command::Barrier { from, until, done } => {
                    barriers.push((from, until.map_or(position, |until| until.0), done));
                }
                Command::Finished { .. } => {
                    finished_since_prune += 1;
                    writes.push(command);
                }
                Command::ReserveIds { through } => {
                    reserving = reserving.max(Some(through));
                    writes.push(command);
                }
                Command::Assigned { job_id, .. } | Command::Requeued { job_id, .. }
                    if ended.contains(&job_id) => {}
                write => writes.push(write),
            }
        }
        last_commit = Some(Instant::now());
        let prune = finished_since_prune >= PRUNE_EVERY;
        if prune {
            finished_since_prune = 0;
        }
        let outcome = commit(connection, &writes, prune).map_err(|error| {
            let error = sqlite(path, error).to_string();
            tracing::error!("{error}; {} change(s) not stored", writes.len());
            error
        });
        if let (Ok(()), Some(through)) = (&outcome, reserving) {
            reserved.fetch_max(through, Ordering::Release);
        }
        match (&outcome, write_positions) {
            (Ok(()), _) if !writes.is_empty() => written.store(true, Ordering::Relaxed),
            (Err(error), Some((first, last))) => {
                if failures.len() == REMEMBERED_FAILURES {
                    failures.pop_front();
                }
                failures.push_back(Failure {
                    first,
                    last,
                    error: error.clone(),
                });
            }
            _ => {}
        }
        for (WritePosition(from), until, done) in barriers {
            // Newest first, and their positions only fall: stop at the first one wholly
            // before the window.
            let failed = failures
                .iter()
                .rev()
                .take_while(|failure| failure.last >= from)
                .find(|failure| failure.first < until);
            let _ = done.send(failed.map_or(Ok(()), |failure| Err(failure.error.clone())));
        }
    }
}

fn commit(connection: &Connection, writes: &[Command], prune: bool) -> rusqlite::Result<()> {
    if writes.is_empty() {
        return Ok(());
    }
    connection.execute_batch("BEGIN IMMEDIATE")?;
    let applied = apply(connection, writes, prune);
    // A failed COMMIT can leave the transaction open; every later BEGIN would fail too.
    match applied.and_then(|()| connection.execute_batch("COMMIT")) {
        Ok(()) => Ok(()),
        Err(error) => {
            let _ = connection.execute_batch("ROLLBACK");
            Err(error)
        }
    }
}

fn apply(connection: &Connection, writes: &[Command], prune: bool) -> rusqlite::Result<()> {
    for write in writes {
        match write {
            Command::Submitted {
                job_id,
                submission,
                submitted_unix_ms,
                log_path,
            } => {
                connection
                    .prepare_cached(
                        "INSERT OR REPLACE INTO jobs (id, submission, submitted_unix_ms, state, log_path)
                         VALUES (?1, ?2, ?3, 'queued', ?4)",
                    )?
                    .execute(params![
                        *job_id as i64,
                        submission,
                        *submitted_unix_ms as i64,
                        log_path
                    ])?;
            }
            Command::Assigned {
                job_id,
                agent_id,
                attempt,
            } => {
                connection
                    .prepare_cached(
                        "UPDATE jobs SET state = 'running', agent_id = ?2, attempt = ?3
                         WHERE id = ?1 AND state <> 'finished'",
                    )?
                    .execute(params![*job_id as i64, agent_id, attempt])?;
            }
            Command::Requeued {
                job_id,
                attempt,
                lost_attempts,
            } => {
                connection
                    .prepare_cached(
                        "UPDATE jobs SET state = 'queued', agent_id = NULL, attempt = ?2,
                         lost_attempts = ?3 WHERE id = ?1 AND state <> 'finished'",
                    )?
                    .execute(params![*job_id as i64, attempt, lost_attempts])?;
            }
            Command::Finished {
                job_id,
                result,
                finished_unix_ms,
            } => {
                connection
                    .prepare_cached(
                        "UPDATE jobs SET state = 'finished', result = ?2, finished_unix_ms = ?3
                         WHERE id = ?1",
                    )?
                    .execute(params![*job_id as i64, result, *finished_unix_ms as i64])?;
            }
            Command::ReserveIds { through } => {
                connection
                    .prepare_cached(
                        "UPDATE job_ids SET reserved_through = max(reserved_through, ?1) WHERE id = 0",
                    )?
                    .execute([*through as i64])?;
            }
            Command::Barrier { .. } => {}
        }
    }
    if prune {
        connection.execute(
            "DELETE FROM jobs WHERE state = 'finished' AND id < (
                 SELECT id FROM jobs WHERE state = 'finished' ORDER BY id DESC LIMIT 1 OFFSET ?1)",
            [KEPT_RESULTS],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
