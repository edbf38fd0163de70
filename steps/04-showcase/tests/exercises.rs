//! The solution to chapter 4's second exercise, checked: a chat that tells
//! its client when a message could not be delivered, tried by killing the
//! Redis under it. (The first exercise's solution is `src/analytics.rs`
//! itself, which `tests/showcase.rs` checks.)
//!
//! Without `redis-server` installed, the test says so and passes; with
//! `CI=true` it fails.

use std::time::Duration;

use axum::Router;
use axum_channels::testing::TestServer;
use axum_channels::{Consumer, Frame, Result, Scope, Socket};
use channels_testkit::RedisServer;
use step_04_showcase::{Chat, ChatEvent, setup_redis};

/// `Chat`, telling its client what it could not deliver.
struct TellingChat;

impl Consumer for TellingChat {
    type Event = ChatEvent;
    const LAYER: Option<&'static str> = Some("chat");

    fn new(_scope: &Scope) -> Self {
        TellingChat
    }

    fn groups(&self) -> Vec<String> {
        vec![Chat::GROUP.to_owned()]
    }

    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        socket.accept().await
    }

    // ANCHOR: receive
    async fn receive(&mut self, socket: &mut Socket, frame: Frame) -> Result<()> {
        let Frame::Text(text) = frame else {
            return socket.send_text("💬 Text only, please").await;
        };
        let message = format!("💬 {text}");
        match socket
            .group_send(Chat::GROUP, &ChatEvent::ChatMessage { message })
            .await
        {
            Ok(()) => Ok(()),
            // The connection stays; only this message is lost, and its
            // sender is told.
            Err(err) => socket.send_text(format!("💬 Not delivered: {err}")).await,
        }
    }
    // ANCHOR_END: receive

    async fn event(&mut self, socket: &mut Socket, event: ChatEvent) -> Result<()> {
        match event {
            ChatEvent::ChatMessage { message } => socket.send_text(message).await,
        }
    }
}

#[tokio::test]
async fn the_sender_is_told_when_redis_is_gone() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let layers = setup_redis(&redis.url()).await.expect("the step's layers");
    let app = Router::new().route("/ws/chat", layers.route::<TellingChat>());
    let server = TestServer::start(app).await;
    let mut client = server.connect("/ws/chat").await;
    client.send_text("hello").await;
    assert_eq!(client.recv_text().await, "💬 hello");

    redis.kill().await;
    client.send_text("anyone?").await;
    client.set_timeout(Duration::from_secs(10));
    let reply = client.recv_text().await;
    assert!(reply.starts_with("💬 Not delivered: "), "{reply}");

    // Redis back: the chat works again, on the same connection.
    redis.restart().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        client.send_text("back").await;
        let reply = client.recv_text().await;
        if reply == "💬 back" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {reply}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
