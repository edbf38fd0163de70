//! `/ws/room/{room_name}`: joining, chatting and leaving, rooms kept apart,
//! and names the server refuses.

use std::time::Duration;

use axum_channels::testing::{Received, TestServer, Transcript};
use insta::assert_snapshot;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

/// Long enough for a stray message to show up, short enough to keep the
/// suite quick.
const QUIET: Duration = Duration::from_millis(100);

async fn server() -> TestServer {
    TestServer::start(step_06_presence_history::app()).await
}

/// The path of a room, percent-encoded as a browser would send it.
fn room(name: &str) -> String {
    format!("/ws/room/{}", utf8_percent_encode(name, NON_ALPHANUMERIC))
}

#[tokio::test]
async fn two_clients_in_one_room() {
    let server = server().await;
    let transcript = Transcript::default();
    let mut alice = server
        .connect_as("alice", &room("general"), &transcript)
        .await;
    // Subscribed before announcing: the first member hears its own join.
    assert_eq!(alice.recv_text().await, "🚪 Someone joined room 'general'");
    let mut bob = server
        .connect_as("bob", &room("general"), &transcript)
        .await;
    assert_eq!(alice.recv_text().await, "🚪 Someone joined room 'general'");
    assert_eq!(bob.recv_text().await, "🚪 Someone joined room 'general'");

    alice.send_text("hi").await;
    assert_eq!(alice.recv_text().await, "💬 hi");
    assert_eq!(bob.recv_text().await, "💬 hi");
    bob.send_text("yo").await;
    assert_eq!(alice.recv_text().await, "💬 yo");
    assert_eq!(bob.recv_text().await, "💬 yo");

    alice.close(1000).await;
    assert_eq!(bob.recv_text().await, "👋 Someone left room 'general'");
    bob.close(1000).await;
    assert_snapshot!("two_clients_in_one_room", transcript);
}

#[tokio::test]
async fn three_clients_in_one_room() {
    let server = server().await;
    let transcript = Transcript::default();
    let mut alice = server
        .connect_as("alice", &room("general"), &transcript)
        .await;
    alice.recv_text().await;
    let mut bob = server
        .connect_as("bob", &room("general"), &transcript)
        .await;
    alice.recv_text().await;
    bob.recv_text().await;
    let mut carol = server
        .connect_as("carol", &room("general"), &transcript)
        .await;
    for client in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(client.recv_text().await, "🚪 Someone joined room 'general'");
    }

    carol.send_text("hello, both of you").await;
    for client in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(client.recv_text().await, "💬 hello, both of you");
    }

    bob.close(1000).await;
    assert_eq!(alice.recv_text().await, "👋 Someone left room 'general'");
    assert_eq!(carol.recv_text().await, "👋 Someone left room 'general'");
    alice.close(1000).await;
    assert_eq!(carol.recv_text().await, "👋 Someone left room 'general'");
    carol.close(1000).await;
    assert_snapshot!("three_clients_in_one_room", transcript);
}

#[tokio::test]
async fn rooms_are_isolated() {
    let server = server().await;
    let transcript = Transcript::default();
    // `a b` and `a_b` look alike but are different rooms with different groups.
    let mut spaced = server
        .connect_as("a-space-b", &room("a b"), &transcript)
        .await;
    assert_eq!(spaced.recv_text().await, "🚪 Someone joined room 'a b'");
    let mut underscored = server
        .connect_as("a-underscore-b", &room("a_b"), &transcript)
        .await;
    assert_eq!(
        underscored.recv_text().await,
        "🚪 Someone joined room 'a_b'"
    );
    let mut general = server
        .connect_as("general", &room("general"), &transcript)
        .await;
    assert_eq!(
        general.recv_text().await,
        "🚪 Someone joined room 'general'"
    );

    spaced.send_text("only for a b").await;
    assert_eq!(spaced.recv_text().await, "💬 only for a b");
    underscored.send_text("only for a_b").await;
    assert_eq!(underscored.recv_text().await, "💬 only for a_b");

    spaced.expect_silence(QUIET).await;
    underscored.expect_silence(QUIET).await;
    general.expect_silence(QUIET).await;
    assert_snapshot!("rooms_are_isolated", transcript);
}

#[tokio::test]
async fn unicode_room_name() {
    let server = server().await;
    let transcript = Transcript::default();
    let mut guest = server
        .connect_as("guest", &room("café ☕ team"), &transcript)
        .await;
    assert_eq!(
        guest.recv_text().await,
        "🚪 Someone joined room 'café ☕ team'"
    );
    guest.send_text("un café ?").await;
    assert_eq!(guest.recv_text().await, "💬 un café ?");
    guest.close(1000).await;
    assert_snapshot!("unicode_room_name", transcript);
}

#[tokio::test]
async fn refused_room_names() {
    let server = server().await;
    let transcript = Transcript::default();
    let too_long = "x".repeat(65);
    for name in [too_long.as_str(), "bell\u{7}", "two\nlines"] {
        let mut client = server.connect_as("guest", &room(name), &transcript).await;
        assert_eq!(
            client.recv().await,
            Received::Close {
                code: 4001,
                reason: "Room names are 1 to 64 characters, without control characters".into(),
            }
        );
    }
    // The longest allowed name is fine.
    let mut client = server
        .connect_as("guest", &room(&"x".repeat(64)), &transcript)
        .await;
    let joined = client.recv_text().await;
    assert!(
        joined.starts_with("🚪 Someone joined room 'xxxx"),
        "{joined}"
    );
    assert_snapshot!("refused_room_names", transcript);
}

#[tokio::test]
async fn a_vanished_client_leaves_the_room() {
    let server = server().await;
    let transcript = Transcript::default();
    let mut alice = server
        .connect_as("alice", &room("general"), &transcript)
        .await;
    alice.recv_text().await;
    let mut bob = server
        .connect_as("bob", &room("general"), &transcript)
        .await;
    alice.recv_text().await;
    bob.recv_text().await;

    bob.drop_connection();
    assert_eq!(alice.recv_text().await, "👋 Someone left room 'general'");
    alice.send_text("anyone?").await;
    assert_eq!(alice.recv_text().await, "💬 anyone?");
    alice.expect_silence(QUIET).await;
    assert_snapshot!("a_vanished_client_leaves_the_room", transcript);
}

#[tokio::test]
async fn binary_frames_are_not_broadcast() {
    let server = server().await;
    let transcript = Transcript::default();
    let mut alice = server
        .connect_as("alice", &room("general"), &transcript)
        .await;
    alice.recv_text().await;
    let mut bob = server
        .connect_as("bob", &room("general"), &transcript)
        .await;
    alice.recv_text().await;
    bob.recv_text().await;

    alice.send_bytes(&[0x00, 0x01]).await;
    assert_eq!(
        alice.recv_text().await,
        "💬 This room carries text messages only"
    );
    bob.expect_silence(QUIET).await;
    assert_snapshot!("binary_frames_are_not_broadcast", transcript);
}
