//! Wire compatibility with the real Python channel layers (issue 7).
//!
//! Every test runs genuine Python peers — `fast-channels` and Django
//! Channels' `channels_redis`, pinned in `tests/interop/requirements.txt` and
//! driven by `tests/interop/peer.py` — against the Rust layers, through a
//! redis-server of the test's own. Nothing on either side is mocked, so a
//! test passes only if both speak exactly the same keys, payload bytes,
//! routing fields and shard choice (`shared/reference/redis-wire-spec.md`).
//!
//! - [`matrix!`] runs the same checks for each Python package and each layer
//!   kind: a `group_send` reaches the other language's channels, both ways;
//!   a `send` to one specific channel reaches it and no other, both ways, and
//!   so does a `send` to a plain channel such as `worker.jobs`; a
//!   WebSocket client of a Rust consumer hears a Python `group_send`, and
//!   what it says reaches a Python listener; and the same sends over two
//!   redis-servers.
//! - [`consistent_hash_agrees_with_python`]: the Rust shard choice is the
//!   Python one, name by name, for 2 to 5 hosts.
//!
//! The messages carry non-ASCII text, nested maps and lists, and numbers at
//! the edges of their types, so every crossing also checks the encoding.
//!
//! Without python3 or redis-server each test says so on stderr and passes;
//! with `CI=true` it fails instead. The virtualenv is built on the first
//! run (see `channels_testkit::python`).

#![cfg(feature = "redis")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum_channels::layer::redis::{RedisConfig, RedisLayer, RedisPubSubLayer, consistent_hash};
use axum_channels::layer::{ChannelLayer, LayerError, LayerEvent, LayerMessage, Layers};
use axum_channels::testing::TestServer;
use axum_channels::{Consumer, Frame, Result, Scope, Socket};
use channels_testkit::RedisServer;
use channels_testkit::python::{Impl, Kind, Peer, PyLayer, Python, python};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// How long a Rust receive may wait for a message from Python. Python peers
/// answer in milliseconds; this only bounds a broken run.
const PATIENCE: Duration = Duration::from_secs(10);

/// A message that exercises the encoding: non-ASCII text (accents, CJK,
/// right-to-left, emoji outside the BMP, combining marks), JSON escapes and
/// a NUL, nested maps and lists, and numbers at the edges of their types.
/// `tag` tells messages of one test apart.
fn rich(tag: &str) -> Value {
    json!({
        "type": "chat.message",
        "message": format!("{tag}: héllo, 世界, שלום, 🌍🚀, e\u{301}, \"quoted\" \\ \n\t \u{0}"),
        "tag": tag,
        "nested": {
            "list": [1, -2, 2.5, null, true, false, "ü", [], {}],
            "map": {"ключ": "значение", "deeper": {"deepest": [{"k": "v"}]}},
            "empty": "",
        },
        "numbers": {
            "u64_max": u64::MAX,
            "i64_min": i64::MIN,
            "pi": std::f64::consts::PI,
            "tiny": 5e-324,
            "zero": 0,
        },
    })
}

fn as_message(value: &Value) -> LayerMessage {
    value.as_object().expect("a JSON object").clone()
}

/// The sandbox's layers (spec section 0) with `hosts`: "queue" is the core
/// layer with prefix `queue`, expiry 900 s and capacity 1000; "chat" is the
/// pub/sub layer with prefix `chat`. The Python side gets the same options.
fn sandbox(implementation: Impl, kind: Kind, hosts: Vec<String>) -> (RedisConfig, PyLayer) {
    let mut py = PyLayer::new(implementation, kind, hosts.clone());
    let mut config = RedisConfig::default().with_hosts(hosts);
    match kind {
        Kind::Queue => {
            py = py.prefix("queue");
            py.expiry = 900;
            py.capacity = 1000;
            config.prefix = "queue".to_owned();
            config.expiry = Duration::from_secs(900);
            config.capacity = 1000;
        }
        Kind::PubSub => {
            py = py.prefix("chat");
            config.prefix = "chat".to_owned();
        }
    }
    (config, py)
}

/// The Rust layer of `kind`, connected.
async fn connect(kind: Kind, config: RedisConfig) -> Arc<dyn ChannelLayer> {
    match kind {
        Kind::Queue => Arc::new(
            RedisLayer::connect(config)
                .await
                .expect("connect the Rust queue layer"),
        ),
        Kind::PubSub => Arc::new(
            RedisPubSubLayer::connect(config)
                .await
                .expect("connect the Rust pub/sub layer"),
        ),
    }
}

/// One test's world: its redis-servers, the Rust layer and the matching
/// Python layer configuration.
struct World {
    python: &'static Python,
    rust: Arc<dyn ChannelLayer>,
    py: PyLayer,
    // Kept to the end of the test: dropping one stops its redis-server.
    _servers: Vec<RedisServer>,
}

/// Starts `hosts` redis-servers and connects the Rust layer; `None` (after
/// a notice on stderr) where python3 or redis-server is missing.
async fn world(test: &str, implementation: Impl, kind: Kind, hosts: usize) -> Option<World> {
    let python = python(test).await?;
    let mut servers = Vec::new();
    for _ in 0..hosts {
        servers.push(RedisServer::start().await?);
    }
    let urls = servers.iter().map(|server| server.url()).collect();
    let (config, py) = sandbox(implementation, kind, urls);
    Some(World {
        python,
        rust: connect(kind, config).await,
        py,
        _servers: servers,
    })
}

impl World {
    /// A new channel of the Rust layer, named as a consumer's is.
    async fn rust_channel(&self) -> String {
        self.rust
            .new_channel("specific")
            .await
            .expect("new_channel of the Rust layer")
    }

    /// The next message on a Rust channel, as JSON; fails the test after
    /// [`PATIENCE`], saying `what` was awaited.
    async fn rust_receive(&self, channel: &str, what: &str) -> Value {
        match tokio::time::timeout(PATIENCE, self.rust.receive(channel)).await {
            Ok(Ok(message)) => Value::Object(message),
            Ok(Err(err)) => panic!("{what}: Rust receive on {channel:?} failed: {err}"),
            Err(_) => panic!(
                "{what}: Rust channel {channel:?} got nothing from {} within {PATIENCE:?}",
                self.py.class()
            ),
        }
    }
}

/// Reads `count` messages from a Python listener, each `message`, and
/// checks that they reached every channel in `channels` once; then waits
/// for the listener to exit.
async fn each_channel_hears_it_once(
    listener: &mut Peer,
    py: &PyLayer,
    message: &Value,
    count: usize,
    mut channels: Vec<String>,
) {
    let mut reached = Vec::new();
    for _ in 0..count {
        let (channel, received) = listener.message().await;
        assert_eq!(
            &received,
            message,
            "as {} received it on {channel}",
            py.class()
        );
        reached.push(channel);
    }
    reached.sort();
    channels.sort();
    assert_eq!(
        reached, channels,
        "each Python channel gets the message once"
    );
    listener.exited().await;
}

/// The checks of the matrix, each for one Python package and one layer kind.
mod checks {
    use super::*;

    /// A Python `group_send` reaches every Rust channel in the group: two
    /// channels of one Rust layer, which the Python queue layer addresses
    /// with one message listing both (`__asgi_channel__`), and the pub/sub
    /// layer with one publish to the group.
    pub async fn python_group_send_reaches_rust_channels(test: &str, imp: Impl, kind: Kind) {
        let Some(world) = world(test, imp, kind, 1).await else {
            return;
        };
        let group = "reliable_chat";
        let channels = [world.rust_channel().await, world.rust_channel().await];
        for channel in &channels {
            world
                .rust
                .group_add(group, channel)
                .await
                .expect("group_add");
        }
        let message = rich("python group_send");
        world.py.group_send(world.python, group, &message).await;
        for channel in &channels {
            assert_eq!(
                world.rust_receive(channel, "python group_send").await,
                message,
                "what {} sent to the group, as the Rust channel {channel:?} received it",
                world.py.class()
            );
        }
    }

    /// A Rust `group_send` reaches every Python channel in the group.
    pub async fn rust_group_send_reaches_python_channels(test: &str, imp: Impl, kind: Kind) {
        let Some(python) = python(test).await else {
            return;
        };
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let (config, py) = sandbox(imp, kind, vec![server.url()]);
        let group = "chat_room";
        // The Python listener starts while the Rust layer connects.
        let mut listener = py.listen(python, &[group], 2, 2);
        let rust = connect(kind, config).await;
        let ready = listener.ready().await;
        assert_eq!(ready.layer, py.class());

        let message = rich("rust group_send");
        rust.group_send(group, as_message(&message))
            .await
            .expect("Rust group_send");
        each_channel_hears_it_once(&mut listener, &py, &message, 2, ready.channels).await;
    }

    /// A Python `send` to a Rust channel's name arrives there, and only
    /// there: two channels of one Rust layer, a message for each.
    pub async fn python_send_reaches_the_rust_channel(test: &str, imp: Impl, kind: Kind) {
        let Some(world) = world(test, imp, kind, 1).await else {
            return;
        };
        let (first, second) = (world.rust_channel().await, world.rust_channel().await);
        let (to_first, to_second) = (rich("to the first"), rich("to the second"));
        // Two Python processes at once: the suite stays quick.
        tokio::join!(
            world.py.send(world.python, &first, &to_first),
            world.py.send(world.python, &second, &to_second),
        );
        assert_eq!(world.rust_receive(&first, "python send").await, to_first);
        assert_eq!(world.rust_receive(&second, "python send").await, to_second);
    }

    /// A Rust `send` to a Python channel's name arrives there, and only there.
    pub async fn rust_send_reaches_the_python_channel(test: &str, imp: Impl, kind: Kind) {
        let Some(python) = python(test).await else {
            return;
        };
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let (config, py) = sandbox(imp, kind, vec![server.url()]);
        let mut listener = py.listen(python, &[], 2, 2);
        let rust = connect(kind, config).await;
        let ready = listener.ready().await;
        assert_eq!(ready.layer, py.class());

        let mut sent = BTreeMap::new();
        for (i, channel) in ready.channels.iter().enumerate() {
            let message = rich(&format!("rust send {i}"));
            rust.send(channel, as_message(&message))
                .await
                .expect("Rust send");
            sent.insert(channel.clone(), message);
        }
        let mut received = BTreeMap::new();
        for _ in 0..2 {
            let (channel, message) = listener.message().await;
            assert!(
                received.insert(channel.clone(), message).is_none(),
                "{channel} received twice"
            );
        }
        assert_eq!(received, sent, "each message on its own channel, as sent");
        listener.exited().await;
    }

    /// A plain channel (no `!`, e.g. a worker's `worker.jobs`) is shared:
    /// a Rust `send` reaches a Python receiver, and for the queue layer,
    /// where such a channel is a work queue kept in Redis, a Python `send`
    /// reaches a Rust receiver. (A pub/sub receiver subscribes on its first
    /// receive, and a Rust test cannot see when that is done, so the pub/sub
    /// layer is checked in the one direction.)
    pub async fn plain_channel_both_ways(test: &str, imp: Impl, kind: Kind) {
        let Some(world) = world(test, imp, kind, 1).await else {
            return;
        };
        let channel = "worker.jobs";
        let mut listener = world.py.listen_on(world.python, channel, 1);
        assert_eq!(listener.ready().await.channels, [channel]);
        let message = rich("rust send to a plain channel");
        world
            .rust
            .send(channel, as_message(&message))
            .await
            .expect("Rust send");
        assert_eq!(listener.message().await, (channel.to_owned(), message));
        listener.exited().await;

        if kind == Kind::Queue {
            let message = rich("python send to a plain channel");
            world.py.send(world.python, channel, &message).await;
            assert_eq!(world.rust_receive(channel, "python send").await, message);
        }
    }

    /// Through a real axum route: a Python `group_send` reaches the
    /// WebSocket client of a Rust consumer in that group, and what the
    /// client says, the consumer sends to the group, where a Python listener
    /// hears it.
    pub async fn websocket_client_and_python_share_a_room(test: &str, imp: Impl, kind: Kind) {
        let Some(python) = python(test).await else {
            return;
        };
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let (config, py) = sandbox(imp, kind, vec![server.url()]);
        // It hears the room twice: what Python says, then the client.
        let mut listener = py.listen(python, &[ROOM], 1, 2);
        let layers = Layers::new().with_shared("room", connect(kind, config).await);
        let app = Router::new().route("/ws/room", layers.route::<Room>());
        let server = TestServer::start(app).await;
        // The consumer joins its group before it accepts, so once connected
        // it hears the room.
        let mut client = server.connect("/ws/room").await;
        assert_eq!(listener.ready().await.layer, py.class());

        let from_python = "héllo from Python 🐍";
        py.group_send(
            python,
            ROOM,
            &json!({"type": "chat.message", "message": from_python}),
        )
        .await;
        assert_eq!(client.recv_text().await, format!("room: {from_python}"));
        let (_, heard) = listener.message().await;
        assert_eq!(heard["message"], from_python);

        let from_browser = "and from the browser, 世界 ✓";
        client.send_text(from_browser).await;
        let (_, heard) = listener.message().await;
        assert_eq!(
            heard,
            json!({"type": "chat.message", "message": from_browser}),
            "what the Rust consumer sent to the room, as {} heard it",
            py.class()
        );
        // The client is in the room too, so it hears itself.
        assert_eq!(client.recv_text().await, format!("room: {from_browser}"));
        listener.exited().await;
    }

    /// With two redis-servers in both configurations, sends cross both ways
    /// whichever shard a name hashes to. Names are picked so that every
    /// string the spec hashes (section 1.6 and 2.5) lands on the other
    /// shard than a wrong choice would: the full channel name against its
    /// non-local part, the bare group against its key or pub/sub channel.
    /// In particular a Python queue-layer `send` to a specific channel
    /// writes to the shard of the *full* name, where the Python receiver
    /// would not look (the spec's bug); the Rust receiver must find it.
    pub async fn two_hosts(test: &str, imp: Impl, kind: Kind) {
        let Some(world) = world(test, imp, kind, 2).await else {
            return;
        };
        let python = world.python;
        let py = &world.py;
        // Enough channels that one hashes apart from its non-local part
        // (half of them do; all 16 failing to is a 1 in 65536 chance).
        let mut listener = py.listen(python, &[], 16, 1);

        let rust_channel = {
            let mut tries = 0;
            loop {
                let name = world.rust_channel().await;
                if hashes_apart(kind, &name) {
                    break name;
                }
                tries += 1;
                assert!(
                    tries < 64,
                    "no Rust channel hashes apart from its non-local name"
                );
            }
        };
        let group = (0..)
            .map(|i| format!("room{i}"))
            .find(|group| shard(group) != shard(&group_string(py, group)))
            .expect("a group name");

        // Python to Rust: send, then group_send.
        let message = rich("python send, two hosts");
        py.send(python, &rust_channel, &message).await;
        assert_eq!(
            world.rust_receive(&rust_channel, "python send").await,
            message
        );
        world
            .rust
            .group_add(&group, &rust_channel)
            .await
            .expect("group_add");
        let message = rich("python group_send, two hosts");
        py.group_send(python, &group, &message).await;
        assert_eq!(
            world.rust_receive(&rust_channel, "python group_send").await,
            message
        );

        // Rust to Python.
        let ready = listener.ready().await;
        let python_channel = ready
            .channels
            .iter()
            .find(|name| hashes_apart(kind, name))
            .expect("a Python channel that hashes apart from its non-local name");
        let message = rich("rust send, two hosts");
        world
            .rust
            .send(python_channel, as_message(&message))
            .await
            .expect("Rust send");
        assert_eq!(listener.message().await, (python_channel.clone(), message));
        listener.exited().await;

        let mut listener = py.listen(python, &[&group], 1, 1);
        listener.ready().await;
        let message = rich("rust group_send, two hosts");
        world
            .rust
            .group_send(&group, as_message(&message))
            .await
            .expect("Rust group_send");
        assert_eq!(listener.message().await.1, message);
        listener.exited().await;
    }

    /// The shard of `name` among two hosts, by the Rust function (checked
    /// against Python's in `consistent_hash_agrees_with_python`).
    fn shard(name: &str) -> usize {
        consistent_hash(name, 2)
    }

    /// Whether a specific channel of the queue layer lies on another shard
    /// than its non-local part, so that a peer hashing the wrong one misses
    /// it. Pub/sub names have no `!`: any one will do.
    fn hashes_apart(kind: Kind, name: &str) -> bool {
        kind == Kind::PubSub || shard(name) != shard(non_local(name))
    }

    /// `specific.abc!def` → `specific.abc!` (spec 1.2).
    fn non_local(name: &str) -> &str {
        name.find('!').map_or(name, |bang| &name[..=bang])
    }

    /// What the layer hashes for a group besides the bare name: the pub/sub
    /// channel `{prefix}__group__{group}`, or the queue layer's key
    /// `{prefix}:group:{group}`, which must *not* be what is hashed.
    fn group_string(py: &PyLayer, group: &str) -> String {
        match py.kind {
            Kind::Queue => format!("{}:group:{group}", py.prefix),
            Kind::PubSub => format!("{}__group__{group}", py.prefix),
        }
    }
}

/// The group of [`Room`].
const ROOM: &str = "chat_room";

/// What travels through the room, in the Python tutorial's shape:
/// `{"type": "chat.message", "message": ...}`.
#[derive(Serialize, Deserialize)]
#[serde(tag = "type")]
enum RoomEvent {
    #[serde(rename = "chat.message")]
    ChatMessage { message: String },
}

impl LayerEvent for RoomEvent {}

/// A chat room consumer: it joins [`ROOM`], sends what its client says to
/// the room, and tells its client what the room says.
struct Room;

impl Consumer for Room {
    type Event = RoomEvent;
    const LAYER: Option<&'static str> = Some("room");

    fn new(_scope: &Scope) -> Self {
        Room
    }

    fn groups(&self) -> Vec<String> {
        vec![ROOM.to_owned()]
    }

    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        socket.accept().await
    }

    async fn receive(&mut self, socket: &mut Socket, frame: Frame) -> Result<()> {
        if let Frame::Text(message) = frame {
            socket
                .group_send(ROOM, &RoomEvent::ChatMessage { message })
                .await?;
        }
        Ok(())
    }

    async fn event(&mut self, socket: &mut Socket, event: RoomEvent) -> Result<()> {
        let RoomEvent::ChatMessage { message } = event;
        socket.send_text(format!("room: {message}")).await
    }
}

/// One module per Python package and layer kind, with one test per check,
/// so a failure reads e.g. `django_queue::python_send_reaches_the_rust_channel`.
macro_rules! matrix {
    ($module:ident, $imp:expr, $kind:expr) => {
        mod $module {
            use super::*;

            matrix!(@tests $module, $imp, $kind,
                python_group_send_reaches_rust_channels,
                rust_group_send_reaches_python_channels,
                python_send_reaches_the_rust_channel,
                rust_send_reaches_the_python_channel,
                plain_channel_both_ways,
                websocket_client_and_python_share_a_room,
                two_hosts,
            );
        }
    };
    (@tests $module:ident, $imp:expr, $kind:expr, $($check:ident,)*) => {
        $(
            #[tokio::test]
            async fn $check() {
                let name = concat!(stringify!($module), "::", stringify!($check));
                checks::$check(name, $imp, $kind).await;
            }
        )*
    };
}

matrix!(fast_queue, Impl::Fast, Kind::Queue);
matrix!(fast_pubsub, Impl::Fast, Kind::PubSub);
matrix!(django_queue, Impl::Django, Kind::Queue);
matrix!(django_pubsub, Impl::Django, Kind::PubSub);

/// `consistent_hash` of the Rust crate picks the same host as each Python
/// package's own function, for 2 to 5 hosts (and 1), on the spec's
/// examples, the sandbox's names, names of both layers' channels and
/// groups, and arbitrary UTF-8.
#[tokio::test]
async fn consistent_hash_agrees_with_python() {
    let Some(python) = python("consistent_hash_agrees_with_python").await else {
        return;
    };
    let mut names: Vec<String> = [
        // The spec's table (section 1.6).
        "chat__group__chat_room",
        "reliable_chat",
        "specific.abc!",
        // Sandbox groups and keys, bare and as each layer spells them.
        "chat_room",
        "notifications",
        "notify__group__notifications",
        "queue:group:reliable_chat",
        "worker.jobs",
        "queueworker.jobs",
        // Channel names of both layers' shapes (spec 1.2 and 2.2).
        "specific.d0a712bf8a1f4369ba8d0a9a466b4511!",
        "specific.d0a712bf8a1f4369ba8d0a9a466b4511!56d0c51210de4166a46dc93a92d52605",
        "chatspecific.3bfd638b811e46aca03a8153aae5973e",
        // Edges: empty, one byte, long, and multi-byte UTF-8.
        "",
        "a",
        "café",
        "世界🌍",
    ]
    .map(str::to_owned)
    .to_vec();
    names.push("x".repeat(99));
    names.extend((0..40).map(|i| format!("group-{i}")));

    let ring_sizes = [1, 2, 3, 4, 5];
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let (fast, django) = tokio::join!(
        python.consistent_hash(Impl::Fast, &names, &ring_sizes),
        python.consistent_hash(Impl::Django, &names, &ring_sizes),
    );
    assert_eq!(fast.len(), names.len() * ring_sizes.len());
    assert_eq!(fast, django, "the two Python packages disagree");
    let mut spread = [0; 5];
    for (name, n, index) in &fast {
        assert_eq!(
            consistent_hash(name, *n),
            *index,
            "consistent_hash({name:?}, {n}) in Rust, against Python's"
        );
        if *n == 5 {
            spread[*index] += 1;
        }
    }
    // Not everything on one host: the comparison covered every index.
    assert!(
        spread.iter().all(|&count| count > 0),
        "spread over 5: {spread:?}"
    );
}

/// A Rust `group_send` whose message, naming every member of one Python
/// process, would pass `max_message_size` is split into several messages
/// in that process's key, each naming some of them: each Python package
/// reads them as it reads any group message, and each of its channels gets
/// the message once.
async fn a_split_group_send_reaches_python_channels_once(test: &str, imp: Impl) {
    let Some(python) = python(test).await else {
        return;
    };
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let (config, py) = sandbox(imp, Kind::Queue, vec![server.url()]);
    let group = "chat_room";
    let channels = 6;
    let mut listener = py.listen(python, &[group], channels, channels);
    let message = rich("rust group_send, split");
    // The size of the message routed to one channel (75 bytes of name),
    // as the layer's refusal of it at a limit of 1 byte says.
    let probe = RedisLayer::connect(config.clone().with_max_message_size(1))
        .await
        .expect("connect the Rust queue layer");
    let one = match probe
        .send(
            "specific.d0a712bf8a1f4369ba8d0a9a466b4511!56d0c51210de4166a46dc93a92d52605",
            as_message(&message),
        )
        .await
    {
        Err(LayerError::MessageTooLarge { size, .. }) => size,
        other => panic!("a 1-byte limit refuses the message: {other:?}"),
    };
    // Room for two names in a message: six channels take three.
    let rust = RedisLayer::connect(config.with_max_message_size(one + 90))
        .await
        .expect("connect the Rust queue layer");
    let ready = listener.ready().await;
    rust.group_send(group, as_message(&message))
        .await
        .expect("Rust group_send, split");
    each_channel_hears_it_once(&mut listener, &py, &message, channels, ready.channels).await;
}

#[tokio::test]
async fn a_split_group_send_reaches_fast_channels_once() {
    a_split_group_send_reaches_python_channels_once(
        "a_split_group_send_reaches_fast_channels_once",
        Impl::Fast,
    )
    .await;
}

#[tokio::test]
async fn a_split_group_send_reaches_channels_redis_once() {
    a_split_group_send_reaches_python_channels_once(
        "a_split_group_send_reaches_channels_redis_once",
        Impl::Django,
    )
    .await;
}
