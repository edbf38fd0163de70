//! `/ws/system`: the welcome, the echo, and what happens to bad input.

use std::time::Duration;

use axum_channels::testing::{Received, TestServer, Transcript};
use insta::assert_snapshot;

const PATH: &str = "/ws/system";
const WELCOME: &str = "🔧 System: Connection established!";

async fn server() -> TestServer {
    TestServer::start(step_06_presence_history::app()).await
}

/// Connects, checks the welcome, then sends each text and checks its echo.
async fn echo(texts: &[&str]) -> Transcript {
    let server = server().await;
    let transcript = Transcript::default();
    let mut client = server.connect_as("", PATH, &transcript).await;
    assert_eq!(client.recv_text().await, WELCOME);
    for text in texts {
        client.send_text(text).await;
        assert_eq!(client.recv_text().await, format!("🔧 System Echo: {text}"));
    }
    client.close(1000).await;
    transcript
}

#[tokio::test]
async fn welcome() {
    assert_snapshot!("welcome", echo(&[]).await);
}

#[tokio::test]
async fn echo_ascii() {
    assert_snapshot!("echo_ascii", echo(&["hello", "Hello, World!"]).await);
}

#[tokio::test]
async fn echo_unicode() {
    assert_snapshot!(
        "echo_unicode",
        echo(&["héllo wörld", "日本語のテキスト", "🦀 ❤️ 🚀"]).await
    );
}

#[tokio::test]
async fn echo_empty() {
    assert_snapshot!("echo_empty", echo(&[""]).await);
}

#[tokio::test]
async fn echo_60_kib() {
    let text = "a".repeat(60 * 1024);
    assert_snapshot!("echo_60_kib", echo(&[&text]).await);
}

#[tokio::test]
async fn message_over_the_limit_is_refused_with_1009() {
    let server = server().await;
    let transcript = Transcript::default();
    let mut client = server.connect_as("", PATH, &transcript).await;
    client.recv_text().await;
    let at_limit = "b".repeat(64 * 1024);
    client.send_text(&at_limit).await;
    assert_eq!(
        client.recv_text().await,
        format!("🔧 System Echo: {at_limit}")
    );
    client.send_text(&"c".repeat(64 * 1024 + 1)).await;
    let Received::Close { code, .. } = client.recv().await else {
        panic!("expected a close frame:\n{transcript}");
    };
    assert_eq!(code, 1009);
    assert_snapshot!("message_over_the_limit_is_refused_with_1009", transcript);
}

#[tokio::test]
async fn binary_frame_gets_a_clear_reply_and_the_connection_stays_open() {
    let server = server().await;
    let transcript = Transcript::default();
    let mut client = server.connect_as("", PATH, &transcript).await;
    client.recv_text().await;
    client.send_bytes(&[0x00, 0x01]).await;
    let reply = client.recv_text().await;
    assert!(reply.contains("text messages only"), "{reply}");
    client.send_text("still there?").await;
    assert_eq!(client.recv_text().await, "🔧 System Echo: still there?");
    client.close(1000).await;
    assert_snapshot!(
        "binary_frame_gets_a_clear_reply_and_the_connection_stays_open",
        transcript
    );
}

#[tokio::test]
async fn clients_do_not_see_each_others_echoes() {
    let server = server().await;
    let transcript = Transcript::default();
    let mut alice = server.connect_as("alice", PATH, &transcript).await;
    let mut bob = server.connect_as("bob", PATH, &transcript).await;
    alice.recv_text().await;
    bob.recv_text().await;

    alice.send_text("from alice").await;
    bob.send_text("from bob").await;
    assert_eq!(alice.recv_text().await, "🔧 System Echo: from alice");
    assert_eq!(bob.recv_text().await, "🔧 System Echo: from bob");
    // Each echo went to its sender only: nothing else is on the way.
    alice.expect_silence(Duration::from_millis(100)).await;
    bob.expect_silence(Duration::from_millis(100)).await;
    alice.close(1000).await;
    bob.close(1000).await;
    assert_snapshot!("clients_do_not_see_each_others_echoes", transcript);
}

#[tokio::test]
async fn a_plain_http_get_is_not_a_404() {
    // The page probes each endpoint this way to learn whether this step has it.
    let server = server().await;
    let response = server.get(PATH).await;
    assert_ne!(response.status.as_u16(), 404, "{}", response.summary(PATH));
    assert!(
        response.status.is_client_error(),
        "{}",
        response.summary(PATH)
    );
}
