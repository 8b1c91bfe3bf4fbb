//! The live dashboard: one page of plain HTML, CSS and JS compiled into the binary (no CDN,
//! works offline), fed by server-sent events.
//!
//! `/api/events` sends the whole pool view (agents, queue, running and recently finished
//! jobs) whenever it changes, checked twice a second per open page: a view is a short
//! copy under the state lock, built into JSON after the lock is released. A running job's
//! live tail (`/api/jobs/{id}/tail`) follows its log file like a streaming client does,
//! so a slow page only slows itself; `/jobs/{id}/log` is a finished or running job's
//! whole log as text.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRef, Path, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use buildpool_core::JobEvent;
use buildpool_core::status::JobPlace;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::joblog;
use super::shared::Shared;

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("dashboard.js");
const STYLE: &str = include_str!("dashboard.css");

/// How often an open page's view is checked for changes.
const REFRESH: Duration = Duration::from_millis(500);
/// Output a new tail starts with: the end of what the job printed so far.
const TAIL_START: usize = 16 * 1024;
/// Events buffered per open page; beyond this the page's own pace sets the speed.
const EVENT_BUFFER: usize = 16;

/// The dashboard's routes, for any router state the coordinator's shared state comes from.
pub(crate) fn routes<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    Arc<Shared>: FromRef<S>,
{
    Router::new()
        .route(
            "/",
            get(|| async { page("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/dashboard.js",
            get(|| async { page("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/dashboard.css",
            get(|| async { page("text/css; charset=utf-8", STYLE) }),
        )
        .route("/api/state", get(state))
        .route("/api/events", get(events))
        .route("/api/jobs/{id}/tail", get(tail))
        .route("/jobs/{id}/log", get(log))
}

fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The pool as the page shows it.
pub(crate) fn view(shared: &Shared) -> Value {
    let state = shared.dispatch.state();
    let agents = state.scheduler.agents();
    let jobs = state.scheduler.jobs();
    drop(state);
    let agents: Vec<Value> = agents
        .iter()
        .map(|agent| {
            json!({
                "id": agent.id,
                "slots_total": agent.slots_total,
                "slots_used": agent.slots_used,
                "labels": agent.labels,
                "system": agent.system,
                "disk_used_bytes": agent.disk.used_bytes,
                "disk_budget_bytes": agent.disk.budget_bytes,
                "connected_since_unix_ms": agent.connected_since_unix_ms,
                "draining": agent.draining,
                "sandboxed": agent.sandboxed,
                "local": agent.local,
                "address": agent.address,
            })
        })
        .collect();
    let (mut queued, mut running) = (Vec::new(), Vec::new());
    for job in &jobs {
        let mut entry = json!({
            "job_id": job.job_id,
            "kind": job.kind.cargo_subcommand(),
            "worktree": job.worktree,
            "cargo_args": job.cargo_args,
            "submitted_unix_ms": job.submitted_unix_ms,
        });
        match &job.place {
            JobPlace::Queued => queued.push(entry),
            JobPlace::Running { agent_id, attempt } => {
                entry["agent_id"] = json!(agent_id);
                entry["attempt"] = json!(attempt);
                running.push(entry);
            }
        }
    }
    let finished: Vec<Value> = shared
        .jobs
        .records
        .history()
        .recent()
        .iter()
        .map(|job| {
            json!({
                "job_id": job.job_id,
                "kind": job.kind.cargo_subcommand(),
                "worktree": job.worktree,
                "branch": job.branch,
                "cargo_args": job.cargo_args,
                "agent_id": job.agent_id,
                "local": job.local,
                "attempt": job.attempt,
                "outcome": job.outcome,
                "end": job.end,
                "queue_secs": job.queue_time.as_secs_f64(),
                "run_secs": job.run_time.as_secs_f64(),
                "finished_unix_ms": job.finished_unix_ms,
            })
        })
        .collect();
    json!({
        "coordinator_id": shared.id,
        "repository": shared.repo.common_dir.display().to_string(),
        "agents": agents,
        "queued": queued,
        "running": running,
        "finished": finished,
    })
}

async fn state(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(view(&shared)).into_response()
}

/// A stream of server-sent events from `receiver`, with keep-alive comments so proxies
/// and the browser see a live connection between events.
fn sse(receiver: mpsc::Receiver<Result<Event, Infallible>>) -> Response {
    Sse::new(ReceiverStream::new(receiver))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The pool view, sent at once and then whenever it changes.
async fn events(State(shared): State<Arc<Shared>>) -> Response {
    let (sender, receiver) = mpsc::channel(EVENT_BUFFER);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(REFRESH);
        let mut last = String::new();
        loop {
            tokio::select! {
                () = shared.shutdown.cancelled() => return,
                () = sender.closed() => return,
                _ = ticks.tick() => {}
            }
            let now = view(&shared).to_string();
            if now != last {
                let event = Event::default().event("state").data(&now);
                if sender.send(Ok(event)).await.is_err() {
                    return;
                }
                last = now;
            }
        }
    });
    sse(receiver)
}

/// A running job's output as it arrives (`output` events, JSON strings), starting with
/// the end of what it printed so far; `end` when the job ends.
async fn tail(State(shared): State<Arc<Shared>>, Path(job_id): Path<u64>) -> Response {
    let Some(job) = shared.dispatch.state().jobs.get(&job_id).cloned() else {
        return (
            StatusCode::NOT_FOUND,
            format!("job {job_id} is not running\n"),
        )
            .into_response();
    };
    let (sender, receiver) = mpsc::channel(EVENT_BUFFER);
    let shutdown = shared.shutdown.clone();
    tokio::spawn(async move {
        let mut length = job.log.subscribe();
        let mut phase = job.phase.subscribe();
        let mut end = *length.borrow_and_update();
        let mut merged = joblog::MergedText::default();
        let start = match tokio::fs::read(job.log.path()).await {
            Ok(bytes) => text_of(
                &joblog::parse(&bytes[..bytes.len().min(end as usize)]),
                &mut merged,
            ),
            Err(_) => String::new(),
        };
        let start =
            start[floor_char_boundary(&start, start.len().saturating_sub(TAIL_START))..].to_owned();
        if !start.is_empty() && sender.send(Ok(output(&start))).await.is_err() {
            return;
        }
        let mut position = end;
        let mut final_pass = false;
        loop {
            while position < end {
                let Ok((records, next)) = joblog::read_records(job.log.path(), position, end).await
                else {
                    break;
                };
                if next == position {
                    break;
                }
                position = next;
                let text = text_of(&records, &mut merged);
                if !text.is_empty() && sender.send(Ok(output(&text))).await.is_err() {
                    return;
                }
            }
            if matches!(*phase.borrow_and_update(), JobEvent::Finished(_)) {
                // Its last output may still be on its way to the file: one more pass.
                if !final_pass {
                    final_pass = true;
                    job.log.written().await;
                    end = *length.borrow_and_update();
                    if position < end {
                        continue;
                    }
                }
                let mut unfinished = Vec::new();
                std::mem::take(&mut merged).finish(&mut unfinished);
                if !unfinished.is_empty()
                    && sender
                        .send(Ok(output(&String::from_utf8_lossy(&unfinished))))
                        .await
                        .is_err()
                {
                    return;
                }
                let _ = sender
                    .send(Ok(Event::default().event("end").data("")))
                    .await;
                return;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = sender.closed() => return,
                changed = length.changed() => if changed.is_err() { return },
                changed = phase.changed() => if changed.is_err() { return },
            }
            end = *length.borrow_and_update();
        }
    });
    sse(receiver)
}

fn output(text: &str) -> Event {
    Event::default()
        .event("output")
        .data(Value::from(text).to_string())
}

/// The lines `records` complete, both streams merged by `merged`, as text.
fn text_of(records: &[joblog::Record], merged: &mut joblog::MergedText) -> String {
    let mut bytes = Vec::new();
    for record in records {
        merged.push(record, &mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The largest char boundary of `text` at or below `index`.
fn floor_char_boundary(text: &str, index: usize) -> usize {
    (0..=index.min(text.len()))
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0)
}

/// A job's whole log (running or finished) as text.
async fn log(State(shared): State<Arc<Shared>>, Path(job_id): Path<u64>) -> Response {
    let path = shared.jobs.records.log_path(job_id);
    match tokio::fs::read(&path).await {
        Ok(bytes) => {
            // One reading of the whole log: a running job's unfinished lines show too.
            let text = joblog::MergedText::of(&joblog::parse(&bytes), true);
            (
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                String::from_utf8_lossy(&text).into_owned(),
            )
                .into_response()
        }
        Err(_) => (StatusCode::NOT_FOUND, format!("no log for job {job_id}\n")).into_response(),
    }
}
