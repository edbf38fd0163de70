//! Drives the demo page in a real, headless Chromium, through WebDriver.
//!
//! The tests serve a step's `app()` in-process on a free port and point the
//! browser at it, so they check what a reader sees: the page's script, its
//! WebSocket URLs (derived from `location`, so any port works), and the
//! panels' behaviour against the real server.
//!
//! They need Debian's `chromium` and `chromium-driver`. Without
//! `chromedriver` on `PATH` each test says so and passes, so the test command
//! works on any machine; under `CI=true` a missing driver is a failure, since
//! CI installs it.

use std::io::Write;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

/// How long a page condition may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(10);

/// A headless Chromium session and the chromedriver behind it.
pub struct Browser {
    client: Client,
    driver: Child,
    /// Chromium's profile, removed with the browser. Left to chromedriver,
    /// it would be a `/tmp/org.chromium.Chromium.scoped_dir.*` of a few
    /// MB that outlives every test run.
    profile: std::path::PathBuf,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium, or returns `None` (after
    /// saying why) when chromedriver is not installed outside CI.
    pub async fn launch() -> Option<Browser> {
        let installed = Command::new("chromedriver")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !installed {
            let hint = "install it with `apt-get install chromium chromium-driver`";
            if std::env::var_os("CI").is_some() {
                panic!("chromedriver is required in CI: {hint}");
            }
            // Straight to stderr: the test harness captures `eprintln!` of
            // passing tests, and a skip must not pass unnoticed.
            let note = format!("browser test skipped: chromedriver is not installed ({hint})\n");
            let _ = std::io::stderr().write_all(note.as_bytes());
            return None;
        }

        let port = free_port();
        let profile =
            std::env::temp_dir().join(format!("browser-tests-{}-{port}", std::process::id()));
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        let client = loop {
            // chromedriver takes a moment to listen; retry until it answers.
            match ClientBuilder::new(HttpConnector::new())
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                Err(err) if started.elapsed() > PATIENCE => {
                    panic!("cannot start a Chromium session: {err}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        Some(Browser {
            client,
            driver,
            profile,
        })
    }

    /// Opens `url` in the current tab.
    pub async fn open(&self, url: &str) {
        self.client.goto(url).await.expect("open the page");
    }

    /// Resizes the window, e.g. to a phone's width.
    pub async fn resize(&self, width: u32, height: u32) {
        self.client
            .set_window_size(width, height)
            .await
            .expect("resize the window");
    }

    /// Evaluates a JavaScript expression in the page.
    pub async fn eval(&self, expression: &str) -> Value {
        self.client
            .execute(&format!("return ({expression});"), Vec::new())
            .await
            .unwrap_or_else(|err| panic!("evaluate {expression}: {err}"))
    }

    /// Waits until a JavaScript expression is true; `what` names it for the
    /// failure message.
    pub async fn wait_until(&self, expression: &str, what: &str) {
        self.wait_until_within(PATIENCE, expression, what).await;
    }

    /// [`wait_until`](Self::wait_until), with a patience of its own.
    pub async fn wait_until_within(&self, patience: Duration, expression: &str, what: &str) {
        let started = Instant::now();
        while self.eval(expression).await != Value::Bool(true) {
            if started.elapsed() > patience {
                panic!("waited {patience:?} for {what} ({expression})");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn element(&self, css: &str) -> Element {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|err| panic!("find {css}: {err}"))
    }

    /// Waits until the panel or box whose status element is `#{name}-status`
    /// reaches `state` (its `data-state`: `open`, `idle`, `missing`, ...).
    pub async fn wait_for_state(&self, name: &str, state: &str) {
        let condition =
            format!("document.querySelector('#{name}-status').dataset.state === '{state}'");
        self.wait_until(&condition, &format!("#{name}-status to be {state}"))
            .await;
    }

    /// The text of the element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        self.element(css).await.text().await.expect("read the text")
    }

    /// The text of each entry of a message log, e.g. `#system-log`.
    pub async fn log(&self, css: &str) -> Vec<String> {
        let entries = self
            .eval(&format!(
                "[...document.querySelectorAll('{css} li')].map(li => li.textContent)"
            ))
            .await;
        serde_json::from_value(entries).expect("a list of strings")
    }

    /// Clicks the element matching `css`.
    pub async fn click(&self, css: &str) {
        self.element(css)
            .await
            .click()
            .await
            .unwrap_or_else(|err| panic!("click {css}: {err}"));
    }

    /// Replaces the content of the input matching `css` with `text`.
    pub async fn fill(&self, css: &str, text: &str) {
        let input = self.element(css).await;
        input.clear().await.expect("clear the input");
        input.send_keys(text).await.expect("type into the input");
    }

    /// Types `text` into the input matching `css` and presses Enter.
    pub async fn type_and_enter(&self, css: &str, text: &str) {
        self.element(css)
            .await
            .send_keys(&format!("{text}\u{e007}"))
            .await
            .expect("type into the input");
    }

    /// Takes a picture of the whole page for the book: the window is
    /// made as tall as the page, at `width` px, and the picture is checked
    /// to be a PNG. It is written to `docs/src/img/{name}.png` only when
    /// `SCREENSHOTS=1` is set (`cargo xtask screenshots`), so a normal test
    /// run, CI's included, never rewrites a committed file.
    pub async fn picture(&self, name: &str, width: u32) {
        // Nothing may be focused or scrolled: the picture shows the page
        // as a reader first sees it.
        self.eval("(document.activeElement && document.activeElement.blur(), window.scrollTo(0, 0), true)")
            .await;
        self.resize(width, 900).await;
        // The window's height includes the browser's own bars.
        let height = self
            .eval("document.documentElement.scrollHeight + outerHeight - innerHeight")
            .await;
        let height = height.as_u64().expect("a height") as u32;
        self.resize(width, height).await;
        let png = self.client.screenshot().await.expect("take a screenshot");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        if std::env::var_os("SCREENSHOTS").is_some_and(|value| value == "1") {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../docs/src/img")
                .join(format!("{name}.png"));
            std::fs::write(&path, png)
                .unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
        }
    }

    /// Ends the session and stops chromedriver.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A failed test never reaches `close`; don't leave a driver behind.
        let _ = self.driver.kill();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port on 127.0.0.1")
}
