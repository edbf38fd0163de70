//! What each kind of layer promises, shown by breaking things on a real
//! redis-server: a member that falls behind (pub/sub keeps its newest
//! messages, the queue layer its oldest, up to its capacity), and Redis
//! restarted under connected clients (both kinds come back by themselves;
//! what was sent meanwhile is gone).
//!
//! Without `redis-server` installed, the tests say so and pass; with
//! `CI=true` they fail.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use axum_channels::layer::{LayerEvent, to_layer_message};
use axum_channels::testing::{TestClient, Transcript};
use channels_testkit::{RedisServer, ServerProcess};
use insta::assert_snapshot;
use step_06_presence_history::{
    Chat, ChatEvent, Config, ReliableChat, ReliableChatEvent, setup_redis,
};
use support::capture_logs;

/// How many messages the talker sends while the member reads nothing: more
/// than either layer keeps for it.
const SENT: usize = 1200;

/// Long enough for a stray frame or a message in flight to show up.
const QUIET: Duration = Duration::from_millis(300);

/// Sends `SENT` numbered messages to `group` on the step's layer `alias`
/// while one member reads nothing, then lets the member read what it can.
/// Returns a line for the transcript.
async fn fall_behind<E: LayerEvent>(
    url: &str,
    alias: &str,
    group: &str,
    event: impl Fn(String) -> E,
) -> String {
    let group_expiry = Config::default().group_expiry;
    let layers = setup_redis(url, None, group_expiry)
        .await
        .expect("the step's layers");
    let layer = layers.get(alias).expect("the alias");
    let member = layer.new_channel("specific").await.unwrap();
    layer.group_add(group, &member).await.unwrap();

    for n in 1..=SENT {
        let message = to_layer_message(&event(format!("#{n}"))).unwrap();
        layer.group_send(group, message).await.unwrap();
    }
    // The member is busy a moment longer: whatever is on its way arrives.
    tokio::time::sleep(QUIET).await;

    let mut read = Vec::new();
    while let Ok(message) = tokio::time::timeout(QUIET, layer.receive(&member)).await {
        let message = message.unwrap();
        read.push(message["message"].as_str().unwrap_or_default().to_owned());
    }
    let (first, last) = (read.first().cloned(), read.last().cloned());
    format!(
        "{alias}: {SENT} sent to {group}, then the member reads {} messages: {} … {}",
        read.len(),
        first.unwrap_or_default(),
        last.unwrap_or_default()
    )
}

#[tokio::test]
async fn a_member_that_falls_behind() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let logs = capture_logs();
    let transcript = Transcript::default();
    transcript.push("# pub/sub: the member's local buffer keeps its newest 100");
    let chat = fall_behind(&redis.url(), "chat", Chat::GROUP, |n| {
        ChatEvent::ChatMessage {
            message: format!("💬 {n}"),
        }
    })
    .await;
    transcript.push(chat);
    transcript.push("# queue: Redis keeps the member's oldest 1000 (its capacity)");
    let queue = fall_behind(&redis.url(), "queue", ReliableChat::GROUP, |n| {
        ReliableChatEvent::ReliableChatMessage {
            message: format!("📨 {n}"),
        }
    })
    .await;
    transcript.push(queue);

    // Each loss is one warning, not one per message.
    let dropped = "a channel's local buffer is full: dropping its oldest messages";
    assert_eq!(logs.count(dropped), 1, "{}", logs.text());
    let skipped = "group_send skipped member channels that are at capacity";
    assert_eq!(logs.count(skipped), 1, "{}", logs.text());
    transcript.push(format!("# logged once each: {dropped:?}, {skipped:?}"));
    assert_snapshot!("a_member_that_falls_behind", transcript);
}

/// Waits up to 10 s until the server has logged `needle` `times` times.
async fn wait_for_log(server: &ServerProcess, needle: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.output().matches(needle).count() < times {
        assert!(
            Instant::now() < deadline,
            "the server never logged {needle:?} {times} times:\n{}",
            server.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the external sender with quick pauses; its exit status and output.
async fn run_sender(url: String) -> (bool, String) {
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!(
            "CARGO_BIN_EXE_step-06-presence-history-external-sender"
        ))
        .env("REDIS_URL", url)
        .env("SENDER_PAUSE_MS", "0")
        .output()
        .expect("run the external_sender binary")
    })
    .await
    .expect("the sender's thread");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[tokio::test]
async fn redis_restarts_under_connected_clients() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let url = redis.url();
    let server = ServerProcess::start(
        env!("CARGO_BIN_EXE_step-06-presence-history"),
        &[("REDIS_URL", url.as_str())],
    )
    .await;
    let transcript = Transcript::default();
    // A client on each layer, so each has something to restore.
    let mut chat = server.connect_as("chat", "/ws/chat", &transcript).await;
    chat.recv_text().await;
    let mut reliable = server
        .connect_as("reliable", "/ws/reliable", &transcript)
        .await;
    reliable.recv_text().await;
    let mut notifications = server
        .connect_as("notifications", "/ws/notifications", &transcript)
        .await;
    notifications.recv_text().await;
    let _analytics = server
        .connect_as("analytics", "/ws/analytics", &transcript)
        .await;

    transcript.push("# redis-server is killed");
    redis.kill().await;
    wait_for_log(&server, "is unreachable", 1).await;
    let (ok, said) = run_sender(url.clone()).await;
    assert!(!ok, "the sender must fail without Redis:\n{said}");
    // The port is new on every run.
    let said = said.replace(&format!(":{}", redis.port()), ":<port>");
    transcript.push(format!("# the external sender: {}", said.trim()));
    let refused =
        TestClient::connect_url(&server.ws_url("/ws/chat"), "late", "/ws/chat", &transcript).await;
    assert!(refused.is_err(), "a new client needs Redis for its channel");
    // Its `group_send` fails, but an outage is not the consumer's fault:
    // the message is lost and the client stays connected.
    chat.send_text("anyone?").await;
    chat.expect_silence(Duration::from_millis(500)).await;

    transcript.push("# redis-server starts again, empty, on the same port");
    redis.restart().await;
    // Each pub/sub layer subscribes again, each queue layer rewrites its
    // memberships, and then says it is back: four layers, one line each.
    wait_for_log(&server, "is back after", 4).await;
    reliable.send_text("still here").await;
    assert_eq!(reliable.recv_text().await, "📨 still here");
    let (ok, said) = run_sender(url).await;
    assert!(ok, "{said}");
    transcript.push("# the external sender runs again, and succeeds");
    assert_eq!(
        reliable.recv_text().await,
        "🔒 Important: System maintenance scheduled for tonight"
    );
    assert_eq!(
        notifications.recv_text().await,
        r#"{"type":"system","message":"🚨 Alert: High CPU usage detected on server"}"#
    );
    let mut chat2 = server.connect_as("chat2", "/ws/chat", &transcript).await;
    assert_eq!(chat2.recv_text().await, "📢 Someone joined the chat");
    // The client that spoke during the outage is still in the room: it
    // hears what the sender said there, and then the newcomer.
    let heard: Vec<String> = {
        let mut heard = Vec::new();
        while heard
            .last()
            .is_none_or(|text| text != "📢 Someone joined the chat")
        {
            assert!(heard.len() < 10, "the chat client heard {heard:?}");
            heard.push(chat.recv_text().await);
        }
        heard
    };
    assert!(heard[0].starts_with("🔔 System announcement"), "{heard:?}");
    assert_snapshot!("redis_restarts_under_connected_clients", transcript);
}
