//! `/ws/chat`: one chat for everybody, on the `"chat"` layer.
//!
//! Each connection joins the group `chat_room`; whatever one client says is
//! sent to the group, and every member, the sender included, shows it.
//! Joining and leaving are announced. On Redis, `"chat"` is the pub/sub
//! layer: fast, and a message reaches whoever is connected at that moment.

use axum_channels::{Consumer, Frame, LayerEvent, Result, Scope, Socket};
use serde::{Deserialize, Serialize};

// ANCHOR: event
/// What travels through the layer to every member of the chat:
/// `{"type": "chat_message", "message": "💬 hi"}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChatEvent {
    ChatMessage { message: String },
}

impl LayerEvent for ChatEvent {}
// ANCHOR_END: event

// ANCHOR: consumer
/// One member of the chat.
pub struct Chat;

impl Chat {
    /// The group every member joins, and anyone may send to.
    pub const GROUP: &str = "chat_room";
}

// ANCHOR_END: consumer

impl Consumer for Chat {
    // ANCHOR: layer
    type Event = ChatEvent;
    const LAYER: Option<&'static str> = Some("chat");

    fn new(_scope: &Scope) -> Self {
        Chat
    }

    fn groups(&self) -> Vec<String> {
        vec![Chat::GROUP.to_owned()]
    }
    // ANCHOR_END: layer

    // ANCHOR: connect
    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        socket.accept().await?;
        let message = "📢 Someone joined the chat".to_owned();
        socket
            .group_send(Chat::GROUP, &ChatEvent::ChatMessage { message })
            .await
    }
    // ANCHOR_END: connect

    // ANCHOR: receive
    async fn receive(&mut self, socket: &mut Socket, frame: Frame) -> Result<()> {
        match frame {
            Frame::Text(text) => {
                let message = format!("💬 {text}");
                socket
                    .group_send(Chat::GROUP, &ChatEvent::ChatMessage { message })
                    .await
            }
            // Only the sender hears about its mistake; the chat does not.
            Frame::Binary(bytes) => {
                let reply = format!(
                    "💬 The chat carries text messages only (got {} bytes of binary data)",
                    bytes.len()
                );
                socket.send_text(reply).await
            }
        }
    }
    // ANCHOR_END: receive

    // ANCHOR: event_handler
    async fn event(&mut self, socket: &mut Socket, event: ChatEvent) -> Result<()> {
        match event {
            ChatEvent::ChatMessage { message } => socket.send_text(message).await,
        }
    }
    // ANCHOR_END: event_handler

    // ANCHOR: disconnect
    async fn disconnect(&mut self, socket: &mut Socket, _code: u16) {
        let message = "❌ Someone left the chat.".to_owned();
        if let Err(err) = socket
            .group_send(Chat::GROUP, &ChatEvent::ChatMessage { message })
            .await
        {
            tracing::warn!(%err, "could not announce a departure");
        }
    }
    // ANCHOR_END: disconnect
}
