//! The web UI: one self-contained page served by the management listener, driven end
//! to end by headless Chromium (Debian's `chromium`): it logs in as RabbitMQ's UI does
//! from `#/login/<user>/<password>`, renders the overview from the API, and leaves a
//! screenshot (`WARREN_UI_SCREENSHOT`, default under the test target dir) for CI.

mod common;
mod util;

use std::path::PathBuf;

use serde_json::json;
use util::http::request;

/// Debian's chromium, found on PATH or at `WARREN_CHROMIUM`. Without it the browser
/// test is skipped, unless `WARREN_REQUIRE_CHROMIUM=1` (CI) makes that a failure.
fn chromium() -> Option<PathBuf> {
    let explicit = std::env::var_os("WARREN_CHROMIUM").map(PathBuf::from);
    let found = explicit.or_else(|| {
        let paths = std::env::var_os("PATH")?;
        std::env::split_paths(&paths)
            .flat_map(|p| [p.join("chromium"), p.join("chromium-browser")])
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("WARREN_REQUIRE_CHROMIUM").as_deref() != Ok("1"),
            "chromium is required (apt-get install chromium, or set WARREN_CHROMIUM)"
        );
        eprintln!("chromium not found: skipping");
    }
    found
}

/// Runs headless chromium on `url` with `args`; returns its stdout. (A blocking
/// std::process child on a blocking thread: chromium's own child processes are then
/// none of tokio's business.)
async fn headless(chromium: &PathBuf, url: &str, args: &[&str]) -> String {
    let profile = std::env::temp_dir().join(util::uniq("warren-chromium"));
    let mut cmd = std::process::Command::new(chromium);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--virtual-time-budget=5000",
        "--window-size=1200,900",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url)
    .stdin(std::process::Stdio::null())
    .stderr(std::process::Stdio::inherit());
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(90),
        tokio::task::spawn_blocking(move || cmd.output()),
    )
    .await
    .expect("chromium finished within 90 s")
    .expect("the blocking task ran")
    .expect("chromium runs");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn the_page_is_served_by_the_management_listener_without_external_assets() {
    let t = common::TestBroker::start().await;
    let b = t.broker.as_ref().expect("broker");
    let r = request(b.management_addr().expect("api"), "GET", "/", None, None).await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/html"))
    );
    let page = String::from_utf8_lossy(&r.body).to_lowercase();
    assert!(
        page.contains("<script>") && page.contains("/api"),
        "the page drives the API"
    );
    for external in ["src=\"http", "href=\"http", "<link", "@import", "src=\"//"] {
        assert!(!page.contains(external), "external asset: {external}");
    }
}

// Chromium talks to the in-process broker while the test waits for it: give the
// broker worker threads of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_logs_in_and_renders_the_overview() {
    let Some(chromium) = chromium() else {
        return;
    };
    let t = common::TestBroker::start().await;
    let b = t.broker.as_ref().expect("broker");
    let api = b.management_addr().expect("api");
    let auth = Some(("guest", "guest"));
    let r = request(
        api,
        "PUT",
        "/api/queues/%2f/ui-orders",
        auth,
        Some(&json!({})),
    )
    .await;
    assert_eq!(r.status, 201);
    for i in 0..3 {
        let body = json!({"routing_key": "ui-orders", "payload": format!("m{i}"),
                          "payload_encoding": "string", "properties": {}});
        let r = request(
            api,
            "POST",
            "/api/exchanges/%2f/amq.default/publish",
            auth,
            Some(&body),
        )
        .await;
        assert_eq!(r.json()["routed"], true);
    }
    let url = format!("http://{api}/#/login/guest/guest");
    let dom = headless(&chromium, &url, &["--dump-dom"]).await;
    assert!(dom.contains("Overview of warren@"), "{dom}");
    assert!(
        dom.contains("<b id=\"queued\">3</b>"),
        "three queued messages: {dom}"
    );
    assert!(
        dom.contains("<td>ui-orders</td>"),
        "the queue is listed: {dom}"
    );

    let refused = headless(
        &chromium,
        &format!("http://{api}/#/login/guest/wrong"),
        &["--dump-dom"],
    )
    .await;
    assert!(refused.contains("Login failed"), "{refused}");

    let shot = std::env::var_os("WARREN_UI_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-ui.png"));
    if let Some(dir) = shot.parent() {
        std::fs::create_dir_all(dir).expect("screenshot directory");
    }
    let _ = std::fs::remove_file(&shot);
    headless(
        &chromium,
        &url,
        &[&format!("--screenshot={}", shot.display())],
    )
    .await;
    let png = std::fs::read(&shot).expect("a screenshot was written");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
}
