//! `/ws/reliable`: a second chat, the same as `/ws/chat` but on the
//! `"queue"` layer.
//!
//! On Redis, `"queue"` is the queue layer: each message waits in Redis until
//! the server holding its receiver takes it (or 15 minutes pass), so a
//! member that is busy for a moment misses nothing. The consumer itself
//! does not know or care; only the alias differs from [`crate::chat`].

use axum_channels::{Consumer, Frame, LayerEvent, Result, Scope, Socket};
use serde::{Deserialize, Serialize};

// ANCHOR: event
/// What travels through the layer to every member:
/// `{"type": "reliable_chat_message", "message": "📨 hi"}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ReliableChatEvent {
    ReliableChatMessage { message: String },
}

impl LayerEvent for ReliableChatEvent {}
// ANCHOR_END: event

/// One member of the reliable chat.
pub struct ReliableChat;

impl ReliableChat {
    /// The group every member joins, and anyone may send to.
    pub const GROUP: &str = "reliable_chat";
}

impl Consumer for ReliableChat {
    // ANCHOR: layer
    type Event = ReliableChatEvent;
    // The one line that makes this chat "reliable".
    const LAYER: Option<&'static str> = Some("queue");
    // ANCHOR_END: layer

    fn new(_scope: &Scope) -> Self {
        ReliableChat
    }

    fn groups(&self) -> Vec<String> {
        vec![ReliableChat::GROUP.to_owned()]
    }

    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        socket.accept().await?;
        let message = "🔒 Reliable chat connection established!".to_owned();
        socket
            .group_send(
                ReliableChat::GROUP,
                &ReliableChatEvent::ReliableChatMessage { message },
            )
            .await
    }

    async fn receive(&mut self, socket: &mut Socket, frame: Frame) -> Result<()> {
        match frame {
            Frame::Text(text) => {
                let message = format!("📨 {text}");
                socket
                    .group_send(
                        ReliableChat::GROUP,
                        &ReliableChatEvent::ReliableChatMessage { message },
                    )
                    .await
            }
            // Only the sender hears about its mistake; the chat does not.
            Frame::Binary(bytes) => {
                let reply = format!(
                    "📨 The reliable chat carries text messages only (got {} bytes of binary data)",
                    bytes.len()
                );
                socket.send_text(reply).await
            }
        }
    }

    async fn event(&mut self, socket: &mut Socket, event: ReliableChatEvent) -> Result<()> {
        match event {
            ReliableChatEvent::ReliableChatMessage { message } => socket.send_text(message).await,
        }
    }

    async fn disconnect(&mut self, socket: &mut Socket, _code: u16) {
        let message = "🚪 Left reliable chat!".to_owned();
        if let Err(err) = socket
            .group_send(
                ReliableChat::GROUP,
                &ReliableChatEvent::ReliableChatMessage { message },
            )
            .await
        {
            tracing::warn!(%err, "could not announce a departure");
        }
    }
}
