//! The web UI: one self-contained page served by the management listener, driven end
//! to end by headless Chromium (Debian's `chromium` through Debian's `chromedriver`):
//! an operator logs in through the form, watches the overview's live message-rate plot,
//! publishes a message through the exchanges page's form, gets it back through the
//! queues page's form, and sees connections, channels, users and vhosts. A screenshot
//! of the overview is left for CI (`WARREN_UI_SCREENSHOT`, by default
//! `target/ci-artifacts/web-ui.png`).

mod common;
mod util;
mod webdriver;

use std::path::PathBuf;
use std::time::Duration;

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use util::http::request;
use webdriver::Browser;

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

/// Where the screenshot goes: not under target/debug, which CI removes after the tests.
fn screenshot_path() -> PathBuf {
    std::env::var_os("WARREN_UI_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ci-artifacts/web-ui.png")
        })
}

/// How many pixels of the rate plot are drawn in the publish line's colour.
const PUBLISH_PIXELS: &str = "
    const c = document.getElementById('rates');
    if (!c) { return 0; }
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4) {
        if (d[i] > 150 && d[i + 1] < 90 && d[i + 2] < 90 && d[i + 3] > 0) { n++; }
    }
    return n;";

// Chromium talks to the in-process broker while the test waits for it: give the
// broker worker threads of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_logs_in_watches_rates_publishes_and_gets_a_message_in_chromium() {
    let Some((chromium, driver)) = webdriver::tools() else {
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
        Some(&json!({"durable": true})),
    )
    .await;
    assert_eq!(r.status, 201);

    // A client connection with a channel that publishes, so that the rates move and
    // the connections and channels pages have something to list.
    let conn = Connection::connect(&t.url, ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        "ui-load".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let publisher = tokio::spawn(async move {
        for i in 0u32..400 {
            let _ = ch
                .basic_publish(
                    "".into(),
                    "ui-load".into(),
                    BasicPublishOptions::default(),
                    &i.to_be_bytes(),
                    BasicProperties::default(),
                )
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ch
    });

    let artifacts = screenshot_path();
    if let Some(dir) = artifacts.parent() {
        std::fs::create_dir_all(dir).expect("artifact directory");
    }
    let browser = Browser::start(
        &chromium,
        &driver,
        &artifacts.with_file_name("chromedriver.log"),
    )
    .await;
    let page = format!("http://{api}/");

    // A wrong password is refused with the API's reason, and the form stays.
    browser.goto(&page).await;
    browser.fill("#login [name=user]", "guest").await;
    browser.fill("#login [name=password]", "wrong").await;
    browser.click("#login button").await;
    browser
        .wait_text("#page", "Login failed", Duration::from_secs(10))
        .await;

    browser.fill("#login [name=user]", "guest").await;
    browser.fill("#login [name=password]", "guest").await;
    browser.click("#login button").await;
    let overview = browser
        .wait_text("#page", "Overview of warren@", Duration::from_secs(10))
        .await;
    assert!(overview.contains("ui-orders"), "queue listed: {overview}");
    assert_eq!(browser.text("#who").await, "guest");

    // The overview refreshes itself; the rate plot shows the publishes as they come.
    browser
        .wait_text("#page .legend", "publish", Duration::from_secs(5))
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    loop {
        let legend = browser.text("#page .legend").await;
        let pixels = browser.script(PUBLISH_PIXELS, json!([])).await;
        let rate_shown = !legend.contains("publish 0.0/s");
        if rate_shown && pixels.as_u64().unwrap_or(0) > 20 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no publish rate plotted: legend {legend:?}, {pixels} red pixels"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Publish through the exchanges page's form.
    browser.click("#nav a[href='#/exchanges']").await;
    let exchanges = browser
        .wait_text("#page", "amq.topic", Duration::from_secs(10))
        .await;
    assert!(exchanges.contains("(AMQP default)"), "{exchanges}");
    browser.fill("#publish [name=key]", "ui-orders").await;
    browser
        .fill("#publish [name=payload]", "hello from the browser")
        .await;
    browser.click("#publish [name=persistent]").await;
    browser.click("#publish button").await;
    browser
        .wait_text("#published", "Routed.", Duration::from_secs(10))
        .await;

    // The message is really in the queue, persistent, as published through the form.
    let r = request(api, "GET", "/api/queues/%2f/ui-orders", auth, None).await;
    assert_eq!(r.json()["messages"], 1, "{}", r.json());

    // Get it back through the queues page's form.
    browser.click("#nav a[href='#/queues']").await;
    browser
        .wait_text("#page", "ui-orders", Duration::from_secs(10))
        .await;
    browser.fill("#get [name=queue]", "ui-orders").await;
    browser.click("#get button").await;
    let got = browser
        .wait_text("#got", "hello from the browser", Duration::from_secs(10))
        .await;
    assert!(got.contains("ui-orders"), "routing key shown: {got}");

    // Connections, channels, users and vhosts.
    let r = request(api, "GET", "/api/connections", auth, None).await;
    let name = r.json()[0]["name"]
        .as_str()
        .expect("the client's connection")
        .to_string();
    browser.click("#nav a[href='#/connections']").await;
    browser
        .wait_text("#page", &name, Duration::from_secs(10))
        .await;
    browser.click("#nav a[href='#/channels']").await;
    browser
        .wait_text("#page", &format!("{name} (1)"), Duration::from_secs(10))
        .await;
    browser.click("#nav a[href='#/users']").await;
    browser
        .wait_text("#page", "administrator", Duration::from_secs(10))
        .await;
    browser.click("#nav a[href='#/vhosts']").await;
    let vhosts = browser
        .wait_text("#page", "Virtual hosts", Duration::from_secs(10))
        .await;
    assert!(vhosts.contains('/'), "{vhosts}");

    // Back to the overview for the screenshot CI keeps.
    browser.click("#nav a[href='#/overview']").await;
    browser
        .wait_text("#page", "Message rates", Duration::from_secs(10))
        .await;
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    std::fs::write(&artifacts, &png).expect("screenshot written");
    browser.quit().await;

    let ch = publisher.await.expect("publisher");
    let _ = ch.close(200, "bye".into()).await;
    let _ = conn.close(200, "bye".into()).await;
}
