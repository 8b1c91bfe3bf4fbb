//! `buildpool mcp` end to end: the real binary over stdio, driven by the rmcp client,
//! against a real coordinator and agents building a fixture workspace. Every answer is
//! validated against the output schema its tool declares.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use buildpool_tests::{Cluster, Fixture, ServeOptions, process_alive, wait_until};
use rmcp::model::{CallToolRequestParams, CallToolResult, ProgressNotificationParam};
use rmcp::service::NotificationContext;
use rmcp::service::RunningService;
use rmcp::transport::TokioChildProcess;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{Value, json};

/// Records progress messages the server sends, and the tools' declared output schemas.
#[derive(Debug, Clone, Default)]
struct Recorder {
    progress: Arc<Mutex<Vec<String>>>,
    schemas: Arc<Mutex<HashMap<String, Value>>>,
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

impl Recorder {
    /// Panics unless `result`'s structured content matches `tool`'s declared schema.
    fn check_schema(&self, tool: &str, result: &CallToolResult) {
        let schema = self.schemas.lock().expect("lock").get(tool).cloned();
        let schema = schema.unwrap_or_else(|| panic!("{tool} is not a listed tool"));
        let validator = jsonschema::validator_for(&schema)
            .unwrap_or_else(|error| panic!("{tool}'s output schema is invalid: {error}"));
        let body = structured(result);
        let errors: Vec<String> = validator.iter_errors(body).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "{tool}'s answer does not match its schema: {errors:?}\n{body}"
        );
    }
}

type Client = RunningService<RoleClient, Recorder>;

async fn mcp_client(fixture: &Fixture, dir: &Path) -> (Client, Recorder) {
    mcp_client_with(fixture.command_in(dir, &["mcp"])).await
}

/// Starts `command` as the MCP server and records each tool's declared output schema.
async fn mcp_client_with(command: std::process::Command) -> (Client, Recorder) {
    let command = tokio::process::Command::from(command);
    let transport = TokioChildProcess::new(command).expect("buildpool mcp starts");
    let recorder = Recorder::default();
    let client = recorder
        .clone()
        .serve(transport)
        .await
        .expect("MCP handshake");
    let tools = client.list_all_tools().await.expect("tools/list");
    let mut schemas = recorder.schemas.lock().expect("lock");
    for tool in tools {
        let schema = tool
            .output_schema
            .unwrap_or_else(|| panic!("{} declares no output schema", tool.name));
        schemas.insert(tool.name.to_string(), Value::Object((*schema).clone()));
    }
    drop(schemas);
    (client, recorder)
}

async fn call(client: &Client, tool: &'static str, arguments: Value) -> CallToolResult {
    let arguments = arguments.as_object().cloned().expect("object arguments");
    let result = client
        .call_tool(CallToolRequestParams::new(tool).with_arguments(arguments))
        .await
        .unwrap_or_else(|error| panic!("{tool} call failed: {error}"));
    client.service().check_schema(tool, &result);
    result
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

/// What Claude Code shows the model: the structured content alone.
fn structured_size(result: &CallToolResult) -> usize {
    serde_json::to_string(structured(result))
        .expect("serializes")
        .len()
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

const FIVE_ERRORS: &str = "pub fn quadruple(x: i32) -> i32 {\n    let a: i32 = \"text\";\n    let b = missing_value;\n    let c: u8 = 300u16;\n    let d = x.no_such_method();\n    undefined_function(a, b, c, d)\n}\n";

#[tokio::test]
async fn a_compile_error_answer_is_exact_and_small() {
    let cluster = started_cluster(1, 2).await;
    let fixture = &cluster.fixture;
    fixture.write("app/src/lib.rs", FIVE_ERRORS).expect("write");
    let (client, recorder) = mcp_client(fixture, &fixture.root()).await;

    let result = call(&client, "build", json!({})).await;
    let body = structured(&result);
    assert_eq!(result.is_error, Some(true), "{}", text(&result));
    assert_eq!(body["outcome"], "failed");
    assert_eq!(body["errors"], 5, "{body}");
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
    // The structured content alone says everything: each error's place, code, message
    // and source line, in source order.
    let errors: Vec<String> = body["diagnostics"]
        .as_array()
        .expect("diagnostics")
        .iter()
        .map(|d| {
            format!(
                "{} {} {} | {}",
                d["at"], d["code"], d["message"], d["snippet"]
            )
        })
        .collect();
    assert_eq!(
        errors,
        [
            r#""app/src/lib.rs:2:18" "E0308" "mismatched types" | "let a: i32 = \"text\";""#,
            r#""app/src/lib.rs:3:13" "E0425" "cannot find value `missing_value` in this scope" | "let b = missing_value;""#,
            r#""app/src/lib.rs:4:17" "E0308" "mismatched types" | "let c: u8 = 300u16;""#,
            r#""app/src/lib.rs:5:15" "E0599" "no method named `no_such_method` found for type `i32` in the current scope" | "let d = x.no_such_method();""#,
            r#""app/src/lib.rs:6:5" "E0425" "cannot find function `undefined_function` in this scope" | "undefined_function(a, b, c, d)""#,
        ],
        "{body}"
    );
    assert!(
        body["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("build failed (exit 101) · 5 errors · job ")),
        "{body}"
    );
    assert!(
        structured_size(&result) <= 2048,
        "structured content is {} bytes:\n{body}",
        structured_size(&result)
    );
    let text = text(&result);
    assert!(
        text.contains(
            "error[E0308] app/src/lib.rs:2:18: mismatched types\n    let a: i32 = \"text\";"
        ),
        "{text}"
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
        mcp_client_with(command)
    };
    let (first, _) = mcp(&fixture.root()).await;
    let (second, _) = mcp(&worktree).await;
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
    let bad_runner = rejected("test", json!({"runner": "pytest"})).await;
    assert!(
        bad_runner.contains("unknown variant `pytest`, expected `cargo` or `nextest`"),
        "{bad_runner}"
    );
    let bad_fmt = rejected("fmt", json!({"package": "app; rm -rf /"})).await;
    assert!(bad_fmt.contains("is not a valid name"), "{bad_fmt}");
    let bad_stream = rejected("job_log", json!({"job_id": 1, "stream": "both-ish"})).await;
    assert!(bad_stream.contains("stream must be"), "{bad_stream}");
    let unknown_tool = rejected("deploy", json!({})).await;
    assert!(unknown_tool.contains("tool not found"), "{unknown_tool}");
    let fine = call(&client, "check", json!({})).await;
    assert_eq!(fine.is_error, Some(false), "{}", text(&fine));
    client.cancel().await.expect("closes");
}

#[tokio::test]
async fn nextest_runs_the_tests_and_reports_them_exactly() {
    let cluster = started_cluster(1, 1).await;
    let fixture = &cluster.fixture;
    fixture
        .write("app/tests/fails.rs", "#[test]\nfn two_is_three() {\n    println!(\"captured line\");\n    assert_eq!(2, 3, \"arithmetic broke\");\n}\n")
        .expect("write");
    let (client, recorder) = mcp_client(fixture, &fixture.root()).await;

    let result = call(&client, "test", json!({"runner": "nextest"})).await;
    let body = structured(&result);
    assert_eq!(result.is_error, Some(true), "{}", text(&result));
    assert_eq!(
        (&body["kind"], &body["outcome"]),
        (&json!("nextest"), &json!("failed")),
        "{body}"
    );
    assert_eq!(
        body["tests"],
        json!({"passed": 1, "failed": 1, "skipped": 2}),
        "nextest's tally, the fixture's two ignored tests skipped: {body}"
    );
    assert_eq!(
        body["failures"],
        json!([{
            "name": "two_is_three",
            "message": "assertion `left == right` failed: arithmetic broke\n  left: 2\n right: 3",
            "output": "captured line",
        }]),
        "{body}"
    );
    let progress = recorder.progress.lock().expect("lock").clone();
    assert!(
        progress.iter().any(|m| m.ends_with("testing")),
        "{progress:?}"
    );

    let filtered = call(
        &client,
        "test",
        json!({"runner": "nextest", "filter": "quadruples"}),
    )
    .await;
    assert_eq!(filtered.is_error, Some(false), "{}", text(&filtered));
    assert_eq!(
        structured(&filtered)["tests"],
        json!({"passed": 1, "failed": 0, "skipped": 3}),
        "{}",
        structured(&filtered)
    );
    client.cancel().await.expect("closes");
}

#[tokio::test]
async fn a_spread_test_counts_every_slice_as_cargo_test_and_names_its_parts() {
    let cluster = started_cluster(2, 1).await;
    let fixture = &cluster.fixture;
    fixture
        .write("app/tests/fails.rs", "#[test]\nfn two_is_three() {\n    println!(\"captured line\");\n    assert_eq!(2, 3, \"arithmetic broke\");\n}\n")
        .expect("write");
    let (client, recorder) = mcp_client(fixture, &fixture.root()).await;

    let whole = call(&client, "test", json!({})).await;
    let whole = structured(&whole).clone();
    let spread = call(&client, "test", json!({"spread": 2})).await;
    let body = structured(&spread);
    assert_eq!(spread.is_error, Some(true), "{}", text(&spread));
    assert_eq!(
        (&body["kind"], &body["outcome"], &body["exit_code"]),
        (&json!("test"), &json!("failed"), &json!(101)),
        "{body}"
    );
    assert_eq!(
        body["tests"], whole["tests"],
        "spread {body}\nwhole {whole}"
    );
    assert_eq!(body["failures"][0]["name"], json!("two_is_three"), "{body}");
    assert_eq!(
        body["failures"][0]["message"],
        json!("assertion `left == right` failed: arithmetic broke\n  left: 2\n right: 3"),
        "{body}"
    );
    let parts: Vec<&str> = body["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .filter_map(|part| part["part"].as_str())
        .collect();
    for part in [
        "test build (nextest archive)",
        "doctests",
        "slice 1/2",
        "slice 2/2",
    ] {
        assert!(parts.contains(&part), "{parts:?}");
    }
    let progress = recorder.progress.lock().expect("lock").clone();
    assert!(
        progress
            .iter()
            .any(|m| m.starts_with("slice 2/2 running on worker-")),
        "{progress:?}"
    );

    for (arguments, error) in [
        (json!({"spread": "many"}), "from 1 to 256, or auto"),
        (json!({"spread": 0}), "from 1 to 256, or auto"),
        (
            json!({"spread": 2, "runner": "nextest"}),
            "leave runner unset",
        ),
    ] {
        let refused = match client
            .call_tool(
                CallToolRequestParams::new("test")
                    .with_arguments(arguments.as_object().cloned().expect("object")),
            )
            .await
        {
            Err(error) => error.to_string(),
            Ok(result) if result.is_error == Some(true) && result.structured_content.is_none() => {
                text(&result)
            }
            Ok(result) => panic!("{arguments} accepted: {}", text(&result)),
        };
        assert!(refused.contains(error), "{refused}");
    }
    client.cancel().await.expect("closes");
}

/// A copy of `dir` made of links to its entries, but for `left_out`.
fn linked_copy(dir: &Path, left_out: &str, into: &Path) -> PathBuf {
    std::fs::create_dir_all(into).expect("mkdir");
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        if entry.file_name() != left_out {
            std::os::unix::fs::symlink(entry.path(), into.join(entry.file_name())).expect("link");
        }
    }
    into.to_owned()
}

#[tokio::test]
async fn nextest_missing_where_the_job_runs_is_said_clearly() {
    let fixture = blocking(|| Fixture::new().expect("fixture"))
        .await
        .expect("join");
    // The job runs in-process, in this environment: hide cargo-nextest from cargo, which
    // looks for it on PATH and in CARGO_HOME/bin.
    let hidden = fixture.scratch().join("no-nextest");
    let path = std::env::var_os("PATH").expect("PATH");
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .enumerate()
        .map(|(n, dir)| {
            if dir.join("cargo-nextest").exists() {
                linked_copy(&dir, "cargo-nextest", &hidden.join(n.to_string()))
            } else {
                dir
            }
        })
        .collect();
    let home = std::env::var_os("HOME").map(PathBuf::from).expect("HOME");
    let cargo_home =
        std::env::var_os("CARGO_HOME").map_or_else(|| home.join(".cargo"), PathBuf::from);
    let mut command = fixture.command_in(&fixture.root(), &["mcp"]);
    command.env("PATH", std::env::join_paths(dirs).expect("PATH joins"));
    if cargo_home.join("bin/cargo-nextest").exists() {
        let copy = linked_copy(&cargo_home, "bin", &hidden.join("cargo-home"));
        linked_copy(&cargo_home.join("bin"), "cargo-nextest", &copy.join("bin"));
        command.env("CARGO_HOME", copy);
    }
    let (client, _) = mcp_client_with(command).await;

    let result = call(&client, "test", json!({"runner": "nextest"})).await;
    let body = structured(&result);
    assert_eq!(result.is_error, Some(true));
    assert_eq!(body["outcome"], "error", "{body}");
    assert_eq!(
        body["error"], "cargo-nextest is not installed where the job ran",
        "{body}"
    );
    client.cancel().await.expect("closes");
}

#[tokio::test]
async fn fmt_lists_the_files_cargo_fmt_would_change() {
    let fixture = blocking(|| Fixture::new().expect("fixture"))
        .await
        .expect("join");
    let formatted = std::process::Command::new("cargo")
        .arg("fmt")
        .current_dir(fixture.root())
        .status()
        .expect("cargo fmt runs");
    assert!(formatted.success());
    let (client, _) = mcp_client(&fixture, &fixture.root()).await;
    let clean = call(&client, "fmt", json!({})).await;
    assert_eq!(clean.is_error, Some(false), "{}", text(&clean));
    assert_eq!(structured(&clean)["outcome"], "formatted");

    fixture
        .write("crates/util/src/lib.rs", "pub fn double(x:i32)->i32{x*2}\n")
        .expect("write");
    let lib = std::fs::read_to_string(fixture.root().join("app/src/lib.rs")).expect("read");
    fixture
        .write(
            "app/src/lib.rs",
            &format!("{lib}\npub fn   spaced( ) {{}}\n"),
        )
        .expect("write");
    let dirty = call(&client, "fmt", json!({})).await;
    let body = structured(&dirty);
    assert_eq!(dirty.is_error, Some(true), "{}", text(&dirty));
    assert_eq!(body["outcome"], "unformatted", "{body}");
    let mut files: Vec<String> = body["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| format!("{} {}", f["file"], f["lines"]))
        .collect();
    files.sort();
    let spaced = lib.lines().count() + 2;
    assert_eq!(
        files,
        [
            format!("\"app/src/lib.rs\" [{spaced}]"),
            "\"crates/util/src/lib.rs\" [1]".to_owned()
        ],
        "{body}"
    );
    let util = call(&client, "fmt", json!({"package": "util"})).await;
    assert_eq!(
        structured(&util)["files"],
        json!([{"file": "crates/util/src/lib.rs", "lines": [1]}])
    );
    client.cancel().await.expect("closes");
}

/// Answers of every shape, including ones a live run rarely gives (huge output, timeouts,
/// signals, an unreachable coordinator, a failed formatting check), match their tools'
/// declared schemas and stay bounded.
#[tokio::test]
async fn answers_of_every_shape_match_the_declared_schemas() {
    use buildpool::mcp::answer::{
        CancelAnswer, CancelState, FmtAnswer, JobAnswer, MAX_JOB_ANSWER, Placement, StatusAnswer,
        ToolAnswer, log_page,
    };
    use buildpool::report::ReportBuilder;
    use buildpool::session::Timings;
    use buildpool_core::{
        AgentPhases, Completion, JobEnd, JobKind, JobResult, OutputStream, RunEnv,
    };

    let fixture = blocking(|| Fixture::new().expect("fixture"))
        .await
        .expect("join");
    let (client, recorder) = mcp_client(&fixture, &fixture.root()).await;

    let mut huge = ReportBuilder::new();
    for n in 0..300 {
        // A compiler message in the whole shape cargo writes: nothing else is read as one.
        let message = json!({"reason": "compiler-message", "package_id": "huge 0.1.0",
            "target": {"kind": ["lib"], "name": "huge", "src_path": "src/lib.rs"},
            "message": {
            "level": if n % 3 == 0 { "warning" } else { "error" },
            "message": "m".repeat(50_000), "code": {"code": "c".repeat(5000)},
            "children": [], "rendered": null,
            "spans": [{"is_primary": true, "file_name": format!("{n}{}", "f".repeat(5000)),
                "byte_start": 0, "byte_end": 1, "line_start": n, "line_end": n,
                "column_start": 2, "column_end": 3,
                "text": [{"text": "s".repeat(5000), "highlight_start": 2, "highlight_end": 3}]}]}});
        huge.feed(OutputStream::Stdout, format!("{message}\n").as_bytes());
        let event = json!({"type": "test", "event": "failed", "name": format!("t{n}"),
            "stdout": format!("{}\nthread 't' panicked at a.rs:1:1:\n{}\n", "o".repeat(9000), "p".repeat(9000))});
        huge.feed(OutputStream::Stdout, format!("{event}\n").as_bytes());
    }
    huge.feed(OutputStream::Stderr, "e".repeat(100_000).as_bytes());
    let huge = huge.finish();
    let ends = [
        JobEnd::Exited { code: 101 },
        JobEnd::Exited { code: 0 },
        JobEnd::Signalled { signal: 9 },
        JobEnd::TimedOut,
        JobEnd::Cancelled,
        JobEnd::Failed {
            reason: "r".repeat(100_000),
        },
    ];
    for (n, end) in ends.into_iter().enumerate() {
        let placement = match n % 3 {
            0 => Placement::Agent("worker-1".to_owned()),
            1 => Placement::LocalFallback,
            _ => Placement::Unreachable("u".repeat(100_000)),
        };
        let answer = ToolAnswer {
            kind: JobKind::Nextest,
            job_id: u64::MAX,
            placement,
            result: JobResult {
                completion: Completion {
                    end,
                    duration: Duration::from_secs(86_400),
                    env: Some(RunEnv::Nix),
                    phases: AgentPhases::default(),
                },
                agent_id: "worker-1".to_owned(),
                attempt: 3,
                local: false,
                queue_time: Duration::from_secs(1),
            },
            report: huge.clone(),
            snapshot_note: Some("n".repeat(100_000)),
            coordinator_note: Some("c".repeat(100_000)),
            timings: Timings {
                snapshot: Duration::ZERO,
                submit: Duration::ZERO,
                queued: Duration::ZERO,
                phases: AgentPhases::default(),
                rest: Duration::ZERO,
                total: Duration::ZERO,
            },
        }
        .answer();
        let result = answer.into_result();
        recorder.check_schema("test", &result);
        assert!(
            structured_size(&result) <= MAX_JOB_ANSWER,
            "{} bytes: {}",
            structured_size(&result),
            structured(&result)
        );
    }
    let no_result = JobAnswer::no_result(JobKind::Build, None, &"x".repeat(100_000));
    recorder.check_schema("build", &no_result.into_result());

    let long = "l".repeat(100_000);
    let lines = vec![long.as_str(); 50];
    recorder.check_schema(
        "job_log",
        &log_page(7, &lines, 3, 2000, false).into_result(),
    );
    recorder.check_schema(
        "worker_status",
        &StatusAnswer::unreachable(&"why ".repeat(10_000), "jobs run locally", true).into_result(),
    );
    let cancelled = CancelAnswer {
        job_id: 7,
        cancelled: false,
        state: CancelState::Finished,
    };
    recorder.check_schema("cancel_job", &cancelled.into_result());
    recorder.check_schema("fmt", &FmtAnswer::error(&"e".repeat(100_000)).into_result());
    let files = (0..100)
        .map(|n| (format!("src/{n}.rs"), (1..100).collect()))
        .collect();
    recorder.check_schema("fmt", &FmtAnswer::of(files).into_result());
    client.cancel().await.expect("closes");
}
