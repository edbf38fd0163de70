//! The solution to chapter 2's exercise, checked: a server with a fixed
//! list of rooms, where `General` and `general` are one room and a blank
//! line is not passed on. The chapter shows it folded, below its hints; your
//! own solution belongs in `src/room_chat.rs`.
//!
//! The consumer is written here, beside the step's own `RoomChat`, so that
//! the solution is compiled and tested without changing the step.

use std::time::Duration;

use axum::Router;
use axum_channels::layer::{InMemoryLayer, Layers, group_name_for};
use axum_channels::testing::{Received, TestServer};
use axum_channels::{Consumer, Frame, Result, Scope, Socket};
use step_02_room_chat::RoomEvent;

/// The close code for a refused room, as in `RoomChat`.
const INVALID_ROOM_NAME: u16 = 4001;

// ANCHOR: rooms
/// The rooms this server has.
const ROOMS: [&str; 3] = ["general", "random", "help"];
// ANCHOR_END: rooms

/// `RoomChat`, with a list of rooms.
struct ListedRoom {
    room: String,
    group: Option<String>,
}

impl Consumer for ListedRoom {
    type Event = RoomEvent;
    const LAYER: Option<&'static str> = Some("chat");

    fn new(scope: &Scope) -> Self {
        let room = scope.param("room_name").unwrap_or_default().to_owned();
        // ANCHOR: new
        // `General` and `general` are one room: the group is derived from
        // the name in lower case, and only listed rooms have one.
        let key = room.to_lowercase();
        let group = ROOMS
            .contains(&key.as_str())
            .then(|| group_name_for("room", &key));
        // ANCHOR_END: new
        ListedRoom { room, group }
    }

    fn groups(&self) -> Vec<String> {
        self.group.iter().cloned().collect()
    }

    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        socket.accept().await?;
        let Some(group) = &self.group else {
            // ANCHOR: reason
            let reason = "Unknown room: try general, random or help";
            // ANCHOR_END: reason
            return socket.close(INVALID_ROOM_NAME, reason).await;
        };
        let message = format!("🚪 Someone joined room '{}'", self.room);
        socket
            .group_send(group, &RoomEvent::RoomMessage { message })
            .await
    }

    async fn receive(&mut self, socket: &mut Socket, frame: Frame) -> Result<()> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        match frame {
            // ANCHOR: ignore_empty
            Frame::Text(text) if text.trim().is_empty() => Ok(()),
            // ANCHOR_END: ignore_empty
            Frame::Text(text) => {
                let message = format!("💬 {text}");
                socket
                    .group_send(group, &RoomEvent::RoomMessage { message })
                    .await
            }
            Frame::Binary(_) => {
                socket
                    .send_text("💬 This room carries text messages only")
                    .await
            }
        }
    }

    async fn event(&mut self, socket: &mut Socket, event: RoomEvent) -> Result<()> {
        match event {
            RoomEvent::RoomMessage { message } => socket.send_text(message).await,
        }
    }
}

async fn server() -> TestServer {
    let layers = Layers::new().with("chat", InMemoryLayer::default());
    let app = Router::new().route("/ws/room/{room_name}", layers.route::<ListedRoom>());
    TestServer::start(app).await
}

#[tokio::test]
async fn only_the_listed_rooms_open_whatever_their_case() {
    let server = server().await;
    let mut lower = server.connect("/ws/room/general").await;
    assert_eq!(lower.recv_text().await, "🚪 Someone joined room 'general'");
    let mut upper = server.connect("/ws/room/General").await;
    assert_eq!(upper.recv_text().await, "🚪 Someone joined room 'General'");
    assert_eq!(lower.recv_text().await, "🚪 Someone joined room 'General'");

    let mut secret = server.connect("/ws/room/secret").await;
    assert_eq!(
        secret.recv().await,
        Received::Close {
            code: INVALID_ROOM_NAME,
            reason: "Unknown room: try general, random or help".into()
        }
    );
}

#[tokio::test]
async fn a_blank_line_is_not_passed_on() {
    let server = server().await;
    let mut alice = server.connect("/ws/room/help").await;
    assert_eq!(alice.recv_text().await, "🚪 Someone joined room 'help'");
    alice.send_text("   ").await;
    alice.send_text("hello").await;
    assert_eq!(
        alice.recv_text().await,
        "💬 hello",
        "the blank line was dropped"
    );
    alice.expect_silence(Duration::from_millis(100)).await;
}
