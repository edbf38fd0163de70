//! Test helpers: serve a `Router` on a free port and talk to it like a client.
//!
//! WebSocket upgrades need a real server, so [`TestServer`] binds
//! `127.0.0.1:0` and serves the app in the test's own runtime. Each
//! [`TestClient`] writes what it sends and receives into a shared
//! [`Transcript`], one line per frame, so a snapshot test reads like a chat
//! log:
//!
//! ```text
//! alice < 🔧 System: Connection established!
//! alice > hello
//! alice < 🔧 System Echo: hello
//! ```
//!
//! Lines are recorded in the order the test awaits them, so the transcript is
//! deterministic even when several clients talk at once.
//!
//! This is what a user of the library needs to test a consumer, and it
//! starts no process. The harnesses that run real programs beside a test (a
//! server binary, redis-server, nginx, Python peers) are this workspace's
//! own, in the unpublished `channels-testkit` crate.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::runtime::Runtime;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode, header};
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tower::ServiceExt;

/// How long a client waits for an expected frame before the test fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Texts longer than this are shortened in transcripts.
const LONG_TEXT: usize = 120;

/// An app served on `127.0.0.1` at a free port, stopped when dropped.
///
/// It is served as [`serve`](crate::serve) would serve it, by a
/// [`Runtime`] of its own, so tests in one process do not share a
/// connection limit or a shutdown.
pub struct TestServer {
    app: Router,
    addr: SocketAddr,
    runtime: Runtime,
    task: JoinHandle<()>,
}

impl TestServer {
    /// Serves `app` on a free port of `127.0.0.1`, with the default
    /// [`Settings`](crate::Settings).
    pub async fn start(app: Router) -> TestServer {
        TestServer::start_with(Runtime::default(), app).await
    }

    /// Serves `app` with `runtime` (its settings, its shutdown).
    pub async fn start_with(runtime: Runtime, app: Router) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a free port on 127.0.0.1");
        let addr = listener.local_addr().expect("read the bound address");
        let serving = runtime.clone();
        let served = app.clone();
        let stop = runtime.shutting_down();
        let task = tokio::spawn(async move {
            crate::server::serve_with(serving, listener, served, stop)
                .await
                .expect("serve the app");
        });
        TestServer {
            app: runtime.attach(app),
            addr,
            runtime,
            task,
        }
    }

    /// The runtime that serves the app: shut it down to test a shutdown.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The address the app listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://127.0.0.1:PORT{path}`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Connects an unnamed client with a transcript of its own.
    pub async fn connect(&self, path: &str) -> TestClient {
        self.connect_as("", path, &Transcript::default()).await
    }

    /// Connects a client called `name` that records into `transcript`.
    ///
    /// Panics (failing the test) if the handshake is refused.
    pub async fn connect_as(&self, name: &str, path: &str, transcript: &Transcript) -> TestClient {
        match self.try_connect_as(name, path, transcript).await {
            Ok(client) => client,
            Err(status) => panic!("{path}: handshake refused with HTTP {status}"),
        }
    }

    /// Like [`connect_as`](Self::connect_as), but returns the HTTP status
    /// when the handshake is refused, and records the refusal.
    pub async fn try_connect_as(
        &self,
        name: &str,
        path: &str,
        transcript: &Transcript,
    ) -> Result<TestClient, StatusCode> {
        TestClient::connect_url(&self.ws_url(path), name, path, transcript).await
    }

    /// Sends `GET path` to the app (no network needed for plain HTTP).
    pub async fn get(&self, path: &str) -> HttpResponse {
        let request = Request::get(path)
            .body(Body::empty())
            .expect("a valid request");
        let response = self.app.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("read the body")
            .to_bytes();
        HttpResponse {
            status,
            content_type,
            body,
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A plain HTTP response, read whole.
#[derive(Debug)]
#[non_exhaustive]
pub struct HttpResponse {
    /// The status code.
    pub status: StatusCode,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The body.
    pub body: Bytes,
}

impl HttpResponse {
    /// The body as text (lossy for invalid UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// One line for a transcript: `GET /x -> 200 OK (text/css)`.
    pub fn summary(&self, path: &str) -> String {
        let content_type = self.content_type.as_deref().unwrap_or("no content type");
        format!("GET {path} -> {} ({content_type})", self.status)
    }
}

/// The lines clients record, shared between them. Print it with `{}`.
#[derive(Clone, Default)]
pub struct Transcript(Arc<Mutex<Vec<String>>>);

impl Transcript {
    /// Adds a line of your own, e.g. a note on what the test does next.
    pub fn push(&self, line: impl Into<String>) {
        self.0.lock().expect("transcript lock").push(line.into());
    }
}

impl fmt::Display for Transcript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in self.0.lock().expect("transcript lock").iter() {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

/// What a client received. `#[non_exhaustive]`: a match on it needs a `_`
/// arm.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Received {
    /// A text frame.
    Text(String),
    /// A binary frame.
    Binary(Vec<u8>),
    /// A close frame (code 1005 if it carried none).
    Close {
        /// The close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
    /// The connection ended without a close frame.
    Dropped,
}

impl fmt::Display for Received {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Received::Text(text) => f.write_str(&shorten(text)),
            Received::Binary(bytes) => f.write_str(&describe_binary(bytes)),
            Received::Close { code, reason } if reason.is_empty() => write!(f, "[close {code}]"),
            Received::Close { code, reason } => write!(f, "[close {code}: {reason}]"),
            Received::Dropped => f.write_str("[connection dropped without a close frame]"),
        }
    }
}

/// One WebSocket client that records a transcript.
pub struct TestClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    prefix: String,
    transcript: Transcript,
    timeout: Duration,
}

impl TestClient {
    /// Connects a client called `name` to `url` (whose path, for the
    /// transcript, is `path`); the HTTP status if the handshake is refused,
    /// recorded too.
    pub async fn connect_url(
        url: &str,
        name: &str,
        path: &str,
        transcript: &Transcript,
    ) -> Result<TestClient, StatusCode> {
        let prefix = if name.is_empty() {
            String::new()
        } else {
            format!("{name} ")
        };
        transcript.push(format!("{prefix}connect {path}"));
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _response)) => Ok(TestClient {
                ws,
                prefix,
                transcript: transcript.clone(),
                timeout: DEFAULT_TIMEOUT,
            }),
            Err(tungstenite::Error::Http(response)) => {
                let status = response.status();
                transcript.push(format!("{prefix}refused: HTTP {status}"));
                Err(status)
            }
            Err(err) => panic!("{path}: cannot connect: {err}"),
        }
    }

    /// This client's transcript.
    pub fn transcript(&self) -> &Transcript {
        &self.transcript
    }

    /// Changes how long [`recv`](Self::recv) waits before failing the test.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn record(&self, direction: char, what: &str) {
        self.transcript
            .push(format!("{}{direction} {what}", self.prefix));
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.record('>', &shorten(text));
        self.ws
            .send(Message::text(text))
            .await
            .expect("send a text frame");
    }

    /// Sends a binary frame.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.record('>', &describe_binary(bytes));
        self.ws
            .send(Message::binary(bytes.to_vec()))
            .await
            .expect("send a binary frame");
    }

    /// Sends a JSON value as a text frame.
    pub async fn send_json(&mut self, value: &serde_json::Value) {
        self.send_text(&value.to_string()).await;
    }

    /// Waits for the next frame (pings and pongs are skipped). Fails the test
    /// if nothing arrives within the timeout.
    pub async fn recv(&mut self) -> Received {
        let received = match tokio::time::timeout(self.timeout, self.next()).await {
            Ok(received) => received,
            Err(_) => panic!(
                "{}nothing received within {:?}\ntranscript so far:\n{}",
                self.prefix, self.timeout, self.transcript
            ),
        };
        self.record('<', &received.to_string());
        received
    }

    /// Waits for the next frame and returns its text; fails the test if it
    /// is anything but a text frame.
    pub async fn recv_text(&mut self) -> String {
        match self.recv().await {
            Received::Text(text) => text,
            other => panic!("{}expected a text frame, got {other}", self.prefix),
        }
    }

    /// Waits up to `window` for the next frame; `None` if none came (which,
    /// unlike [`recv`](Self::recv), is not a failure). For polling with a
    /// deadline of the test's own.
    pub async fn try_recv(&mut self, window: Duration) -> Option<Received> {
        let received = tokio::time::timeout(window, self.next()).await.ok()?;
        self.record('<', &received.to_string());
        Some(received)
    }

    /// Fails the test if any frame arrives within `window`.
    pub async fn expect_silence(&mut self, window: Duration) {
        if let Ok(received) = tokio::time::timeout(window, self.next()).await {
            panic!(
                "{}expected silence for {window:?}, got {received}\ntranscript so far:\n{}",
                self.prefix, self.transcript
            );
        }
    }

    /// Closes cleanly with `code` and waits for the server's reply.
    pub async fn close(mut self, code: u16) -> Received {
        self.record('>', &format!("[close {code}]"));
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        };
        self.ws
            .close(Some(frame))
            .await
            .expect("send a close frame");
        self.recv().await
    }

    /// Drops the TCP connection without a close frame, like a client whose
    /// network vanished.
    pub fn drop_connection(self) {
        self.record('>', "[TCP connection dropped]");
        drop(self.ws);
    }

    async fn next(&mut self) -> Received {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(text))) => return Received::Text(text.as_str().to_owned()),
                Some(Ok(Message::Binary(bytes))) => return Received::Binary(bytes.to_vec()),
                Some(Ok(Message::Close(frame))) => {
                    return match frame {
                        Some(frame) => Received::Close {
                            code: frame.code.into(),
                            reason: frame.reason.as_str().to_owned(),
                        },
                        None => Received::Close {
                            code: 1005,
                            reason: String::new(),
                        },
                    };
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Received::Dropped,
            }
        }
    }
}

/// Long texts become `start… (N bytes)` so transcripts stay readable.
fn shorten(text: &str) -> String {
    if text.chars().count() <= LONG_TEXT {
        return text.to_owned();
    }
    let start: String = text.chars().take(32).collect();
    format!("{start}… ({} bytes)", text.len())
}

fn describe_binary(bytes: &[u8]) -> String {
    if bytes.len() > 16 {
        return format!("[binary: {} bytes]", bytes.len());
    }
    let hex: Vec<String> = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("[binary: {}]", hex.join(" "))
}
