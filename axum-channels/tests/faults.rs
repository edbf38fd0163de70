//! Clients that misbehave on purpose, against the whole stack as `serve`
//! runs it: one that keeps talking after our close frame, one that floods,
//! one that sends half a request, one that holds more sockets than the
//! server may open; and routes with settings of their own, which still
//! follow the process's shutdown.
//!
//! Each test serves its app with a `Runtime` of its own and short limits,
//! and each would fail without the fix it names.

use std::time::Duration;

use axum::routing::get;
use axum::{Extension, Router};
use axum_channels::testing::{Received, TestServer};
use axum_channels::{
    ConnectionSettings, Consumer, Frame, JsonConsumer, NoEvents, Result, Runtime, Scope, Settings,
    Socket, TooFast, route, route_with,
};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

/// How long a test waits for something that should be prompt.
const GUARD: Duration = Duration::from_secs(5);

/// Where consumers report the code their `disconnect` got.
#[derive(Clone)]
struct Departures(mpsc::UnboundedSender<u16>);

/// Echoes text; `bye` closes with 4001.
struct Talker {
    departures: Option<Departures>,
}

impl Consumer for Talker {
    type Event = NoEvents;

    fn new(scope: &Scope) -> Self {
        Talker {
            departures: scope.extension::<Departures>().cloned(),
        }
    }

    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        socket.accept().await
    }

    async fn receive(&mut self, socket: &mut Socket, frame: Frame) -> Result<()> {
        match frame {
            Frame::Text(text) if text == "bye" => socket.close(4001, "bye").await,
            Frame::Text(text) => socket.send_text(text).await,
            Frame::Binary(_) => Ok(()),
        }
    }

    async fn disconnect(&mut self, _socket: &mut Socket, code: u16) {
        if let Some(departures) = &self.departures {
            let _ = departures.0.send(code);
        }
    }
}

/// Like `Talker`, but a client over its budget is warned and paused rather
/// than closed.
struct Patient;

impl Consumer for Patient {
    type Event = NoEvents;

    fn new(_scope: &Scope) -> Self {
        Patient
    }

    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        socket.accept().await
    }

    async fn receive(&mut self, socket: &mut Socket, frame: Frame) -> Result<()> {
        match frame {
            Frame::Text(text) => socket.send_text(text).await,
            Frame::Binary(_) => Ok(()),
        }
    }

    async fn too_fast(&mut self, socket: &mut Socket, too_fast: TooFast) -> Result<()> {
        socket.send_text(format!("error: {too_fast}")).await
    }
}

/// `Patient` as a [`JsonConsumer`]: its `too_fast` reaches the runner
/// through the blanket `Consumer` implementation.
struct PatientJson;

impl JsonConsumer for PatientJson {
    type Message = serde_json::Value;
    type Event = NoEvents;

    fn new(_scope: &Scope) -> Self {
        PatientJson
    }

    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        socket.accept().await
    }

    async fn receive(&mut self, socket: &mut Socket, message: serde_json::Value) -> Result<()> {
        socket.send_json(&message).await
    }

    async fn too_fast(&mut self, socket: &mut Socket, too_fast: TooFast) -> Result<()> {
        socket.send_text(format!("error: {too_fast}")).await
    }
}

/// Serves `/talk` (a `Talker`), `/patient` and `/patient-json`, and `GET /` for plain HTTP,
/// with `settings`.
async fn serve(settings: Settings) -> (TestServer, mpsc::UnboundedReceiver<u16>) {
    let (tx, departures) = mpsc::unbounded_channel();
    let app = Router::new()
        .route("/", get(|| async { "hello" }))
        .route("/talk", route::<Talker>())
        .route("/patient", route::<Patient>())
        .route("/patient-json", route::<PatientJson>())
        .layer(Extension(Departures(tx)));
    let runtime = Runtime::new(settings).expect("valid settings");
    (TestServer::start_with(runtime, app).await, departures)
}

/// The default settings, changed by `change`.
fn settings(change: impl FnOnce(&mut Settings)) -> Settings {
    let mut settings = Settings::default();
    change(&mut settings);
    settings
}

/// A client that keeps sending after our close frame, and never reads it
/// (so never answers), is dropped at the close deadline: before, the
/// deadline started again with every frame it sent, and it held the
/// connection for as long as it talked.
#[tokio::test]
async fn a_client_that_keeps_talking_after_our_close_is_dropped_at_the_deadline() {
    let (server, mut departures) = serve(settings(|settings| {
        settings.connection.close_timeout = Duration::from_millis(300);
    }))
    .await;
    let (ws, _) = tokio_tungstenite::connect_async(server.ws_url("/talk"))
        .await
        .unwrap();
    // Only the sending half: nothing reads our close frame, so nothing
    // answers it.
    let (mut sink, _unread) = ws.split();
    sink.send(Message::text("bye")).await.unwrap();
    let chatter = tokio::spawn(async move {
        let started = Instant::now();
        while started.elapsed() < GUARD {
            if sink.send(Message::text("still here")).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let sent_close = Instant::now();
    let code = timeout(Duration::from_secs(2), departures.recv())
        .await
        .expect("the client was still connected 2 s after a 300 ms close deadline");
    assert_eq!(code, Some(4001), "disconnect hears why we closed");
    assert!(sent_close.elapsed() >= Duration::from_millis(250));
    chatter.abort();
}

/// A route with connection settings of its own still belongs to the
/// process: its clients get 1001 when the runtime shuts down, and the
/// shutdown waits for them. (Before, `route_with` made a connection count
/// and a shutdown of its own, which no signal ever reached.)
#[tokio::test]
async fn a_route_with_its_own_settings_follows_the_process_shutdown() {
    let mut own = ConnectionSettings::default();
    own.write_timeout = Duration::from_secs(30);
    let app = Router::new().route("/own", route_with::<Talker>(own));
    let runtime = Runtime::default();
    let server = TestServer::start_with(runtime.clone(), app).await;
    let mut client = server.connect("/own").await;
    client.send_text("hi").await;
    assert_eq!(client.recv_text().await, "hi");
    assert_eq!(runtime.open_connections(), 1);

    let shutdown = tokio::spawn(async move { runtime.shut_down().await });
    assert_eq!(
        client.recv().await,
        Received::Close {
            code: 1001,
            reason: "server shutting down".into()
        }
    );
    drop(client);
    assert_eq!(timeout(GUARD, shutdown).await.unwrap().unwrap(), 0);
}

/// A client over its inbound budget is closed with 1008 and a reason that
/// says the limit; another client on the same server is not affected.
#[tokio::test]
async fn a_client_that_floods_is_closed_with_1008() {
    let (server, mut departures) = serve(settings(|settings| {
        settings.connection.inbound.frames_per_second = std::num::NonZeroU32::new(50);
    }))
    .await;
    let mut calm = server.connect("/talk").await;
    let mut flood = server.connect("/talk").await;
    for n in 0..300 {
        flood.send_text(&format!("{n}")).await;
    }
    let mut echoed = 0;
    let close = loop {
        match flood.recv().await {
            Received::Text(_) => echoed += 1,
            other => break other,
        }
    };
    assert_eq!(
        close,
        Received::Close {
            code: 1008,
            reason: "sending too fast: the limit is 50 frames per second".into()
        }
    );
    // The burst is two seconds' worth; a few more trickle in while it is
    // sent.
    assert!((100..150).contains(&echoed), "{echoed} frames were echoed");
    drop(flood);
    assert_eq!(timeout(GUARD, departures.recv()).await.unwrap(), Some(1008));

    calm.send_text("fine here").await;
    assert_eq!(calm.recv_text().await, "fine here");
}

/// A consumer that chooses to warn rather than close: the client gets an
/// error frame, is not read from until its budget refills, and then is
/// served again, on the same connection.
#[tokio::test]
async fn a_consumer_may_warn_and_pause_a_client_that_floods() {
    warns_and_pauses("/patient").await;
}

/// The same for a `JsonConsumer`, which could not override `too_fast`
/// before.
#[tokio::test]
async fn a_json_consumer_may_warn_and_pause_a_client_that_floods() {
    warns_and_pauses("/patient-json").await;
}

async fn warns_and_pauses(path: &str) {
    let (server, _departures) = serve(settings(|settings| {
        settings.connection.inbound.frames_per_second = std::num::NonZeroU32::new(20);
    }))
    .await;
    let mut client = server.connect(path).await;
    for n in 0..60 {
        client.send_text(&format!("{n}")).await;
    }
    // Every frame gets one answer: its echo, or, past the budget, a warning
    // (and the frame is dropped). Never a close.
    let mut warnings = 0;
    for _ in 0..60 {
        match client.recv().await {
            Received::Text(text) if text.starts_with("error: sending too fast") => warnings += 1,
            Received::Text(_) => {}
            other => panic!("the patient consumer closed: {other}"),
        }
    }
    assert!(
        warnings >= 10,
        "only {warnings} warnings for 60 frames at once"
    );
    // Once the budget has refilled, the same connection is served again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // (A number: the same text whether echoed as text or as JSON.)
    client.send_text("61").await;
    assert_eq!(client.recv_text().await, "61");
}

/// Connects and sends `bytes`.
async fn connect_and_send(server: &TestServer, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr()).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream
}

/// Whether the server closes `stream` before `deadline`.
async fn closed_before(stream: &mut TcpStream, deadline: Duration) -> bool {
    let mut buffer = [0; 1024];
    match timeout(deadline, stream.read(&mut buffer)).await {
        Ok(Ok(0) | Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => false,
    }
}

/// `GET /` over a fresh connection; the status line.
async fn status_of_get(server: &TestServer) -> String {
    let mut stream = connect_and_send(server, b"GET / HTTP/1.1\r\nHost: test\r\n\r\n").await;
    let mut response = vec![0; 1024];
    let n = timeout(GUARD, stream.read(&mut response))
        .await
        .expect("GET / was answered in time")
        .unwrap();
    let response = String::from_utf8_lossy(&response[..n]);
    response.lines().next().unwrap_or_default().to_owned()
}

/// Requests that never finish arriving are closed at the header timeout,
/// while others are answered.
#[tokio::test]
async fn half_sent_requests_are_closed_at_the_header_timeout() {
    let (server, _departures) = serve(settings(|settings| {
        settings.header_read_timeout = Duration::from_millis(200);
    }))
    .await;
    let mut half = connect_and_send(&server, b"GET / HTTP/1.1\r\nHost: te").await;
    assert_eq!(status_of_get(&server).await, "HTTP/1.1 200 OK");
    assert!(
        closed_before(&mut half, Duration::from_secs(2)).await,
        "a half-sent request was still open 2 s after a 200 ms header timeout"
    );
}

/// One client holding more sockets than the server may open does not stop
/// it answering someone else: the oldest connections with no request in
/// progress make room.
#[tokio::test]
async fn a_client_holding_more_sockets_than_the_cap_does_not_lock_others_out() {
    let (server, _departures) = serve(settings(|settings| {
        settings.max_sockets = Some(20);
    }))
    .await;
    let mut held = Vec::new();
    for _ in 0..60 {
        held.push(connect_and_send(&server, b"GET / HTTP/1.1\r\n").await);
    }
    assert_eq!(status_of_get(&server).await, "HTTP/1.1 200 OK");
    let mut closed = 0;
    for stream in &mut held {
        if closed_before(stream, Duration::from_millis(20)).await {
            closed += 1;
        }
    }
    assert!(
        closed >= 40,
        "only {closed} of 60 sockets were closed under a cap of 20"
    );
}
