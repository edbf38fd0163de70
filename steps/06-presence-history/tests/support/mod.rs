//! A client for `/ws/backgroundjob` that keeps a readable transcript, shared
//! by the test files (each uses a part of it).
//!
//! The library's `TestClient` shortens long frames in its transcript, and
//! every frame here is a JSON object of a hundred characters or more, so
//! these clients write the lines themselves: whole frames, with each job id
//! replaced by `<job 1>`, `<job 2>`, ... in the order the ids first appear.
//! Ids are new on every run; the numbers are not.
#![allow(dead_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum_channels::testing::{Received, TestClient, TestServer, Transcript};
use serde_json::Value;

/// The endpoint under test.
pub const PATH: &str = "/ws/backgroundjob";

/// Long enough for a stray frame to show up, short enough to keep the suite
/// quick.
pub const QUIET: Duration = Duration::from_millis(100);

/// Lines longer than this are shortened in transcripts.
const LONG_LINE: usize = 300;

/// A served app and the transcript of everything its clients say and hear.
pub struct Jobs {
    pub server: TestServer,
    log: Log,
}

#[derive(Clone, Default)]
struct Log {
    lines: Arc<Mutex<Vec<String>>>,
    ids: Arc<Mutex<Vec<String>>>,
}

impl Log {
    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(shorten(line));
    }
}

impl Jobs {
    /// Serves `app` on a free port.
    pub async fn start(app: Router) -> Jobs {
        Jobs::on(TestServer::start(app).await)
    }

    /// Records the clients of an app that is already served.
    pub fn on(server: TestServer) -> Jobs {
        Jobs {
            server,
            log: Log::default(),
        }
    }

    /// Connects a client called `name` and checks the welcome frame.
    pub async fn connect(&self, name: &'static str) -> JobClient {
        self.log.push(format!("{name} connect {PATH}"));
        // The library's own transcript of this client is not used.
        let inner = self
            .server
            .connect_as(name, PATH, &Transcript::default())
            .await;
        let mut client = JobClient {
            name,
            inner,
            log: self.log.clone(),
        };
        client.expect_status("connected").await;
        client
    }

    /// Adds a line of the test's own, e.g. what it does next.
    pub fn note(&self, line: &str) {
        self.log.push(format!("# {line}"));
    }

    /// The transcript so far, job ids replaced by `<job N>`.
    pub fn transcript(&self) -> String {
        let mut text = self.log.lines.lock().unwrap().join("\n");
        text.push('\n');
        for (n, id) in self.log.ids.lock().unwrap().iter().enumerate() {
            text = text.replace(id, &format!("<job {}>", n + 1));
        }
        text
    }
}

/// One client of the endpoint.
pub struct JobClient {
    name: &'static str,
    inner: TestClient,
    log: Log,
}

impl JobClient {
    /// Lets this client wait longer than the library's 5 s for a frame.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.inner.set_timeout(timeout);
    }

    pub async fn send_text(&mut self, text: &str) {
        self.log.push(format!("{} > {text}", self.name));
        self.inner.send_text(text).await;
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        let hex: Vec<String> = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
        self.log
            .push(format!("{} > [binary: {}]", self.name, hex.join(" ")));
        self.inner.send_bytes(bytes).await;
    }

    /// The next frame, which must be a JSON object.
    pub async fn recv(&mut self) -> Value {
        let text = match self.inner.recv().await {
            Received::Text(text) => text,
            other => panic!("{}: expected a JSON text frame, got {other}", self.name),
        };
        self.log.push(format!("{} < {text}", self.name));
        let value: Value = serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("{}: not JSON ({err}): {text}", self.name));
        if let Some(id) = value["job_id"].as_str() {
            let mut ids = self.log.ids.lock().unwrap();
            if !ids.iter().any(|known| known == id) {
                ids.push(id.to_owned());
            }
        }
        value
    }

    /// Waits for a `{"status": status, ...}` frame; returns its `job_id`,
    /// or an empty string if it has none.
    pub async fn expect_status(&mut self, status: &str) -> String {
        let frame = self.recv().await;
        assert_eq!(frame["status"], status, "{}: {frame}", self.name);
        assert!(frame["message"].is_string(), "{}: {frame}", self.name);
        frame["job_id"].as_str().unwrap_or_default().to_owned()
    }

    /// Waits for the result of job `id`.
    pub async fn expect_result(&mut self, id: &str) -> String {
        let frame = self.recv().await;
        assert_eq!(frame["type"], "job_result", "{}: {frame}", self.name);
        assert_eq!(frame["job_id"], id, "{}: {frame}", self.name);
        frame["message"].as_str().unwrap_or_default().to_owned()
    }

    /// Waits for the result of any job; returns its id.
    pub async fn expect_any_result(&mut self) -> String {
        let frame = self.recv().await;
        assert_eq!(frame["type"], "job_result", "{}: {frame}", self.name);
        frame["job_id"].as_str().unwrap_or_default().to_owned()
    }

    /// Queues a job and returns its id, after checking both answers.
    pub async fn queue(&mut self, kind: &str, content: &str) -> String {
        // As the page sends it: `JSON.stringify({type, content})`.
        let content = Value::from(content);
        self.send_text(&format!(r#"{{"type":"{kind}","content":{content}}}"#))
            .await;
        self.expect_status("queuing").await;
        self.expect_status("queued").await
    }

    /// Queues a job, waits for its result and returns the result's text.
    pub async fn run(&mut self, kind: &str, content: &str) -> String {
        let id = self.queue(kind, content).await;
        self.expect_result(&id).await
    }

    /// Fails the test if any frame arrives within `window`.
    pub async fn expect_silence(&mut self, window: Duration) {
        self.inner.expect_silence(window).await;
    }

    /// Closes cleanly and waits for the server's reply.
    pub async fn close(self) {
        self.log.push(format!("{} > [close 1000]", self.name));
        let reply = self.inner.close(1000).await;
        self.log.push(format!("{} < {reply}", self.name));
    }
}

/// Long lines become `start… (N bytes)` so transcripts stay readable.
fn shorten(line: String) -> String {
    if line.chars().count() <= LONG_LINE {
        return line;
    }
    let start: String = line.chars().take(80).collect();
    format!("{start}… ({} bytes)", line.len())
}

/// What the code under test logs, at every level, for as long as this
/// value lives. Works because `#[tokio::test]` runs the test, the server and
/// every task they spawn on the test's own thread.
pub struct Logs {
    buffer: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

/// Starts capturing this thread's logs.
pub fn capture_logs() -> Logs {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let buffer = Arc::clone(&buffer);
        move || Capture(Arc::clone(&buffer))
    };
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(writer)
        .finish();
    Logs {
        buffer,
        _guard: tracing::subscriber::set_default(subscriber),
    }
}

impl Logs {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buffer.lock().unwrap()).into_owned()
    }

    /// How many lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.text()
            .lines()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// Waits up to 5 s for a line that contains `needle`.
    pub async fn wait_for(&self, needle: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.count(needle) == 0 {
            if tokio::time::Instant::now() > deadline {
                panic!("no log line with {needle:?} within 5 s:\n{}", self.text());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
