//! A small W3C WebDriver client for the web UI test: Debian's `chromedriver` driving
//! Debian's `chromium` headless, spoken to over plain HTTP (the tests' own client).
//!
//! Why chromedriver rather than `chromium --dump-dom`: a page can be clicked and typed
//! into, as an operator does. (The first version's hang was not the test harness: its
//! wrong-password run got a 401 with `WWW-Authenticate: Basic`, on which Chromium waits
//! for a password prompt that headless mode never shows; it hung from a shell too. The
//! page's requests now omit ambient credentials, so no prompt is ever due.) The driver
//! writes its log to a file, shares no pipe with the test, and is killed when the test
//! ends; the browser gets a throw-away profile and no background networking.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::util::http::{Response, parse};

/// The key under which WebDriver names an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Chromium's flags for a closed network and a clean, throw-away profile.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
];

/// A program found at `$var` or on PATH.
fn program(var: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(explicit) = std::env::var_os(var) {
        return Some(PathBuf::from(explicit));
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .flat_map(|p| names.iter().map(move |n| p.join(n)))
        .find(|p| p.is_file())
}

/// Chromium and chromedriver, or `None` (the test skips) when either is missing,
/// unless `WARREN_REQUIRE_CHROMIUM=1` (CI) makes that a failure.
pub fn tools() -> Option<(PathBuf, PathBuf)> {
    let chromium = program("WARREN_CHROMIUM", &["chromium", "chromium-browser"]);
    let driver = program("WARREN_CHROMEDRIVER", &["chromedriver"]);
    match (chromium, driver) {
        (Some(c), Some(d)) => Some((c, d)),
        _ => {
            assert!(
                std::env::var("WARREN_REQUIRE_CHROMIUM").as_deref() != Ok("1"),
                "chromium and chromedriver are required \
                 (apt-get install chromium chromium-driver)"
            );
            eprintln!("chromium or chromedriver not found: skipping");
            None
        }
    }
}

/// One request to chromedriver, read by its Content-Length: chromedriver answers
/// `Connection: close` but keeps the socket open, so reading to EOF would never end.
async fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Response {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects to chromedriver");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.expect("writes");
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        if let Some(head) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&raw[..head]).to_ascii_lowercase();
            let length = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if let Some(length) = length
                && raw.len() >= head + 4 + length
            {
                break;
            }
        }
        let n = stream.read(&mut buf).await.expect("reads");
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    parse(&raw)
}

/// One browser session; the driver process is killed when this is dropped.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Browser {
    /// Starts chromedriver on a free port (log in `log`) and opens a headless session.
    pub async fn start(chromium: &Path, driver: &Path, log: &Path) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log_file = std::fs::File::create(log).expect("driver log");
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log handle"))
            .stderr(log_file)
            .spawn()
            .expect("chromedriver starts");
        let profile = std::env::temp_dir().join(crate::util::uniq("warren-chromium"));
        let mut browser = Browser {
            driver: child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            session: String::new(),
            profile,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if tokio::net::TcpStream::connect(browser.addr).await.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|f| f.to_string()).collect();
        args.push(format!("--user-data-dir={}", browser.profile.display()));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let created = browser.call("POST", "/session", Some(&caps)).await;
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_string();
        browser
    }

    /// One WebDriver command; its `value`, or a panic naming the command's error.
    async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            request(self.addr, method, path, body),
        )
        .await
        .unwrap_or_else(|_| panic!("webdriver {method} {path} took over 30 s"));
        let v = r.json();
        assert_eq!(r.status, 200, "webdriver {method} {path}: {v}");
        v["value"].clone()
    }

    async fn session_call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        self.call(method, &path, body).await
    }

    /// Loads `url`.
    pub async fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(&json!({"url": url})))
            .await;
    }

    /// The first element matching a CSS selector, waiting up to 10 s for it.
    pub async fn find(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = self
                .script(
                    "return document.querySelector(arguments[0]) !== null;",
                    json!([css]),
                )
                .await;
            if found == json!(true) {
                break;
            }
            assert!(Instant::now() < deadline, "no element {css}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let v = self
            .session_call(
                "POST",
                "/element",
                Some(&json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT].as_str().expect("an element id").to_string()
    }

    /// Replaces the text of the input matching `css` by typing `text` into it.
    pub async fn fill(&self, css: &str, text: &str) {
        let el = self.find(css).await;
        self.session_call("POST", &format!("/element/{el}/clear"), Some(&json!({})))
            .await;
        self.session_call(
            "POST",
            &format!("/element/{el}/value"),
            Some(&json!({"text": text})),
        )
        .await;
    }

    /// Clicks the element matching `css`.
    pub async fn click(&self, css: &str) {
        let el = self.find(css).await;
        self.session_call("POST", &format!("/element/{el}/click"), Some(&json!({})))
            .await;
    }

    /// Runs `body` as a function in the page with `args`; its result.
    pub async fn script(&self, body: &str, args: Value) -> Value {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(&json!({"script": body, "args": args})),
        )
        .await
    }

    /// The visible text of the element matching `css` (empty when there is none).
    pub async fn text(&self, css: &str) -> String {
        let v = self
            .script(
                "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
                json!([css]),
            )
            .await;
        v.as_str().unwrap_or_default().to_string()
    }

    /// Waits up to `limit` until the text of `css` contains `needle`; returns that text.
    pub async fn wait_text(&self, css: &str, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.text(css).await;
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{css} never showed {needle:?}; it shows: {text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Vec<u8> {
        let v = self.session_call("GET", "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64 screenshot"))
            .expect("valid base64")
    }

    /// Ends the session (closes the browser) before the driver is killed.
    pub async fn quit(self) {
        let path = format!("/session/{}", self.session);
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            request(self.addr, "DELETE", &path, None),
        )
        .await;
    }
}
