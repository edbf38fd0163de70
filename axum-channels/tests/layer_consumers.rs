//! Consumers with a channel layer: groups joined before `connect` and left
//! after `disconnect`, layer messages dispatched by `"type"`, and the layer
//! holding nothing once everyone has gone.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum_channels::layer::{ChannelLayer, InMemoryLayer, LayerEvent, LayerMessage, Layers};
use axum_channels::testing::{Received, TestServer};
use axum_channels::{
    Consumer, Frame, InboundBudget, JsonConsumer, Result, Runtime, Scope, Settings, Socket, route,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

const QUIET: Duration = Duration::from_millis(100);

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum LobbyEvent {
    Say { text: String },
}

impl LayerEvent for LobbyEvent {}

/// Joins the `lobby` group; `say X` goes to the lobby, `join G` joins group
/// `G` too, `whoami` answers with the connection's channel name, and
/// `refuse` in the path refuses.
struct Lobby {
    refuse: bool,
}

impl Consumer for Lobby {
    type Event = LobbyEvent;
    const LAYER: Option<&'static str> = Some("lobby");

    fn new(scope: &Scope) -> Self {
        Lobby {
            refuse: scope.path().ends_with("refuse"),
        }
    }

    fn groups(&self) -> Vec<String> {
        vec!["lobby".to_owned()]
    }

    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        if self.refuse {
            return socket.close(4003, "no").await;
        }
        socket.accept().await?;
        socket
            .group_send(
                "lobby",
                &LobbyEvent::Say {
                    text: "joined".into(),
                },
            )
            .await
    }

    async fn receive(&mut self, socket: &mut Socket, frame: Frame) -> Result<()> {
        let Frame::Text(text) = frame else {
            return Ok(());
        };
        if text == "panic" {
            panic!("a bug in the consumer");
        }
        if text == "whoami" {
            let name = socket.channel_name().unwrap_or("none").to_owned();
            return socket.send_text(name).await;
        }
        if let Some(group) = text.strip_prefix("join ") {
            return socket.group_add(group).await;
        }
        if let Some(said) = text.strip_prefix("say ") {
            let event = LobbyEvent::Say {
                text: said.to_owned(),
            };
            return socket.group_send("lobby", &event).await;
        }
        Ok(())
    }

    async fn event(&mut self, socket: &mut Socket, event: LobbyEvent) -> Result<()> {
        match event {
            LobbyEvent::Say { text } => socket.send_text(format!("lobby: {text}")).await,
        }
    }
}

/// The server, and the layer behind it for the test to look into.
async fn lobby() -> (TestServer, Arc<InMemoryLayer>) {
    lobby_with(Settings::default()).await
}

async fn lobby_with(settings: Settings) -> (TestServer, Arc<InMemoryLayer>) {
    let layer = Arc::new(InMemoryLayer::default());
    let layers = Layers::new().with_shared("lobby", layer.clone());
    let app = Router::new()
        .route("/lobby", layers.route::<Lobby>())
        .route("/lobby/refuse", layers.route::<Lobby>());
    let runtime = Runtime::new(settings).expect("valid settings");
    (TestServer::start_with(runtime, app).await, layer)
}

/// Waits (boundedly) for the runners of closed connections to finish their
/// clean-up, then checks the layer holds no channel and no group.
async fn until_empty(layer: &InMemoryLayer) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while layer.size() != (0, 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "left behind: {:?}",
            layer.size()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn message(value: serde_json::Value) -> LayerMessage {
    value.as_object().expect("an object").clone()
}

#[tokio::test]
async fn group_messages_reach_every_member_including_the_first() {
    let (server, _layer) = lobby().await;
    let mut first = server.connect("/lobby").await;
    assert_eq!(
        first.recv_text().await,
        "lobby: joined",
        "the first member hears its own join"
    );
    let mut second = server.connect("/lobby").await;
    assert_eq!(first.recv_text().await, "lobby: joined");
    assert_eq!(second.recv_text().await, "lobby: joined");

    second.send_text("say hi").await;
    assert_eq!(first.recv_text().await, "lobby: hi");
    assert_eq!(second.recv_text().await, "lobby: hi");
}

#[tokio::test]
async fn unknown_or_malformed_events_are_dropped_and_the_connection_lives_on() {
    let (server, layer) = lobby().await;
    let mut client = server.connect("/lobby").await;
    client.recv_text().await;

    layer
        .group_send("lobby", message(json!({"type": "mystery"})))
        .await
        .unwrap();
    layer
        .group_send("lobby", message(json!({"type": "say"})))
        .await
        .unwrap(); // no "text"
    layer
        .group_send(
            "lobby",
            message(json!({"type": "say", "text": "still here"})),
        )
        .await
        .unwrap();
    assert_eq!(client.recv_text().await, "lobby: still here");
    client.expect_silence(QUIET).await;
}

#[tokio::test]
async fn others_can_write_to_a_connection_by_its_channel_name() {
    let (server, layer) = lobby().await;
    let mut client = server.connect("/lobby").await;
    client.recv_text().await;
    client.send_text("whoami").await;
    let channel = client.recv_text().await;
    assert!(channel.starts_with("specific."), "{channel}");

    layer
        .send(
            &channel,
            message(json!({"type": "say", "text": "just you"})),
        )
        .await
        .unwrap();
    assert_eq!(client.recv_text().await, "lobby: just you");
}

#[tokio::test]
async fn the_layer_holds_nothing_once_everyone_has_left() {
    let (server, layer) = lobby().await;
    let mut polite = server.connect("/lobby").await;
    polite.recv_text().await;
    let mut vanishing = server.connect("/lobby").await;
    polite.recv_text().await;
    vanishing.recv_text().await;
    assert_eq!(layer.size().1, 1, "one group");

    vanishing.drop_connection();
    polite.close(1000).await;
    // A refused connection joins nothing for long either.
    let refused = server
        .try_connect_as("", "/lobby/refuse", &Default::default())
        .await;
    assert_eq!(refused.err().map(|status| status.as_u16()), Some(403));

    until_empty(&layer).await;
}

#[tokio::test]
async fn a_panicking_consumer_still_leaves_its_groups() {
    let (server, layer) = lobby().await;
    let mut client = server.connect("/lobby").await;
    client.recv_text().await;
    client.send_text("panic").await;
    assert_eq!(
        client.recv().await,
        Received::Close {
            code: 1011,
            reason: "internal error".into()
        }
    );
    drop(client);
    until_empty(&layer).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_does_not_hold_up_the_others() {
    // The talker sends 12 MB as fast as it can: over the default inbound
    // budget, which is not what this test is about.
    let mut settings = Settings::default();
    settings.connection.inbound = InboundBudget::UNLIMITED;
    let (server, layer) = lobby_with(settings).await;
    let mut sleeper = server.connect("/lobby").await;
    assert_eq!(sleeper.recv_text().await, "lobby: joined");
    sleeper.send_text("whoami").await;
    let sleeper_channel = sleeper.recv_text().await;
    // From here on the sleeper reads nothing: its socket buffers fill up, its
    // consumer blocks on sending, and its channel reaches capacity.
    let mut talker = server.connect("/lobby").await;
    assert_eq!(talker.recv_text().await, "lobby: joined");
    let bulk = "x".repeat(60 * 1024);
    for n in 0..200 {
        talker.send_text(&format!("say {n} {bulk}")).await;
        let heard = talker.recv_text().await;
        assert!(
            heard.starts_with(&format!("lobby: {n} ")),
            "message {n} came back as {:.20}",
            heard
        );
    }
    // What the sleeper missed is bounded: its channel holds exactly its
    // capacity, and the rest was dropped.
    let mut waiting = 0;
    while tokio::time::timeout(QUIET, layer.receive(&sleeper_channel))
        .await
        .is_ok()
    {
        waiting += 1;
    }
    assert_eq!(
        waiting, 100,
        "the sleeper's channel should be full, and no fuller"
    );
    drop(sleeper);
}

#[test]
#[should_panic(expected = "no channel layer is registered as \"lobby\" (registered: chat)")]
fn an_unknown_alias_is_reported_when_the_router_is_built() {
    let layers = Layers::new().with("chat", InMemoryLayer::default());
    let _ = layers.route::<Lobby>();
}

#[test]
#[should_panic(expected = "route it with `layers.route::<Lobby>()`")]
fn a_layer_consumer_cannot_be_routed_without_its_layers() {
    let _ = route::<Lobby>();
}

/// A JSON consumer: `{"n": 2}` gets `{"double": 4}`.
struct Doubler;

#[derive(Deserialize)]
struct Number {
    n: i64,
}

impl JsonConsumer for Doubler {
    type Message = Number;
    type Event = axum_channels::NoEvents;

    fn new(_scope: &Scope) -> Self {
        Doubler
    }

    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        socket.accept().await
    }

    async fn receive(&mut self, socket: &mut Socket, number: Number) -> Result<()> {
        socket.send_json(&json!({"double": number.n * 2})).await
    }
}

#[tokio::test]
async fn invalid_json_gets_an_error_frame_and_the_connection_stays_open() {
    let server = TestServer::start(Router::new().route("/double", route::<Doubler>())).await;
    let mut client = server.connect("/double").await;
    for bad in ["not json", "", "[1, 2]", "{\"n\": \"two\"}"] {
        client.send_text(bad).await;
        let reply: serde_json::Value = serde_json::from_str(&client.recv_text().await).unwrap();
        assert_eq!(reply["status"], "error", "{bad:?} -> {reply}");
        assert!(
            reply["message"]
                .as_str()
                .unwrap()
                .starts_with("❌ Invalid message: ")
        );
    }
    client.send_bytes(&[1, 2]).await;
    let reply = client.recv_text().await;
    assert!(reply.contains("binary"), "{reply}");
    client.send_text("{\"n\": 21}").await;
    assert_eq!(client.recv_text().await, "{\"double\":42}");
    assert_eq!(
        client.close(1000).await,
        Received::Close {
            code: 1000,
            reason: String::new()
        }
    );
}

/// A consumer's memberships are renewed while its connection lives, so it
/// keeps hearing its groups long after `group_expiry` (the default is one
/// day; here it is 150 ms): the one it declares and one it joined at run
/// time. A channel added to the same group by hand, and never renewed,
/// lapses: that shows the expiry is real.
#[tokio::test]
async fn live_connections_keep_their_groups_past_the_group_expiry() {
    let group_expiry = Duration::from_millis(150);
    let layer = Arc::new(InMemoryLayer::new(
        axum_channels::layer::MemoryConfig::default().with_group_expiry(group_expiry),
    ));
    keeps_its_groups_past_the_group_expiry(layer, group_expiry * 4).await;
}

/// The check behind the test above, for any layer whose memberships lapse:
/// a live connection still hears its group after `wait` (several expiry
/// periods: a configured delay, not a timing check); a membership nobody
/// renews does not.
async fn keeps_its_groups_past_the_group_expiry(layer: Arc<dyn ChannelLayer>, wait: Duration) {
    let layers = Layers::new().with_shared("lobby", layer.clone());
    let server = TestServer::start(Router::new().route("/lobby", layers.route::<Lobby>())).await;
    let mut member = server.connect("/lobby").await;
    assert_eq!(member.recv_text().await, "lobby: joined");
    member.send_text("join later").await;
    // Frames are handled in order: once this is answered, the join is done.
    member.send_text("whoami").await;
    member.recv_text().await;
    layer.group_add("lobby", "unrenewed").await.unwrap();

    tokio::time::sleep(wait).await;

    layer
        .group_send(
            "later",
            message(json!({"type": "say", "text": "joined at run time"})),
        )
        .await
        .unwrap();
    assert_eq!(
        member.recv_text().await,
        "lobby: joined at run time",
        "a group joined with socket.group_add is renewed too"
    );

    layer
        .group_send(
            "lobby",
            message(json!({"type": "say", "text": "still here?"})),
        )
        .await
        .unwrap();
    assert_eq!(member.recv_text().await, "lobby: still here?");
    layer
        .send("unrenewed", message(json!({"type": "say", "text": "x"})))
        .await
        .unwrap();
    let first = layer.receive("unrenewed").await.unwrap();
    assert_eq!(
        first["text"], "x",
        "the unrenewed member's lapsed membership got no group message"
    );
}

/// The same consumers on the Redis layers: memberships renewed in Redis,
/// and a Redis that goes away and comes back while clients are connected.
#[cfg(feature = "redis")]
mod on_redis {
    use axum_channels::NoEvents;
    use axum_channels::layer::LayerError;
    use axum_channels::layer::redis::{RedisConfig, RedisLayer, RedisPubSubLayer};
    use channels_testkit::RedisServer;
    use tokio::time::Instant;

    use super::*;

    fn config(server: &RedisServer) -> RedisConfig {
        RedisConfig::new(server.url()).with_block_timeout(Duration::from_secs(1))
    }

    /// On the queue layer, with a group expiry of 2 s: on the wire that is
    /// whole seconds, so a membership lasts 2 to 3 s, and the runner renews
    /// it every second. After 5 s the live member still hears the room.
    #[tokio::test]
    async fn the_queue_layer_keeps_live_memberships_past_the_group_expiry() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let layer = RedisLayer::connect(config(&server).with_group_expiry(Duration::from_secs(2)))
            .await
            .unwrap();
        keeps_its_groups_past_the_group_expiry(Arc::new(layer), Duration::from_secs(5)).await;
    }

    /// Step 01's echo: no channel layer.
    struct Echo;

    impl Consumer for Echo {
        type Event = NoEvents;

        fn new(_scope: &Scope) -> Self {
            Echo
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
    }

    /// Kills redis-server under an app with a lobby member and an echo
    /// client, then starts it again on the same port.
    async fn survives_a_redis_restart(server: &mut RedisServer, layer: Arc<dyn ChannelLayer>) {
        let layers = Layers::new().with_shared("lobby", layer.clone());
        let app = Router::new()
            .route("/lobby", layers.route::<Lobby>())
            .route("/echo", route::<Echo>());
        let http = TestServer::start(app).await;
        let mut member = http.connect("/lobby").await;
        assert_eq!(member.recv_text().await, "lobby: joined");
        let mut echo = http.connect("/echo").await;

        server.kill().await;
        echo.send_text("still there?").await;
        assert_eq!(
            echo.recv_text().await,
            "still there?",
            "the echo does not need Redis"
        );
        let started = Instant::now();
        let failed = layer
            .group_send("lobby", message(json!({"type": "say", "text": "lost"})))
            .await;
        assert!(matches!(failed, Err(LayerError::Backend(_))), "{failed:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "a layer call failed only after {:?}",
            started.elapsed()
        );
        let refused = http.try_connect_as("", "/lobby", &Default::default()).await;
        assert_eq!(
            refused.err().map(|status| status.as_u16()),
            Some(500),
            "a new lobby member cannot join while Redis is away"
        );
        echo.send_text("and now?").await;
        assert_eq!(echo.recv_text().await, "and now?");
        // The member's own `group_send(..)?` fails too; that is an outage,
        // not a bug in the consumer, and the client stays connected
        // rather than being closed with 1011.
        member.send_text("say into the void").await;
        member.send_text("whoami").await;
        let answer = member.recv().await;
        assert!(
            matches!(&answer, Received::Text(name) if name.contains("specific")),
            "the member was answered after its failed send, not closed: {answer}"
        );

        server.restart().await;
        let restarted = Instant::now();
        let mut n = 0;
        loop {
            assert!(
                restarted.elapsed() < Duration::from_secs(5),
                "the lobby heard nothing within 5 s of Redis coming back\n{}",
                member.transcript()
            );
            // Until the layer has reconnected (and resubscribed, or written
            // the membership Redis lost again), sends fail or are lost. The
            // member that lived through the outage talks again.
            member.send_text(&format!("say back {n}")).await;
            n += 1;
            if let Some(received) = member.try_recv(Duration::from_millis(100)).await {
                let Received::Text(text) = received else {
                    panic!("the member got {received}");
                };
                assert!(text.starts_with("lobby: back "), "{text}");
                break;
            }
        }
        let mut newcomer = http.connect("/lobby").await;
        assert_eq!(newcomer.recv_text().await, "lobby: joined");
        echo.send_text("bye").await;
        assert_eq!(echo.recv_text().await, "bye");
    }

    #[tokio::test]
    async fn the_queue_layer_survives_a_redis_restart_under_live_clients() {
        let Some(mut server) = RedisServer::start().await else {
            return;
        };
        let layer = RedisLayer::connect(config(&server)).await.unwrap();
        survives_a_redis_restart(&mut server, Arc::new(layer)).await;
    }

    #[tokio::test]
    async fn the_pubsub_layer_survives_a_redis_restart_under_live_clients() {
        let Some(mut server) = RedisServer::start().await else {
            return;
        };
        let layer = RedisPubSubLayer::connect(config(&server)).await.unwrap();
        survives_a_redis_restart(&mut server, Arc::new(layer)).await;
    }
}

/// A type marked `LayerEvent` that is not tagged by `"type"` is refused at
/// run time, before anything is sent; the compile-time half of the promise
/// is the `compile_fail` example on `LayerEvent`.
#[test]
fn an_untagged_event_is_refused_before_sending() {
    #[derive(Serialize, Deserialize)]
    struct Untagged {
        text: String,
    }
    impl LayerEvent for Untagged {}

    let err = axum_channels::layer::to_layer_message(&Untagged { text: "hi".into() }).unwrap_err();
    assert!(
        matches!(err, axum_channels::layer::LayerError::NotAnEvent { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("#[serde(tag = \"type\")]"),
        "{err}"
    );
}
