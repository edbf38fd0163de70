//! The production settings, each tried with real clients: dead peers, slow
//! readers, the origin check, the connection limit and graceful shutdown.
//!
//! Every test serves its app with a [`Runtime`] of its own (short
//! intervals, small limits), so the tests run in parallel without sharing
//! a connection limit or a shutdown, and no test waits for a default.
//!
//! A `Member` joins the group `room` and reports its `disconnect` to the
//! group; the test watches the group through a channel of its own on the
//! same in-memory layer, which shows both that `disconnect` ran (and with
//! which code) and what the others in the room went through.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::HeaderValue;
use axum_channels::layer::{ChannelLayer, InMemoryLayer, LayerMessage, Layers};
use axum_channels::settings::AllowedOrigins;
use axum_channels::testing::TestServer;
use axum_channels::{
    Consumer, Frame, InboundBudget, LayerEvent, Result, Runtime, Scope, Settings, Socket,
};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expectation may take before the test fails.
const GUARD: Duration = Duration::from_secs(5);

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum RoomEvent {
    Said { text: String },
    Left { code: u16 },
}

impl LayerEvent for RoomEvent {}

struct Member;

impl Consumer for Member {
    type Event = RoomEvent;
    const LAYER: Option<&'static str> = Some("room");

    fn new(_scope: &Scope) -> Self {
        Member
    }

    fn groups(&self) -> Vec<String> {
        vec!["room".to_owned()]
    }

    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        socket.accept().await?;
        socket.send_text("welcome").await
    }

    async fn receive(&mut self, socket: &mut Socket, frame: Frame) -> Result<()> {
        if let Frame::Text(text) = frame {
            socket.group_send("room", &RoomEvent::Said { text }).await?;
        }
        Ok(())
    }

    async fn event(&mut self, socket: &mut Socket, event: RoomEvent) -> Result<()> {
        match event {
            RoomEvent::Said { text } => socket.send_text(text).await,
            RoomEvent::Left { code } => socket.send_text(format!("left {code}")).await,
        }
    }

    async fn disconnect(&mut self, socket: &mut Socket, code: u16) {
        let _ = socket.group_send("room", &RoomEvent::Left { code }).await;
    }
}

/// A server with one route, `/room`, under `settings`, and a watcher on its
/// layer.
struct Room {
    server: TestServer,
    layer: Arc<InMemoryLayer>,
    watcher: String,
}

impl Room {
    async fn start(settings: Settings) -> Room {
        let layer = Arc::new(InMemoryLayer::default());
        let layers = Layers::new().with_shared("room", layer.clone());
        // ANCHOR: route_with
        let app = Router::new().route(
            "/room",
            layers.route_with::<Member>(settings.connection.clone()),
        );
        // ANCHOR_END: route_with
        let watcher = layer.new_channel("watcher").await.unwrap();
        layer.group_add("room", &watcher).await.unwrap();
        let runtime = Runtime::new(settings).expect("valid settings");
        Room {
            server: TestServer::start_with(runtime, app).await,
            layer,
            watcher,
        }
    }

    /// Connects and reads the welcome.
    async fn join(&self) -> Client {
        let mut client = self.connect(None).await.expect("handshake refused");
        assert_eq!(next_text(&mut client).await, "welcome");
        client
    }

    /// Connects with an optional `Origin`; the HTTP status if refused.
    async fn connect(&self, origin: Option<&str>) -> std::result::Result<Client, u16> {
        let mut request = self.server.ws_url("/room").into_client_request().unwrap();
        if let Some(origin) = origin {
            let value = HeaderValue::from_str(origin).unwrap();
            request.headers_mut().insert("origin", value);
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((client, _)) => Ok(client),
            Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
            Err(err) => panic!("connect failed: {err}"),
        }
    }

    /// The next message the room's group carried.
    async fn watch(&self) -> LayerMessage {
        timeout(GUARD, self.layer.receive(&self.watcher))
            .await
            .expect("nothing reached the room in time")
            .unwrap()
    }

    /// Waits for a departure, skipping what was said.
    async fn departure(&self) -> u64 {
        loop {
            let message = self.watch().await;
            if message["type"] == "left" {
                return message["code"].as_u64().unwrap();
            }
        }
    }
}

async fn next_text(client: &mut Client) -> String {
    loop {
        match timeout(GUARD, client.next())
            .await
            .expect("no frame in time")
        {
            Some(Ok(Message::Text(text))) => return text.as_str().to_owned(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// The default settings, changed by `change`, with a short close timeout.
fn quick(change: impl FnOnce(&mut Settings)) -> Settings {
    let mut settings = Settings::default();
    settings.connection.close_timeout = Duration::from_millis(200);
    change(&mut settings);
    settings
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_dropped_and_leaves_its_groups() {
    let room = Room::start(quick(|settings| {
        settings.connection.ping_interval = Some(Duration::from_millis(100));
        settings.connection.pong_timeout = Duration::from_millis(100);
    }))
    .await;

    // A client that keeps reading answers the pings (tungstenite sends the
    // pongs while it reads) and stays.
    let mut lively = room.join().await;
    let reader = tokio::spawn(async move {
        while let Some(Ok(message)) = lively.next().await {
            if matches!(&message, Message::Text(text) if text.as_str() == "still here") {
                return lively;
            }
        }
        panic!("the lively client was disconnected");
    });

    // A client that completes the handshake and then never reads again:
    // its pings go unanswered.
    let silent = room.join().await;
    assert_eq!(room.departure().await, 1006, "disconnect runs with 1006");

    // Well past several ping intervals, the lively one is still there.
    room.layer
        .group_send(
            "room",
            serde_json::json!({"type": "said", "text": "still here"})
                .as_object()
                .unwrap()
                .clone(),
        )
        .await
        .unwrap();
    let lively = timeout(GUARD, reader).await.unwrap().unwrap();
    assert_eq!(
        room.server.runtime().open_connections(),
        1,
        "only the lively one"
    );
    drop((silent, lively));
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_and_slows_nobody_down() {
    let room = Room::start(quick(|settings| {
        settings.connection.write_timeout = Duration::from_millis(300);
        settings.connection.ping_interval = None;
        // The talker floods on purpose.
        settings.connection.inbound = InboundBudget::UNLIMITED;
    }))
    .await;
    let _sleeper = room.join().await; // never reads again
    let mut talker = room.join().await;

    // Say enough that the sleeper's socket buffers fill up: its consumer's
    // sends then wait, and time out.
    let line = "x".repeat(60 * 1024);
    let mut lines = 0;
    let mut heard_departure = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while heard_departure.is_none() {
        // A missing write timeout fails here, rather than hangs.
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sleeper was never closed ({lines} lines sent)"
        );
        lines += 1;
        if lines > 1_000 {
            // 60 MB: more than loopback's socket buffers hold (32 MB to
            // receive, 4 MB to send, here), so the sleeper's sends are
            // stuck by now. Slow down and let its write timeout come.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        talker.send(Message::text(line.clone())).await.unwrap();
        // The talker hears every line of its own promptly, sleeper or not;
        // the sleeper's departure may come before or after it.
        loop {
            let text = next_text(&mut talker).await;
            if text.len() == line.len() {
                break;
            }
            heard_departure = Some(text);
        }
    }
    // The room hears the code `disconnect` got: 1008, policy violation.
    assert_eq!(heard_departure.as_deref(), Some("left 1008"));

    // The talker carries on.
    talker.send(Message::text("after")).await.unwrap();
    assert_eq!(next_text(&mut talker).await, "after");
}

#[tokio::test]
async fn only_the_pages_own_origin_may_connect_unless_allowed() {
    let room = Room::start(Settings::default()).await;
    let own = format!("http://{}", room.server.addr());

    assert!(room.connect(None).await.is_ok(), "no Origin: not a browser");
    assert!(room.connect(Some(&own)).await.is_ok(), "the page's own");
    assert_eq!(
        room.connect(Some("http://evil.example")).await.err(),
        Some(403)
    );

    let open = Room::start(quick(|settings| {
        settings.connection.allowed_origins = AllowedOrigins::parse("http://evil.example").unwrap();
    }))
    .await;
    assert!(open.connect(Some("http://evil.example")).await.is_ok());
    assert_eq!(
        open.connect(Some("http://other.example")).await.err(),
        Some(403)
    );
}

#[tokio::test]
async fn past_the_connection_limit_a_handshake_gets_503_and_the_others_carry_on() {
    let room = Room::start(quick(|settings| settings.max_connections = Some(2))).await;
    let plain = raw_get(&room, "").await;
    assert!(plain.starts_with("HTTP/1.1 400"), "not full yet: {plain}");
    let mut first = room.join().await;
    let _second = room.join().await;

    let response = reqwest_like_get(&room).await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("retry-after: 5"),
        "{response}"
    );
    // A plain GET, as a page asks after its handshake failed (browsers
    // hide the handshake's status), hears the same 503 and Retry-After.
    let plain = raw_get(&room, "").await;
    assert!(plain.starts_with("HTTP/1.1 503"), "{plain}");
    assert!(
        plain.to_ascii_lowercase().contains("retry-after: 5"),
        "{plain}"
    );

    first.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_text(&mut first).await, "hello");
    first.close(None).await.unwrap();
    assert_eq!(room.departure().await, 1005);

    // A place came free.
    timeout(GUARD, async {
        while room.server.runtime().open_connections() > 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    room.join().await;
}

/// A raw WebSocket handshake, to read the refusal's headers.
async fn reqwest_like_get(room: &Room) -> String {
    raw_get(
        room,
        "Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
    )
    .await
}

/// `GET /room` with `headers` (each line ending in CRLF), the answer's head.
async fn raw_get(room: &Room, headers: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(room.server.addr()).await.unwrap();
    let request = format!(
        "GET /room HTTP/1.1\r\nHost: {}\r\n{headers}\r\n",
        room.server.addr()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = vec![0; 4096];
    let n = timeout(GUARD, stream.read(&mut response))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&response[..n]).into_owned()
}

#[tokio::test]
async fn shutting_down_closes_every_connection_with_1001_and_waits_for_disconnect() {
    let room = Room::start(quick(|settings| {
        settings.shutdown_timeout = Duration::from_secs(3);
    }))
    .await;
    let mut polite = room.join().await;
    let silent = room.join().await; // never answers the close frame

    let shutdown = tokio::spawn({
        let runtime = room.server.runtime().clone();
        async move { runtime.shut_down().await }
    });

    match timeout(GUARD, polite.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1001);
            assert_eq!(frame.reason.as_str(), "server shutting down");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    // The polite client answers (tungstenite does, as it reads on).
    assert!(timeout(GUARD, polite.next()).await.unwrap().is_none());

    let left = timeout(GUARD, shutdown).await.unwrap().unwrap();
    assert_eq!(
        left, 0,
        "every connection ended within the shutdown timeout"
    );
    assert_eq!(room.departure().await, 1001);
    assert_eq!(room.departure().await, 1001);
    assert_eq!(room.server.runtime().open_connections(), 0);

    // Nothing new gets in: the server has stopped listening (a handshake
    // that came in between the signal and that would have had a 503).
    assert!(TcpStream::connect(room.server.addr()).await.is_err());
    drop(silent);
}
