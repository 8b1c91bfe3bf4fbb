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
