//! `/ws/room/{room_name}`: a chat room for every name, through the `"chat"`
//! channel layer.
//!
//! Each connection joins the group of its room. Everything said in the room
//! is sent to that group, and the layer delivers it to every member,
//! the sender included, so everyone sees the same conversation in the same
//! order.

use axum_channels::layer::group_name_for;
use axum_channels::{Consumer, Frame, LayerEvent, Result, Scope, Socket};
use serde::{Deserialize, Serialize};

/// The longest room name, in characters.
const MAX_ROOM_NAME: usize = 64;

/// The close code for a refused room name. Codes 4000 to 4999 are the
/// application's own; the page shows the reason that comes with it.
const INVALID_ROOM_NAME: u16 = 4001;

// ANCHOR: event
/// What travels through the layer to every member of a room. On the wire:
/// `{"type": "room_message", "message": "💬 hi"}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RoomEvent {
    /// A line for every member to show.
    RoomMessage { message: String },
}

/// Marks `RoomEvent` as something that may travel through a channel layer.
impl LayerEvent for RoomEvent {}
// ANCHOR_END: event

// ANCHOR: state
/// One member of one room.
pub struct RoomChat {
    /// The room's name as the user typed it, e.g. `team alpha`.
    room: String,
    /// The room's group in the layer, or `None` if the name is refused.
    group: Option<String>,
}
// ANCHOR_END: state

// ANCHOR: room_name
/// Room names are what people type: any text of 1 to 64 characters, as
/// long as it has no control characters (newlines, tabs, ...).
fn is_valid_room_name(room: &str) -> bool {
    let length = room.chars().count();
    (1..=MAX_ROOM_NAME).contains(&length) && !room.chars().any(char::is_control)
}
// ANCHOR_END: room_name

impl Consumer for RoomChat {
    // ANCHOR: layer
    type Event = RoomEvent;
    const LAYER: Option<&'static str> = Some("chat");
    // ANCHOR_END: layer

    // ANCHOR: new
    fn new(scope: &Scope) -> Self {
        let room = scope.param("room_name").unwrap_or_default().to_owned();
        // Group names allow only ASCII letters, digits, '-', '_' and '.', so
        // the group is derived from the room name: `café` → `room_caf_c3_a9`.
        let group = is_valid_room_name(&room).then(|| group_name_for("room", &room));
        RoomChat { room, group }
    }

    fn groups(&self) -> Vec<String> {
        self.group.iter().cloned().collect()
    }
    // ANCHOR_END: new

    // ANCHOR: connect
    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        socket.accept().await?;
        let Some(group) = &self.group else {
            let reason = "Room names are 1 to 64 characters, without control characters";
            return socket.close(INVALID_ROOM_NAME, reason).await;
        };
        let message = format!("🚪 Someone joined room '{}'", self.room);
        socket
            .group_send(group, &RoomEvent::RoomMessage { message })
            .await
    }
    // ANCHOR_END: connect

    // ANCHOR: receive
    async fn receive(&mut self, socket: &mut Socket, frame: Frame) -> Result<()> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        match frame {
            Frame::Text(text) => {
                let message = format!("💬 {text}");
                socket
                    .group_send(group, &RoomEvent::RoomMessage { message })
                    .await
            }
            // Only the sender hears about its mistake; the room does not.
            Frame::Binary(_) => {
                socket
                    .send_text("💬 This room carries text messages only")
                    .await
            }
        }
    }
    // ANCHOR_END: receive

    // ANCHOR: event_handler
    async fn event(&mut self, socket: &mut Socket, event: RoomEvent) -> Result<()> {
        match event {
            RoomEvent::RoomMessage { message } => socket.send_text(message).await,
        }
    }
    // ANCHOR_END: event_handler

    // ANCHOR: disconnect
    async fn disconnect(&mut self, socket: &mut Socket, _code: u16) {
        let Some(group) = &self.group else {
            return;
        };
        let message = format!("👋 Someone left room '{}'", self.room);
        if let Err(err) = socket
            .group_send(group, &RoomEvent::RoomMessage { message })
            .await
        {
            tracing::warn!(room = self.room, %err, "could not announce a departure");
        }
    }
    // ANCHOR_END: disconnect
}
