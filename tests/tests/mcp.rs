//! `buildpool mcp` end to end: the real binary over stdio, driven by the rmcp client,
//! against a real coordinator and agents building a fixture workspace.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use buildpool_tests::{Cluster, Fixture, ServeOptions, process_alive, wait_until};
use rmcp::model::{CallToolRequestParams, CallToolResult, ProgressNotificationParam};
use rmcp::service::NotificationContext;
use rmcp::service::RunningService;
use rmcp::transport::TokioChildProcess;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{Value, json};

/// Records progress messages the server sends.
#[derive(Debug, Clone, Default)]
struct Recorder {
    progress: Arc<Mutex<Vec<String>>>,
}

impl ClientHandler for Recorder {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.progress
            .lock()
            .expect("lock")
            .push(params.message.unwrap_or_default());
    }
}

type Client = RunningService<RoleClient, Recorder>;

async fn mcp_client(fixture: &Fixture, dir: &Path) -> (Client, Recorder) {
    let command = tokio::process::Command::from(fixture.command_in(dir, &["mcp"]));
    let transport = TokioChildProcess::new(command).expect("buildpool mcp starts");
    let recorder = Recorder::default();
    let client = recorder
        .clone()
        .serve(transport)
        .await
        .expect("MCP handshake");
    (client, recorder)
}

async fn call(client: &Client, tool: &'static str, arguments: Value) -> CallToolResult {
    let arguments = arguments.as_object().cloned().expect("object arguments");
    client
        .call_tool(CallToolRequestParams::new(tool).with_arguments(arguments))
        .await
        .unwrap_or_else(|error| panic!("{tool} call failed: {error}"))
}

fn text(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn structured(result: &CallToolResult) -> &Value {
    result
        .structured_content
        .as_ref()
        .expect("structured content")
}

fn answer_size(result: &CallToolResult) -> usize {
    serde_json::to_string(result).expect("serializes").len()
}

fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    tokio::task::spawn_blocking(f)
}

async fn started_cluster(agents: usize, slots: u32) -> Cluster {
    blocking(move || {
        Cluster::start(Fixture::new().expect("fixture"), agents, slots).expect("cluster")
    })
    .await
    .expect("join")
}

/// A cluster whose agent runs jobs unsandboxed, for tests that watch the fixture's sleeping
/// test from the host (see `buildpool_tests::UNSANDBOXED`).
async fn watched_cluster(slots: u32) -> Cluster {
    blocking(move || {
        Cluster::start_with(
            Fixture::new().expect("fixture"),
            1,
            slots,
            &ServeOptions::unsandboxed(),
        )
        .expect("cluster")
    })
    .await
    .expect("join")
}

const THREE_ERRORS: &str = "pub fn quadruple(x: i32) -> i32 {\n    let a: i32 = \"text\";\n    let b = missing_value;\n    undefined_function(a, b, x)\n}\n";

#[tokio::test]
async fn a_compile_error_answer_is_exact_and_small() {
    let cluster = started_cluster(1, 2).await;
    let fixture = &cluster.fixture;
    fixture
        .write("app/src/lib.rs", THREE_ERRORS)
        .expect("write");
    let (client, recorder) = mcp_client(fixture, &fixture.root()).await;

    let result = call(&client, "build", json!({})).await;
    let body = structured(&result);
    assert_eq!(result.is_error, Some(true), "{}", text(&result));
    assert_eq!(body["outcome"], "failed");
    assert_eq!(body["errors"], 3, "{body}");
    assert_eq!(body["ran_on"], "worker-1");
    // Where the time went, phase by phase; cargo ran, so its phase was measured.
    let timings = &body["timings"];
    for phase in [
        "snapshot_ms",
        "queued_ms",
        "fetch_ms",
        "checkout_ms",
        "cargo_ms",
        "total_ms",
    ] {
        assert!(timings[phase].is_u64(), "{phase} missing: {body}");
    }
    assert!(timings["cargo_ms"].as_u64() > Some(0), "{body}");
    let text = text(&result);
    assert!(
        text.contains(
            "error[E0308] app/src/lib.rs:2:18: mismatched types\n    let a: i32 = \"text\";"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "error[E0425] app/src/lib.rs:3:13: cannot find value `missing_value` in this scope"
        ),
        "{text}"
    );
    assert!(text.contains("error[E0425] app/src/lib.rs:4:5: cannot find function `undefined_function` in this scope"), "{text}");
    assert!(
        answer_size(&result) < 2048,
        "answer is {} bytes:\n{text}",
        answer_size(&result)
    );
    let progress = recorder.progress.lock().expect("lock").clone();
    assert!(
        progress.iter().any(|m| m.contains("assigned to worker-1")),
        "{progress:?}"
    );
    client.cancel().await.expect("closes");
}

#[tokio::test]
async fn a_failing_test_is_named_with_its_panic_message_and_success_is_short() {
    let cluster = started_cluster(1, 2).await;
    let fixture = &cluster.fixture;
    let (client, recorder) = mcp_client(fixture, &fixture.root()).await;

    let ok = call(&client, "check", json!({})).await;
    let ok_text = text(&ok);
    assert_eq!(ok.is_error, Some(false), "{ok_text}");
    assert!(ok_text.len() <= 300, "{} bytes: {ok_text}", ok_text.len());
    assert!(ok_text.starts_with("check succeeded"), "{ok_text}");
    assert!(
        ok_text.contains("on worker-1") && ok_text.contains("env host"),
        "{ok_text}"
    );

    fixture
        .write("app/tests/fails.rs", "#[test]\nfn two_is_three() {\n    println!(\"captured line\");\n    assert_eq!(2, 3, \"arithmetic broke\");\n}\n")
        .expect("write");
    let result = call(&client, "test", json!({})).await;
    let body = structured(&result);
    assert_eq!(result.is_error, Some(true));
    assert_eq!(body["exit_code"], 101);
    assert_eq!(body["tests"]["failed"], 1, "{body}");
    assert_eq!(body["tests"]["passed"], 1, "{body}");
    let failure = &body["failures"][0];
    assert_eq!(failure["name"], "two_is_three");
    assert_eq!(
        failure["message"],
        "assertion `left == right` failed: arithmetic broke\n  left: 2\n right: 3"
    );
    assert_eq!(failure["output"], "captured line");
    assert!(text(&result).contains("FAILED two_is_three: assertion `left == right` failed: arithmetic broke | left: 2 | right: 3"), "{}", text(&result));
    let progress = recorder.progress.lock().expect("lock").clone();
    assert!(
        progress.iter().any(|m| m.contains("compiling: ")),
        "{progress:?}"
    );
    assert!(
        progress.iter().any(|m| m.ends_with("testing")),
        "{progress:?}"
    );

    // The full log stays available, filtered and paged.
    let job_id = body["job_id"].as_u64().expect("job id");
    let log = call(
        &client,
        "job_log",
        json!({"job_id": job_id, "filter": "two_is_three", "stream": "stdout"}),
    )
    .await;
    assert!(
        text(&log).contains("test two_is_three ... FAILED"),
        "{}",
        text(&log)
    );
    client.cancel().await.expect("closes");
}

#[tokio::test]
async fn clippy_reports_a_lint_by_default_as_an_error() {
    let cluster = started_cluster(1, 1).await;
    let fixture = &cluster.fixture;
    let lib = std::fs::read_to_string(fixture.root().join("app/src/lib.rs")).expect("read");
    fixture
        .write(
            "app/src/lib.rs",
            &format!("{lib}\npub fn count(values: &Vec<i32>) -> usize {{\n    values.len()\n}}\n"),
        )
        .expect("write");
    let (client, _) = mcp_client(fixture, &fixture.root()).await;
    let result = call(&client, "clippy", json!({})).await;
    let body = structured(&result);
    assert_eq!(result.is_error, Some(true), "{}", text(&result));
    let ptr_arg = body["diagnostics"]
        .as_array()
        .expect("list")
        .iter()
        .find(|d| d["code"] == "clippy::ptr_arg")
        .expect("ptr_arg reported");
    assert_eq!(
        ptr_arg["level"], "error",
        "-D warnings is the default: {body}"
    );

    let lenient = call(&client, "clippy", json!({"deny_warnings": false})).await;
    assert_eq!(lenient.is_error, Some(false), "{}", text(&lenient));
    let codes: Vec<&str> = structured(&lenient)["diagnostics"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|d| d["code"].as_str())
        .collect();
    assert_eq!(
        codes,
        ["clippy::items_after_test_module", "clippy::ptr_arg"],
        "in source order: {}",
        structured(&lenient)
    );
    client.cancel().await.expect("closes");
}

#[tokio::test]
async fn every_advertised_input_takes_effect() {
    // Unsandboxed: the sleeping test it times out writes a pid file on the host.
    let cluster = watched_cluster(2).await;
    let fixture = &cluster.fixture;
    let manifest = std::fs::read_to_string(fixture.root().join("app/Cargo.toml")).expect("read");
    fixture
        .write(
            "app/Cargo.toml",
            &format!("{manifest}\n[features]\nloud = []\n"),
        )
        .expect("write");
    let lib = std::fs::read_to_string(fixture.root().join("app/src/lib.rs")).expect("read");
    fixture.write("app/src/lib.rs", &format!("{lib}\n#[cfg(feature = \"loud\")]\ncompile_error!(\"feature loud is on\");\n#[cfg(not(debug_assertions))]\ncompile_error!(\"release profile is on\");\n")).expect("write");
    let (client, _) = mcp_client(fixture, &fixture.root()).await;

    assert_eq!(
        call(&client, "check", json!({})).await.is_error,
        Some(false)
    );
    let featured = call(&client, "check", json!({"features": ["loud"]})).await;
    assert!(
        text(&featured).contains("feature loud is on"),
        "{}",
        text(&featured)
    );
    let all = call(&client, "check", json!({"all_features": true})).await;
    assert!(text(&all).contains("feature loud is on"), "{}", text(&all));
    let release = call(&client, "build", json!({"release": true})).await;
    assert!(
        text(&release).contains("release profile is on"),
        "{}",
        text(&release)
    );
    // util alone does not contain the errors.
    let util = call(
        &client,
        "build",
        json!({"package": "util", "release": true}),
    )
    .await;
    assert_eq!(util.is_error, Some(false), "{}", text(&util));

    let filtered = call(&client, "test", json!({"filter": "quadruples"})).await;
    assert_eq!(
        structured(&filtered)["tests"]["passed"],
        1,
        "{}",
        text(&filtered)
    );
    let none = call(&client, "test", json!({"filter": "no_such_test"})).await;
    assert_eq!(structured(&none)["tests"]["passed"], 0, "{}", text(&none));
    let ignored = call(
        &client,
        "test",
        json!({"filter": "quadruples", "include_ignored": true}),
    )
    .await;
    assert_eq!(structured(&ignored)["tests"]["passed"], 1);
    let timed_out = call(&client, "test", json!({"filter": "sleeps_with_a_child", "include_ignored": true, "timeout_secs": 3, "nocapture": true})).await;
    assert_eq!(
        structured(&timed_out)["outcome"],
        "timed_out",
        "{}",
        text(&timed_out)
    );
    client.cancel().await.expect("closes");
}

#[tokio::test]
async fn concurrent_calls_from_one_session_all_complete() {
    let cluster = started_cluster(2, 2).await;
    let fixture = &cluster.fixture;
    let (client, _) = mcp_client(fixture, &fixture.root()).await;
    let (a, b, c, d) = tokio::join!(
        call(&client, "check", json!({})),
        call(&client, "build", json!({})),
        call(&client, "test", json!({})),
        call(&client, "clippy", json!({"deny_warnings": false})),
    );
    let mut ids = Vec::new();
    for result in [&a, &b, &c, &d] {
        assert_eq!(result.is_error, Some(false), "{}", text(result));
        ids.push(structured(result)["job_id"].as_u64().expect("job id"));
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 4, "each call is its own job");
    client.cancel().await.expect("closes");
}

#[tokio::test]
async fn cancelling_a_running_call_kills_the_job() {
    let cluster = watched_cluster(1).await;
    let fixture = &cluster.fixture;
    let (client, _) = mcp_client(fixture, &fixture.root()).await;
    let arguments = json!({"filter": "sleeps_with_a_child", "include_ignored": true});
    let call_future = call(&client, "test", arguments);
    let pid = tokio::select! {
        _ = call_future => panic!("the call ended before it was cancelled"),
        pid = async {
            loop {
                if let Some(pid) = fixture.grandchild_pid() {
                    break pid;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } => pid,
    };
    // Leaving the select dropped the call: rmcp sends notifications/cancelled.
    assert!(
        blocking(move || wait_until(Duration::from_secs(15), || !process_alive(pid)))
            .await
            .expect("join"),
        "the job survived the cancel"
    );
    let status = call(&client, "worker_status", json!({})).await;
    assert!(
        blocking(move || wait_until(Duration::from_secs(15), || {
            cluster
                .status()
                .is_ok_and(|s| s["jobs"].as_array().is_some_and(Vec::is_empty))
        }))
        .await
        .expect("join"),
        "the job is still listed"
    );
    assert_eq!(status.is_error, Some(false));
    client.cancel().await.expect("closes");
}

#[tokio::test]
async fn with_the_coordinator_down_jobs_run_locally_and_say_so() {
    let fixture = blocking(|| Fixture::new().expect("fixture"))
        .await
        .expect("join");
    let (client, _) = mcp_client(&fixture, &fixture.root()).await;
    let result = call(&client, "test", json!({})).await;
    let body = structured(&result);
    assert_eq!(result.is_error, Some(false), "{}", text(&result));
    assert_eq!(body["ran_on"], "local (coordinator unreachable)");
    assert!(text(&result).contains("local (coordinator unreachable)"));
    let job_id = body["job_id"].as_u64().expect("job id");
    assert_test_in_log(&client, job_id).await;
    let status = call(&client, "worker_status", json!({})).await;
    assert!(text(&status).contains("unreachable"), "{}", text(&status));
    client.cancel().await.expect("closes");
}

#[tokio::test]
async fn with_no_coordinator_the_first_job_starts_one_in_the_background_and_others_join_it() {
    let fixture = blocking(|| Fixture::new().expect("fixture"))
        .await
        .expect("join");
    let worktree = fixture.add_worktree("second").expect("worktree");
    let mcp = |dir: &Path| {
        let mut command = fixture.command_in(dir, &["mcp"]);
        command
            .env_remove("BUILDPOOL_BACKGROUND")
            .env("BUILDPOOL_IDLE_EXIT_SECS", "600");
        TokioChildProcess::new(tokio::process::Command::from(command)).expect("starts")
    };
    let first = Recorder::default()
        .serve(mcp(&fixture.root()))
        .await
        .expect("MCP handshake");
    let second = Recorder::default()
        .serve(mcp(&worktree))
        .await
        .expect("MCP handshake");
    let started = call(&first, "check", json!({})).await;
    let body = structured(&started);
    let note = body["coordinator_note"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let pid: i32 = note
        .split("(pid ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_default();
    // Whatever happens next, it does not outlive the test.
    let _reaper = Reaper(pid);
    assert_eq!(started.is_error, Some(false), "{}", text(&started));
    assert!(pid > 0, "{body}");
    assert_eq!(body["ran_on"], "local fallback", "{body}");
    assert!(text(&started).contains("started one in the background"));

    let joined = call(&second, "test", json!({})).await;
    let body = structured(&joined);
    assert_eq!(joined.is_error, Some(false), "{}", text(&joined));
    assert_eq!(body["ran_on"], "local fallback", "{body}");
    assert!(body.get("coordinator_note").is_none(), "{body}");
    let job_id = body["job_id"].as_u64().expect("job id");
    // Its log is the shared coordinator's, readable from the other session too.
    assert_test_in_log(&first, job_id).await;
    let status = call(&second, "worker_status", json!({})).await;
    assert!(!text(&status).contains("unreachable"), "{}", text(&status));
    first.cancel().await.expect("closes");
    second.cancel().await.expect("closes");
}

/// `job_log` of `job_id` shows the fixture's `quadruples` test passing.
async fn assert_test_in_log(client: &Client, job_id: u64) {
    let log = call(
        client,
        "job_log",
        json!({"job_id": job_id, "filter": "quadruples"}),
    )
    .await;
    assert!(
        text(&log).contains("tests::quadruples ... ok"),
        "{}",
        text(&log)
    );
}

/// Kills a background coordinator at the end of a test, whatever its outcome.
struct Reaper(i32);

impl Drop for Reaper {
    fn drop(&mut self) {
        if self.0 > 0 {
            buildpool_tests::signal_pid(self.0, 9);
        }
    }
}

#[tokio::test]
async fn bad_arguments_get_a_clear_error_and_the_server_keeps_serving() {
    let cluster = started_cluster(1, 1).await;
    let fixture = &cluster.fixture;
    let (client, _) = mcp_client(fixture, &fixture.root()).await;
    // Rejected either as a JSON-RPC error or as an error result; returns the explanation.
    let rejected = async |tool: &'static str, arguments: Value| -> String {
        let arguments = arguments.as_object().cloned().expect("object");
        match client
            .call_tool(CallToolRequestParams::new(tool).with_arguments(arguments))
            .await
        {
            Err(error) => error.to_string(),
            Ok(result) if result.is_error == Some(true) && result.structured_content.is_none() => {
                text(&result)
            }
            Ok(result) => panic!("{tool} accepted bad arguments: {}", text(&result)),
        }
    };
    let wrong_type = rejected("build", json!({"package": 42})).await;
    assert!(
        wrong_type.contains("invalid type: integer `42`, expected a string"),
        "{wrong_type}"
    );
    let unknown_field = rejected("build", json!({"pakage": "app"})).await;
    assert!(
        unknown_field.contains("unknown field `pakage`"),
        "{unknown_field}"
    );
    let bad_name = rejected("build", json!({"package": "app; rm -rf /"})).await;
    assert!(bad_name.contains("is not a valid name"), "{bad_name}");
    let bad_timeout = rejected("test", json!({"timeout_secs": 0})).await;
    assert!(
        bad_timeout.contains("timeout_secs must be"),
        "{bad_timeout}"
    );
    let bad_stream = rejected("job_log", json!({"job_id": 1, "stream": "both-ish"})).await;
    assert!(bad_stream.contains("stream must be"), "{bad_stream}");
    let unknown_tool = rejected("deploy", json!({})).await;
    assert!(unknown_tool.contains("tool not found"), "{unknown_tool}");
    let fine = call(&client, "check", json!({})).await;
    assert_eq!(fine.is_error, Some(false), "{}", text(&fine));
    client.cancel().await.expect("closes");
}
