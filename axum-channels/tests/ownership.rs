//! What a connection owns is given back, however its handshake ends.
//!
//! Before `connect` runs, the runner gives the connection a channel on its
//! layer and joins the consumer's groups. Those belong to the connection
//! from then on, and must be given back when it ends, also when it ends
//! abnormally: the client resets the TCP connection while `connect` is still
//! running (hyper then drops the handler's future), or right after reading
//! the 101. A leak here is invisible to the client and costly to the server:
//! every later message to the group is copied into a channel nobody reads,
//! and the room's other members saw a "joined" that no "left" ever follows.
//!
//! Each test connects a watcher to the room first, then has
//! [`HANDSHAKES`] raw TCP clients send a valid upgrade request to a `Member`
//! whose `connect` is slowed down, and reset their connections at one of
//! three moments (see [`Reset`]): while `connect` sleeps before accepting;
//! while it sleeps after accepting and announcing "joined"; or as soon as
//! they have read the 101. Once the server is quiet it checks that:
//!
//! - the layer holds no channel, no membership and no buffer beyond the
//!   watcher's own: on the in-memory layer by its `size()`, on the Redis
//!   layers by their local buffers and by asking Redis (`ZCARD` of the
//!   group's sorted set for the queue layer, the subscribed channels for the
//!   pub/sub layer);
//! - the watcher heard one "left" for every "joined": a connection whose
//!   `connect` accepted and announced itself gets `disconnect`, and one that
//!   never got that far announces nothing.
//!
//! The same three scenarios run on the in-memory layer and on both Redis
//! layers. Without `redis-server` the Redis tests say so on stderr and pass;
//! with `CI=true` they fail instead (see `channels_testkit::RedisServer::start`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::{Extension, Router};
use axum_channels::layer::{ChannelLayer, InMemoryLayer, LayerEvent, Layers, MemoryConfig};
use axum_channels::testing::{Received, TestClient, TestServer};
use axum_channels::{Consumer, Frame, Result, Runtime, Scope, Socket};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};

/// How many handshakes each test resets: enough that a leak of a few
/// percent shows, few enough to stay well under a second.
const HANDSHAKES: usize = 100;

/// How long a reset client's `connect` sleeps (before or after it accepts):
/// long enough that every client has sent its request and reset its
/// connection while the first `connect` is still asleep.
const SLOW_CONNECT: Duration = Duration::from_millis(200);

/// How long the server may take to give everything back once the clients
/// are gone. A passing test takes a fraction of it; a leak waits it out.
const SETTLE: Duration = Duration::from_secs(5);

/// Messages a channel may hold. The room's announcements come in bursts of
/// [`HANDSHAKES`], and a channel that overflows drops messages by design
/// (tested elsewhere), which would make the watcher's count say nothing
/// about ownership.
const CAPACITY: usize = 4 * HANDSHAKES;

/// How long any single step that should succeed may take.
const GUARD: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum RoomEvent {
    /// A member's `connect` accepted.
    Joined,
    /// A member's `disconnect` ran.
    Left,
    /// Sent by the test itself, to look into the in-memory layer.
    Probe,
}

impl LayerEvent for RoomEvent {}

/// How far the `connect`s of one server have got: the test resets its
/// clients only once every one of them is where it wants them.
#[derive(Clone, Default)]
struct Connects {
    begun: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
}

/// Joins `room` (through `groups()`, so before `connect`); in `connect`,
/// sleeps for the first number of milliseconds in its path, accepts,
/// announces "joined" to the room, and sleeps for the second number. Its
/// `disconnect` announces "left". Whatever the room says reaches its client
/// as text, which is how the watcher counts.
struct Member {
    before_accept: Duration,
    after_accept: Duration,
    connects: Connects,
}

impl Consumer for Member {
    type Event = RoomEvent;
    const LAYER: Option<&'static str> = Some("room");

    fn new(scope: &Scope) -> Self {
        let millis = |name| {
            let millis = scope.param(name).and_then(|ms| ms.parse().ok());
            Duration::from_millis(millis.unwrap_or(0))
        };
        Member {
            before_accept: millis("before_ms"),
            after_accept: millis("after_ms"),
            connects: scope.extension::<Connects>().cloned().unwrap_or_default(),
        }
    }

    fn groups(&self) -> Vec<String> {
        vec!["room".to_owned()]
    }

    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        self.connects.begun.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.before_accept).await;
        socket.accept().await?;
        socket.group_send("room", &RoomEvent::Joined).await?;
        self.connects.accepted.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.after_accept).await;
        Ok(())
    }

    async fn receive(&mut self, _socket: &mut Socket, _frame: Frame) -> Result<()> {
        Ok(())
    }

    async fn event(&mut self, socket: &mut Socket, event: RoomEvent) -> Result<()> {
        let text = match event {
            RoomEvent::Joined => "joined",
            RoomEvent::Left => "left",
            RoomEvent::Probe => "probe",
        };
        socket.send_text(text).await
    }

    async fn disconnect(&mut self, socket: &mut Socket, _code: u16) {
        // The connection is over either way; a failed announcement is what
        // the watcher's count reports.
        let _ = socket.group_send("room", &RoomEvent::Left).await;
    }
}

/// Serves `Member` at `/member/{before_ms}/{after_ms}` on `layer`. The
/// only place that knows how a server is started.
async fn serve(layer: Arc<dyn ChannelLayer>, connects: Connects) -> TestServer {
    let layers = Layers::new().with_shared("room", layer);
    let route = layers.route::<Member>();
    let app = Router::new()
        .route("/member/{before_ms}/{after_ms}", route)
        .layer(Extension(connects));
    // A runtime of its own, with the default settings: nothing in the
    // environment changes the test.
    TestServer::start_with(Runtime::default(), app).await
}

/// A layer under test, and what it holds beyond the watcher's own channel
/// and membership.
trait Backend {
    fn layer(&self) -> Arc<dyn ChannelLayer>;

    /// What the layer still holds for connections other than the watcher,
    /// one line per kind of thing; empty when it holds nothing more.
    async fn leftovers(&self) -> Vec<String>;
}

/// When the clients reset their connections.
#[derive(Debug, Clone, Copy)]
enum Reset {
    /// While `connect` sleeps before accepting: nothing was announced, and
    /// the 101 has not been sent.
    BeforeAccept,
    /// While `connect` sleeps after accepting and announcing "joined": the
    /// consumer is connected as far as the room knows, so its `disconnect`
    /// must run and say "left", though no 101 was sent.
    AfterAccept,
    /// As soon as the client has read the 101.
    After101,
}

/// The watcher's count of the room's announcements, its own "joined" aside.
#[derive(Debug, Default)]
struct Tally {
    joined: usize,
    left: usize,
}

impl Tally {
    /// Counts whatever the watcher has received, waiting up to `window` for
    /// the first frame (which is also what paces the caller's polling).
    async fn drain(&mut self, watcher: &mut TestClient, window: Duration) {
        let mut window = window;
        while let Some(received) = watcher.try_recv(window).await {
            match received {
                Received::Text(text) if text == "joined" => self.joined += 1,
                Received::Text(text) if text == "left" => self.left += 1,
                Received::Text(text) if text == "probe" => {}
                other => panic!(
                    "the watcher got {other}\ntranscript:\n{}",
                    watcher.transcript()
                ),
            }
            window = Duration::ZERO;
        }
    }
}

/// The scenario every test runs: a watcher in the room, [`HANDSHAKES`]
/// handshakes reset as `reset` says, and then nothing left behind.
async fn handshakes_reset_leave_nothing(backend: impl Backend, reset: Reset) {
    let connects = Connects::default();
    let server = serve(backend.layer(), connects.clone()).await;
    let mut watcher = server.connect("/member/0/0").await;
    assert_eq!(watcher.recv_text().await, "joined", "the watcher's own");
    let before = backend.leftovers().await;
    assert!(before.is_empty(), "before any reset: {before:?}");

    let slow = SLOW_CONNECT.as_millis();
    let (path, reached) = match reset {
        Reset::BeforeAccept | Reset::After101 => (format!("/member/{slow}/0"), &connects.begun),
        Reset::AfterAccept => (format!("/member/0/{slow}"), &connects.accepted),
    };
    match reset {
        Reset::BeforeAccept | Reset::AfterAccept => {
            let mut clients = Vec::with_capacity(HANDSHAKES);
            for _ in 0..HANDSHAKES {
                clients.push(send_handshake(server.addr(), &path).await);
            }
            // Reset only once every handshake is asleep where the scenario
            // wants it (the watcher counts as one), so each one has its
            // channel and its membership by then.
            let deadline = Instant::now() + GUARD;
            while reached.load(Ordering::SeqCst) < 1 + HANDSHAKES {
                assert!(
                    Instant::now() < deadline,
                    "only {} of {HANDSHAKES} handshakes got that far in connect",
                    reached.load(Ordering::SeqCst).saturating_sub(1)
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            clients.into_iter().for_each(reset_connection);
        }
        Reset::After101 => {
            let mut clients = JoinSet::new();
            for _ in 0..HANDSHAKES {
                let (addr, path) = (server.addr(), path.clone());
                clients.spawn(async move {
                    let mut client = send_handshake(addr, &path).await;
                    let status = read_response_head(&mut client).await;
                    assert!(status.starts_with("HTTP/1.1 101"), "got {status:?}");
                    reset_connection(client);
                });
            }
            while let Some(done) = clients.join_next().await {
                done.expect("a client task");
            }
        }
    }

    // Quiet means: the layer is back to the watcher alone, and every
    // "joined" has had its "left". Until then, keep counting.
    let mut tally = Tally::default();
    let deadline = Instant::now() + SETTLE;
    loop {
        tally.drain(&mut watcher, Duration::from_millis(20)).await;
        let leftovers = backend.leftovers().await;
        if leftovers.is_empty() && tally.joined == tally.left {
            break;
        }
        if Instant::now() >= deadline {
            panic!(
                "{HANDSHAKES} handshakes reset {reset:?}: after {SETTLE:?} the layer still \
                 holds {leftovers:?}, and the watcher heard {} joined and {} left",
                tally.joined, tally.left
            );
        }
    }
}

/// Opens a TCP connection and sends a valid WebSocket upgrade request.
async fn send_handshake(addr: SocketAddr, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the server");
    let request = format!(
        "GET {path} HTTP/1.1\r\n\
         Host: {addr}\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\
         \r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the upgrade request");
    stream
}

/// Reads the response's status line and headers, up to the blank line.
async fn read_response_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        // One byte at a time, so nothing after the head is consumed.
        match timeout(GUARD, stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            other => panic!(
                "no complete response head within {GUARD:?} ({other:?}): {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Closes with a TCP reset rather than a FIN, as a client whose network
/// vanished or that was killed: `SO_LINGER` 0, then close.
fn reset_connection(stream: TcpStream) {
    stream.set_zero_linger().expect("set SO_LINGER to 0");
    drop(stream);
}

/// The in-memory layer.
struct Memory(Arc<InMemoryLayer>);

impl Memory {
    /// Always there (an `Option` like the Redis backends, which may not be).
    fn start() -> Option<Memory> {
        let config = MemoryConfig::default().with_capacity(CAPACITY);
        Some(Memory(Arc::new(InMemoryLayer::new(config))))
    }
}

impl Backend for Memory {
    fn layer(&self) -> Arc<dyn ChannelLayer> {
        self.0.clone()
    }

    /// `size()` counts groups, not members, and a channel only while it is
    /// waited on or holds messages. So the test sends the room a probe: every
    /// member's channel then holds it, and the watcher's, the one that is
    /// read, is the one channel allowed. (A channel in no group that holds
    /// nothing cannot be seen from outside; every channel here joins the
    /// room before `connect`.)
    async fn leftovers(&self) -> Vec<String> {
        let probe = json!({"type": "probe"}).as_object().cloned().unwrap();
        self.0
            .group_send("room", probe)
            .await
            .expect("probe the room");
        let (channels, groups) = self.0.size();
        let mut leftovers = Vec::new();
        if channels > 1 {
            leftovers.push(format!(
                "{} member channels besides the watcher's, nobody reading them",
                channels - 1
            ));
        }
        if groups != 1 {
            leftovers.push(format!("{groups} groups instead of the room alone"));
        }
        leftovers
    }
}

/// The three scenarios, as tests in a module named after the backend that
/// `$start` makes (`None` when the machine lacks it: the test is skipped).
macro_rules! scenarios {
    ($backend:ident, $start:expr) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn handshakes_reset_before_accept_leave_nothing() {
                let Some(backend) = $start else { return };
                handshakes_reset_leave_nothing(backend, Reset::BeforeAccept).await;
            }

            #[tokio::test]
            async fn handshakes_reset_after_accept_leave_nothing() {
                let Some(backend) = $start else { return };
                handshakes_reset_leave_nothing(backend, Reset::AfterAccept).await;
            }

            #[tokio::test]
            async fn handshakes_reset_after_the_101_leave_nothing() {
                let Some(backend) = $start else { return };
                handshakes_reset_leave_nothing(backend, Reset::After101).await;
            }
        }
    };
}

scenarios!(memory, Memory::start());

#[cfg(feature = "redis")]
scenarios!(redis_queue, on_redis::Queue::start().await);

#[cfg(feature = "redis")]
scenarios!(redis_pubsub, on_redis::PubSub::start().await);

/// The same scenarios on the Redis layers, each on a redis-server of its
/// own, asking Redis itself what is left.
#[cfg(feature = "redis")]
mod on_redis {
    use axum_channels::layer::redis::{RedisConfig, RedisLayer, RedisPubSubLayer};
    use channels_testkit::RedisServer;
    use redis::aio::MultiplexedConnection;

    use super::*;

    /// The layers' default prefix, which the keys below are named after.
    const PREFIX: &str = "asgi";

    fn config(server: &RedisServer) -> RedisConfig {
        let config = RedisConfig::new(server.url())
            // A closed channel's popper stops within a second.
            .with_block_timeout(Duration::from_secs(1))
            // The queue layer's channels made in one process share one
            // Redis key, and the capacity is that key's: with the default
            // of 100, the room's bursts overflow it.
            .with_capacity(CAPACITY);
        assert_eq!(config.prefix, PREFIX);
        config
    }

    /// A plain connection, to look at what the layers left in Redis.
    async fn raw(server: &RedisServer) -> MultiplexedConnection {
        redis::Client::open(server.url())
            .expect("a valid URL")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis-server")
    }

    /// The queue layer: members are a sorted set in Redis, and each
    /// channel made here has a local buffer.
    pub(crate) struct Queue {
        layer: Arc<RedisLayer>,
        conn: MultiplexedConnection,
        _server: RedisServer,
    }

    impl Queue {
        pub(crate) async fn start() -> Option<Queue> {
            let server = RedisServer::start().await?;
            let layer = RedisLayer::connect(config(&server))
                .await
                .expect("connect the queue layer");
            Some(Queue {
                layer: Arc::new(layer),
                conn: raw(&server).await,
                _server: server,
            })
        }
    }

    impl Backend for Queue {
        fn layer(&self) -> Arc<dyn ChannelLayer> {
            self.layer.clone()
        }

        async fn leftovers(&self) -> Vec<String> {
            let key = format!("{PREFIX}:group:room");
            let members: usize = redis::cmd("ZCARD")
                .arg(&key)
                .query_async(&mut self.conn.clone())
                .await
                .expect("ZCARD");
            let mut leftovers = Vec::new();
            if members != 1 {
                leftovers.push(format!("ZCARD {key} is {members}, not the watcher's 1"));
            }
            let buffers = self.layer.local_channels();
            if buffers != 1 {
                leftovers.push(format!(
                    "{buffers} local channel buffers, not the watcher's 1"
                ));
            }
            leftovers
        }
    }

    /// The pub/sub layer: members are local, and each channel (and each
    /// group with a member here) is a subscription in Redis.
    pub(crate) struct PubSub {
        layer: Arc<RedisPubSubLayer>,
        conn: MultiplexedConnection,
        _server: RedisServer,
    }

    impl PubSub {
        pub(crate) async fn start() -> Option<PubSub> {
            let server = RedisServer::start().await?;
            let layer = RedisPubSubLayer::connect(config(&server))
                .await
                .expect("connect the pub/sub layer");
            Some(PubSub {
                layer: Arc::new(layer),
                conn: raw(&server).await,
                _server: server,
            })
        }
    }

    impl Backend for PubSub {
        fn layer(&self) -> Arc<dyn ChannelLayer> {
            self.layer.clone()
        }

        async fn leftovers(&self) -> Vec<String> {
            let mut conn = self.conn.clone();
            let group = format!("{PREFIX}__group__room");
            let (_, subscribers): (String, usize) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&group)
                .query_async(&mut conn)
                .await
                .expect("PUBSUB NUMSUB");
            // Members are local, so Redis sees the room as one subscription
            // however many there are here: the leaked ones show as their
            // channels, still subscribed. Only the watcher's channel and
            // the room should be.
            let subscribed: Vec<String> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .arg(format!("{PREFIX}*"))
                .query_async(&mut conn)
                .await
                .expect("PUBSUB CHANNELS");
            let mut leftovers = Vec::new();
            if subscribers != 1 {
                leftovers.push(format!("PUBSUB NUMSUB {group} is {subscribers}, not 1"));
            }
            if subscribed.len() != 2 {
                leftovers.push(format!(
                    "{} Redis channels subscribed, not the watcher's and the room's",
                    subscribed.len()
                ));
            }
            let buffers = self.layer.local_channels();
            if buffers != 1 {
                leftovers.push(format!(
                    "{buffers} local channel buffers, not the watcher's 1"
                ));
            }
            leftovers
        }
    }
}
