//! `/ws/system`: greets each client, then echoes what it says.
//!
//! The simplest consumer there is: one client, one server, no channel layer.
//! Every connection gets its own `SystemChat` value, so nothing said on one
//! connection reaches another.

use axum_channels::{Consumer, Frame, NoEvents, Result, Scope, Socket};

// ANCHOR: consumer
/// Echoes text messages back to the client that sent them.
pub struct SystemChat;

impl Consumer for SystemChat {
    /// This consumer hears only its own client, never a channel layer.
    type Event = NoEvents;

    // ANCHOR: new
    fn new(_scope: &Scope) -> Self {
        SystemChat
    }
    // ANCHOR_END: new

    // ANCHOR: connect
    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        socket.accept().await?;
        socket.send_text("🔧 System: Connection established!").await
    }
    // ANCHOR_END: connect

    // ANCHOR: receive
    async fn receive(&mut self, socket: &mut Socket, frame: Frame) -> Result<()> {
        match frame {
            Frame::Text(text) => socket.send_text(format!("🔧 System Echo: {text}")).await,
            Frame::Binary(bytes) => {
                let reply = format!(
                    "🔧 System: this endpoint handles text messages only (got {} bytes of binary data)",
                    bytes.len()
                );
                socket.send_text(reply).await
            }
        }
    }
    // ANCHOR_END: receive

    // ANCHOR: disconnect
    async fn disconnect(&mut self, _socket: &mut Socket, code: u16) {
        tracing::info!(code, "system chat client disconnected");
    }
    // ANCHOR_END: disconnect
}
// ANCHOR_END: consumer
