//! The live dashboard in a real browser: Debian's chromium driven by playwright-core
//! (`tests/browser/dashboard.mjs`) against a real coordinator, agent and job.
//!
//! Needs `node`, `/usr/bin/chromium` (or `CHROMIUM`) and `npm ci` in `tests/browser`;
//! `.ci/run` installs them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use buildpool_tests::{Cluster, Fixture, Owned, ServeOptions, http_get};

/// A crate whose one test prints a line, waits for a file, prints another and waits for a
/// second file: a job whose output grows while the page watches, ended by the page.
fn streaming_crate(release_1: &Path, release_2: &Path) -> Vec<(&'static str, String)> {
    let lib = format!(
        r#"#[cfg(test)]
mod tests {{
    fn wait_for(path: &str) {{
        while !std::path::Path::new(path).exists() {{
            std::thread::sleep(std::time::Duration::from_millis(50));
        }}
    }}

    #[test]
    fn streams_until_released() {{
        println!("tick one");
        wait_for({:?});
        println!("tick two");
        wait_for({:?});
    }}
}}
"#,
        release_1.display().to_string(),
        release_2.display().to_string()
    );
    vec![
        (
            "Cargo.toml",
            "[package]\nname = \"streamer\"\nversion = \"0.1.0\"\nedition = \"2021\"\n".to_owned(),
        ),
        ("src/lib.rs", lib),
    ]
}

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// What the browser test needs, or a message saying how to get it.
fn prerequisites() -> Result<(), String> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if buildpool_core::process::find_on_path("node").is_none() {
        return Err("needs node (apt-get install nodejs)".into());
    }
    if !Path::new(&chromium).exists() {
        return Err(format!("needs {chromium} (apt-get install chromium)"));
    }
    if !browser_dir().join("node_modules/playwright-core").exists() {
        return Err(format!(
            "needs playwright-core: npm ci --prefix {}",
            browser_dir().display()
        ));
    }
    Ok(())
}

#[test]
fn the_dashboard_shows_agents_a_running_job_with_its_live_tail_and_its_end() {
    if let Err(missing) = prerequisites() {
        panic!("the browser test {missing}");
    }
    let releases = tempfile::tempdir().expect("temp");
    let (release_1, release_2) = (
        releases.path().join("release-1"),
        releases.path().join("release-2"),
    );
    let fixture = Fixture::with_files(&streaming_crate(&release_1, &release_2)).expect("fixture");
    let cluster =
        Cluster::start_with(fixture, 1, 1, &ServeOptions::unsandboxed()).expect("cluster starts");
    let fixture = &cluster.fixture;
    // A job that has ended before the page opens, so the finished list is not empty.
    let check = fixture.run(&["run", "check"]).expect("runs");
    assert_eq!(check.code, Some(0), "{check}");

    let streaming =
        fixture.command_in(&fixture.root(), &["run", "test", "--", "--", "--nocapture"]);
    let mut job =
        Owned::spawn(streaming, fixture.scratch().join("streaming-job.log")).expect("job starts");

    let url = format!("{}/", cluster.http_url().expect("http url"));
    let ui = fixture.run(&["ui"]).expect("buildpool ui runs");
    assert_eq!(ui.stdout.trim(), url, "{ui}");
    let screenshots = buildpool_tests::bin_dir().join("dashboard-screenshots");
    std::fs::create_dir_all(&screenshots).expect("screenshot dir");
    let profile = tempfile::tempdir().expect("profile");
    let browser = Command::new("node")
        .arg(browser_dir().join("dashboard.mjs"))
        .arg(&url)
        .arg(&screenshots)
        .arg(profile.path())
        .arg(&release_1)
        .arg(&release_2)
        .output()
        .expect("node runs");
    let report = String::from_utf8_lossy(&browser.stdout);
    let errors = String::from_utf8_lossy(&browser.stderr);
    println!("{report}");
    assert!(
        browser.status.success(),
        "{report}\n{errors}\njob:\n{}\ncoordinator:\n{}",
        job.log_text(),
        cluster.coordinator.log_text()
    );
    for check in [
        "ok: agent worker-1 is shown connected",
        "ok: the live tail shows the first line",
        "ok: the live tail updated with the second line",
        "with outcome success",
    ] {
        assert!(report.contains(check), "{check} missing:\n{report}");
    }
    println!(
        "screenshots: {}",
        screenshots.join("dashboard-running.png").display()
    );

    let ended = job.wait_timeout(Duration::from_secs(120));
    assert_eq!(
        ended.and_then(|status| status.code()),
        Some(0),
        "{}",
        job.log_text()
    );
    // Every finished job links to its whole log.
    let job_id = report
        .lines()
        .find_map(|line| line.strip_prefix("ok: job ")?.split(' ').next())
        .expect("job id reported");
    let (status, log) = http_get(&format!("{url}jobs/{job_id}/log")).expect("log page");
    assert_eq!(status, 200, "{log}");
    assert!(
        log.contains("tick one") && log.contains("tick two"),
        "{log}"
    );
}

/// `GET path` over TLS to `addr` with the coordinator pinned, with extra header lines:
/// the whole answer as text.
async fn https_get(addr: &str, fingerprint: &str, path: &str, headers: &str) -> String {
    use buildpool_proto::tls;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let trust = tls::ServerTrust::Pinned(fingerprint.parse().expect("fingerprint"));
    let config = tls::client_config(&trust, None, &[]).expect("tls config");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{headers}\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    // The server closes after an HTTP/1.0 answer; a TLS close without notify is fine here.
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn beyond_loopback_the_dashboard_and_metrics_are_https_and_need_a_client_credential() {
    let options = ServeOptions {
        extra_args: vec!["--http-addr".into(), "0.0.0.0:0".into()],
        ..ServeOptions::default()
    };
    let cluster = tokio::task::spawn_blocking(move || {
        Cluster::start_with(Fixture::new().expect("fixture"), 0, 1, &options).expect("cluster")
    })
    .await
    .expect("cluster task");
    let url = cluster.http_url().expect("http url");
    assert!(url.starts_with("https://"), "{url}");
    let addr = format!("127.0.0.1:{}", url.rsplit(':').next().expect("port"));
    let pin = cluster.tls_fingerprint.clone();
    let token = std::fs::read_to_string(cluster.fixture.token_file()).expect("token");
    let token = token.trim();

    for path in ["/metrics", "/", "/api/state", "/jobs/1/log"] {
        let refused = https_get(&addr, &pin, path, "").await;
        assert!(refused.starts_with("HTTP/1.0 401"), "{path}: {refused}");
        let wrong = https_get(&addr, &pin, path, "Authorization: Bearer wrong\r\n").await;
        assert!(wrong.starts_with("HTTP/1.0 401"), "{path}: {wrong}");
    }
    let bearer = format!("Authorization: Bearer {token}\r\n");
    let metrics = https_get(&addr, &pin, "/metrics", &bearer).await;
    assert!(metrics.starts_with("HTTP/1.0 200"), "{metrics}");
    assert!(metrics.contains("buildpool_jobs_queued 0"), "{metrics}");

    // The URL `buildpool ui` prints logs the browser in and moves the credential to a cookie.
    let ui = cluster.fixture.run(&["ui"]).expect("buildpool ui runs");
    let printed = ui.stdout.trim();
    assert_eq!(printed, format!("{url}/?token={token}"), "{ui}");
    let login = https_get(&addr, &pin, &format!("/?token={token}"), "").await;
    assert!(login.starts_with("HTTP/1.0 303"), "{login}");
    assert!(login.contains("location: /\r\n"), "{login}");
    let cookie = login
        .lines()
        .find_map(|line| line.strip_prefix("set-cookie: "))
        .expect("a cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("Secure"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().expect("cookie pair");
    let page = https_get(&addr, &pin, "/", &format!("Cookie: {pair}\r\n")).await;
    assert!(page.starts_with("HTTP/1.0 200"), "{page}");
    assert!(page.contains("<title>buildpool</title>"), "{page}");

    // Plain HTTP to the HTTPS port gets no page.
    let plain = tokio::task::spawn_blocking(move || http_get(&format!("http://{addr}/metrics")))
        .await
        .expect("plain task");
    assert!(
        plain.is_err(),
        "plain text reached the HTTPS port: {plain:?}"
    );
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .expect("cleanup");
}
