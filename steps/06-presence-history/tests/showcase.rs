//! The showcase's four endpoints, each on its own layer and group: joining,
//! talking to the group, leaving, and bad input, which is answered to its
//! sender only and never ends the connection. The app runs in memory here;
//! `tests/external_sender.rs` runs the same endpoints on Redis.

use std::time::Duration;

use axum_channels::testing::{TestClient, TestServer, Transcript};
use insta::assert_snapshot;
use serde_json::{Value, json};

/// Long enough for a stray frame to show up, short enough to keep the suite
/// quick.
const QUIET: Duration = Duration::from_millis(100);

async fn server() -> TestServer {
    TestServer::start(step_06_presence_history::app()).await
}

/// The next frame of a `/ws/notifications` client, as JSON.
async fn recv_json(client: &mut TestClient) -> Value {
    let text = client.recv_text().await;
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("not JSON ({err}): {text}"))
}

/// The frame a notification with `kind` and `message` is sent as.
fn notification(kind: &str, message: &str) -> Value {
    json!({"type": kind, "message": message})
}

#[tokio::test]
async fn chat_join_talk_and_leave() {
    let server = server().await;
    let transcript = Transcript::default();
    let mut alice = server.connect_as("alice", "/ws/chat", &transcript).await;
    // Joined before announcing: the first member hears its own arrival.
    assert_eq!(alice.recv_text().await, "📢 Someone joined the chat");
    let mut bob = server.connect_as("bob", "/ws/chat", &transcript).await;
    assert_eq!(alice.recv_text().await, "📢 Someone joined the chat");
    assert_eq!(bob.recv_text().await, "📢 Someone joined the chat");

    alice.send_text("m1").await;
    assert_eq!(alice.recv_text().await, "💬 m1");
    assert_eq!(bob.recv_text().await, "💬 m1");
    bob.send_text("").await;
    assert_eq!(alice.recv_text().await, "💬 ");
    assert_eq!(bob.recv_text().await, "💬 ");

    bob.close(1000).await;
    assert_eq!(alice.recv_text().await, "❌ Someone left the chat.");
    alice.close(1000).await;
    assert_snapshot!("chat_join_talk_and_leave", transcript);
}

#[tokio::test]
async fn reliable_chat_join_talk_and_leave() {
    let server = server().await;
    let transcript = Transcript::default();
    let joined = "🔒 Reliable chat connection established!";
    let mut alice = server
        .connect_as("alice", "/ws/reliable", &transcript)
        .await;
    assert_eq!(alice.recv_text().await, joined);
    let mut bob = server.connect_as("bob", "/ws/reliable", &transcript).await;
    assert_eq!(alice.recv_text().await, joined);
    assert_eq!(bob.recv_text().await, joined);

    alice.send_text("m1").await;
    assert_eq!(alice.recv_text().await, "📨 m1");
    assert_eq!(bob.recv_text().await, "📨 m1");

    bob.close(1000).await;
    assert_eq!(alice.recv_text().await, "🚪 Left reliable chat!");
    alice.close(1000).await;
    assert_snapshot!("reliable_chat_join_talk_and_leave", transcript);
}

#[tokio::test]
async fn notifications_join_and_talk_in_json() {
    let server = server().await;
    let transcript = Transcript::default();
    let connected = notification("system", "🔔 Connected to notifications!");
    let mut alice = server
        .connect_as("alice", "/ws/notifications", &transcript)
        .await;
    assert_eq!(recv_json(&mut alice).await, connected);
    let mut bob = server
        .connect_as("bob", "/ws/notifications", &transcript)
        .await;
    assert_eq!(recv_json(&mut alice).await, connected);
    assert_eq!(recv_json(&mut bob).await, connected);

    alice.send_text(r#"{"message": "n1"}"#).await;
    let n1 = notification("user", "🔔 Notification: n1");
    assert_eq!(recv_json(&mut alice).await, n1);
    assert_eq!(recv_json(&mut bob).await, n1);
    // Any object will do: without a message, it says so.
    bob.send_text(r#"{"foo": 1}"#).await;
    let none = notification("user", "🔔 Notification: No message");
    assert_eq!(recv_json(&mut alice).await, none);
    assert_eq!(recv_json(&mut bob).await, none);

    // Leaving is not announced.
    bob.close(1000).await;
    alice.expect_silence(QUIET).await;
    alice.close(1000).await;
    assert_snapshot!("notifications_join_and_talk_in_json", transcript);
}

#[tokio::test]
async fn analytics_connect_in_silence_and_share_events() {
    let server = server().await;
    let transcript = Transcript::default();
    let mut alice = server
        .connect_as("alice", "/ws/analytics", &transcript)
        .await;
    alice.expect_silence(QUIET).await;
    let mut bob = server.connect_as("bob", "/ws/analytics", &transcript).await;
    alice.expect_silence(QUIET).await;

    bob.send_text("page_view:/home").await;
    assert_eq!(alice.recv_text().await, "📊 Analytics: page_view:/home");
    assert_eq!(bob.recv_text().await, "📊 Analytics: page_view:/home");

    bob.close(1000).await;
    alice.expect_silence(QUIET).await;
    alice.close(1000).await;
    assert_snapshot!("analytics_connect_in_silence_and_share_events", transcript);
}

#[tokio::test]
async fn binary_frames_on_text_endpoints_are_answered_to_their_sender_only() {
    let server = server().await;
    let transcript = Transcript::default();
    let cases = [
        (
            "/ws/chat",
            "💬 The chat carries text messages only (got 2 bytes of binary data)",
        ),
        (
            "/ws/reliable",
            "📨 The reliable chat carries text messages only (got 2 bytes of binary data)",
        ),
        (
            "/ws/analytics",
            "📊 Analytics events are text, e.g. page_view:/home (got 2 bytes of binary data)",
        ),
    ];
    for (path, answer) in cases {
        // Both arrive (and the chats announce it).
        let announced = path != "/ws/analytics";
        let mut alice = server.connect_as("alice", path, &transcript).await;
        if announced {
            alice.recv_text().await;
        }
        let mut bob = server.connect_as("bob", path, &transcript).await;
        if announced {
            alice.recv_text().await;
            bob.recv_text().await;
        }
        alice.send_bytes(&[0x00, 0x01]).await;
        assert_eq!(alice.recv_text().await, answer);
        bob.expect_silence(QUIET).await;
        // Still connected, and heard.
        alice.send_text("still here").await;
        let echo = alice.recv_text().await;
        assert!(echo.ends_with(" still here"), "{echo}");
        assert_eq!(bob.recv_text().await, echo);
        drop(bob);
        drop(alice);
    }
    assert_snapshot!(
        "binary_frames_on_text_endpoints_are_answered_to_their_sender_only",
        transcript
    );
}

#[tokio::test]
async fn bad_notifications_get_an_error_and_the_connection_stays_open() {
    let server = server().await;
    let transcript = Transcript::default();
    let mut alice = server
        .connect_as("alice", "/ws/notifications", &transcript)
        .await;
    recv_json(&mut alice).await;
    let mut bob = server
        .connect_as("bob", "/ws/notifications", &transcript)
        .await;
    recv_json(&mut alice).await;
    recv_json(&mut bob).await;

    for bad in [
        "not json",
        "",
        "[1, 2]",
        r#"["an array"]"#,
        r#""just a string""#,
        r#"{"message": 5}"#,
    ] {
        alice.send_text(bad).await;
        let answer = recv_json(&mut alice).await;
        assert_eq!(answer["type"], "error", "{bad}: {answer}");
        assert!(
            answer["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("❌ "))
        );
    }
    alice.send_bytes(&[0x00, 0x01]).await;
    assert_eq!(recv_json(&mut alice).await["type"], "error");
    // Only alice heard about her mistakes.
    bob.expect_silence(QUIET).await;

    alice.send_text(r#"{"message": "still here"}"#).await;
    let still_here = notification("user", "🔔 Notification: still here");
    assert_eq!(recv_json(&mut alice).await, still_here);
    assert_eq!(recv_json(&mut bob).await, still_here);
    assert_snapshot!(
        "bad_notifications_get_an_error_and_the_connection_stays_open",
        transcript
    );
}

#[tokio::test]
async fn each_endpoint_has_a_group_of_its_own() {
    let server = server().await;
    let transcript = Transcript::default();
    let mut chat = server.connect_as("chat", "/ws/chat", &transcript).await;
    chat.recv_text().await;
    let mut reliable = server
        .connect_as("reliable", "/ws/reliable", &transcript)
        .await;
    reliable.recv_text().await;
    let mut notifications = server
        .connect_as("notifications", "/ws/notifications", &transcript)
        .await;
    recv_json(&mut notifications).await;
    let mut analytics = server
        .connect_as("analytics", "/ws/analytics", &transcript)
        .await;

    chat.send_text("one").await;
    assert_eq!(chat.recv_text().await, "💬 one");
    reliable.send_text("two").await;
    assert_eq!(reliable.recv_text().await, "📨 two");
    notifications.send_text(r#"{"message": "three"}"#).await;
    assert_eq!(
        recv_json(&mut notifications).await,
        notification("user", "🔔 Notification: three")
    );
    analytics.send_text("four").await;
    assert_eq!(analytics.recv_text().await, "📊 Analytics: four");
    for client in [&mut chat, &mut reliable, &mut notifications, &mut analytics] {
        client.expect_silence(QUIET).await;
    }
    assert_snapshot!("each_endpoint_has_a_group_of_its_own", transcript);
}
