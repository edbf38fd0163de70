//! `/ws/presence/{room_name}?name=alice`: a chat room that knows who is in
//! it and what was said before you came, and gives a client that comes back
//! what it missed.
//!
//! The client speaks JSON. It sends `{"type": "message", "text": "hi"}`;
//! it hears, in this order:
//!
//! 1. `{"type": "presence_state", "version": 3, "members": ["alice", "bob"]}`:
//!    everyone here, on any server, itself included;
//! 2. `{"type": "history", "epoch": "…", "messages": [...]}`: the room's last
//!    messages (with `"recovered": true` or `false` when it asked to
//!    recover, see below);
//! 3. then, live: `{"type": "message", "offset": 7, "epoch": "…", "name":
//!    "alice", "text": "hi"}` and `{"type": "presence_diff", "version": 4,
//!    "joins": ["carol"], "leaves": ["bob"]}`.
//!
//! Every message carries its position (`offset` and `epoch`). A client that
//! reconnects with `&offset=7&epoch=…` gets exactly the messages after 7,
//! whichever server it reaches, and `"recovered": true`; or, when they are
//! no longer kept, `"recovered": false` and the latest ones.

use axum::extract::Query;
use axum::http::Uri;
use axum_channels::layer::group_name_for;
use axum_channels::room::{Cursor, Entry, Position, PresenceDiff, PresenceGuard};
use axum_channels::{Error, InvalidMessage, JsonConsumer, LayerEvent, Result, Scope, Socket};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::rooms::Rooms;

/// The longest room name and nickname, in characters, and the longest
/// message.
const MAX_ROOM_NAME: usize = 64;
const MAX_NAME: usize = 32;
const MAX_TEXT: usize = 1000;

// ANCHOR: close_codes
/// Close codes for a refused connection; the page shows the reason.
const INVALID_ROOM_NAME: u16 = 4001;
const INVALID_NAME: u16 = 4002;
const INVALID_POSITION: u16 = 4003;
// ANCHOR_END: close_codes

// ANCHOR: protocol
/// What the client sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Something to say to the room.
    Message { text: String },
}

/// What travels through the `"chat"` layer to every member of a room: a
/// message with its position, or the presence task's batched diff. The
/// client gets both as they are.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PresenceRoomEvent {
    Message(Entry),
    PresenceDiff(PresenceDiff),
}

impl LayerEvent for PresenceRoomEvent {}
// ANCHOR_END: protocol

/// The query string: `?name=alice`, and to recover, `&offset=7&epoch=…`.
#[derive(Debug, Deserialize)]
struct Join {
    name: Option<String>,
    offset: Option<u64>,
    epoch: Option<String>,
}

// ANCHOR: state
/// One connection to one room.
pub struct PresenceRoom {
    /// The room's group (`None`: the name typed was refused).
    group: Option<String>,
    /// The nickname, or why the connection is refused.
    name: std::result::Result<String, (u16, String)>,
    /// The position the client asked to recover from.
    since: Option<Position>,
    rooms: Option<Rooms>,
    /// Leaves the room's presence when dropped, however the connection ends.
    presence: Option<PresenceGuard>,
    /// The last message this client was sent.
    cursor: Option<Cursor>,
}
// ANCHOR_END: state

/// Names, like room names, are what people type: 1 to `max` characters,
/// no control characters.
fn is_valid(text: &str, max: usize) -> bool {
    let length = text.chars().count();
    (1..=max).contains(&length) && !text.chars().any(char::is_control)
}

// ANCHOR: parse_query
/// Reads `?name=…&offset=…&epoch=…`, or says why it refuses them.
fn parse_query(
    query: Option<&str>,
) -> std::result::Result<(String, Option<Position>), (u16, String)> {
    let uri: Uri = format!("/?{}", query.unwrap_or_default())
        .parse()
        .map_err(|_| (INVALID_POSITION, "The query string is not valid".to_owned()))?;
    let Query(join) = Query::<Join>::try_from_uri(&uri)
        .map_err(|_| (INVALID_POSITION, "offset must be a whole number".to_owned()))?;
    let name = join.name.unwrap_or_default();
    if !is_valid(&name, MAX_NAME) {
        let reason = "Give a name (?name=…) of 1 to 32 characters, without control characters";
        return Err((INVALID_NAME, reason.to_owned()));
    }
    let since = match (join.offset, join.epoch) {
        (None, None) => None,
        (Some(offset), Some(epoch)) if is_valid(&epoch, 64) => Some(Position { offset, epoch }),
        _ => {
            let reason = "To recover, give both offset and epoch of the last message seen";
            return Err((INVALID_POSITION, reason.to_owned()));
        }
    };
    Ok((name, since))
}
// ANCHOR_END: parse_query

/// Why a connection is refused when the app shares no rooms.
fn no_rooms() -> Error {
    Error::Other("no Rooms: add `.layer(Extension(rooms))` to the router".into())
}

impl JsonConsumer for PresenceRoom {
    type Message = ClientMessage;
    type Event = PresenceRoomEvent;
    const LAYER: Option<&'static str> = Some("chat");

    // ANCHOR: new
    fn new(scope: &Scope) -> Self {
        let room = scope.param("room_name").unwrap_or_default().to_owned();
        let group = is_valid(&room, MAX_ROOM_NAME).then(|| group_name_for("presence", &room));
        let (name, since) = match parse_query(scope.query()) {
            Ok((name, since)) => (Ok(name), since),
            Err(refused) => (Err(refused), None),
        };
        PresenceRoom {
            group,
            name,
            since,
            rooms: scope.extension::<Rooms>().cloned(),
            presence: None,
            cursor: None,
        }
    }

    fn groups(&self) -> Vec<String> {
        self.group.iter().cloned().collect()
    }
    // ANCHOR_END: new

    // ANCHOR: connect
    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        let rooms = self.rooms.clone().ok_or_else(no_rooms)?;
        socket.accept().await?;
        let Some(group) = &self.group else {
            let reason = "Room names are 1 to 64 characters, without control characters";
            return socket.close(INVALID_ROOM_NAME, reason).await;
        };
        let name = match &self.name {
            Ok(name) => name,
            Err((code, reason)) => return socket.close(*code, reason).await,
        };
        // Already in the room's group (see `groups`), so nothing said from
        // now on is missed: what the history below already holds, the
        // cursor drops.
        let membership = rooms.presence.join(group, name).await?;
        tracing::debug!(room = %group, %name, "joined");
        self.presence = Some(membership.guard);
        socket
            .send_json(&json!({
                "type": "presence_state",
                "version": membership.version,
                "members": membership.members,
            }))
            .await?;
        let recovery = rooms.history.recover(group, self.since.as_ref()).await?;
        let mut history = json!({
            "type": "history",
            "epoch": recovery.epoch,
            "messages": recovery.entries,
        });
        if self.since.is_some() {
            history["recovered"] = Value::from(recovery.recovered);
        }
        socket.send_json(&history).await?;
        self.cursor = Some(Cursor::after(&recovery));
        Ok(())
    }
    // ANCHOR_END: connect

    // ANCHOR: receive
    async fn receive(&mut self, socket: &mut Socket, message: ClientMessage) -> Result<()> {
        let (Some(group), Ok(name), Some(rooms)) = (&self.group, &self.name, &self.rooms) else {
            return Ok(());
        };
        let ClientMessage::Message { text } = message;
        if text.trim().is_empty() || text.chars().count() > MAX_TEXT {
            let error = "❌ A message is 1 to 1000 characters";
            return socket
                .send_json(&json!({"type": "error", "message": error}))
                .await;
        }
        let mut data = Map::new();
        data.insert("name".into(), Value::from(name.as_str()));
        data.insert("text".into(), Value::from(text));
        // First into the history, which gives it its position, then to
        // everyone in the room, with it.
        let entry = rooms.history.append(group, data).await?;
        socket
            .group_send(group, &PresenceRoomEvent::Message(entry))
            .await
    }
    // ANCHOR_END: receive

    /// This protocol's error frame: `{"type": "error", "message": …}`.
    fn error_frame(&self, problem: &InvalidMessage) -> Value {
        json!({"type": "error", "message": format!("❌ Invalid message: {problem}")})
    }

    // ANCHOR: event
    async fn event(&mut self, socket: &mut Socket, event: PresenceRoomEvent) -> Result<()> {
        let (Some(group), Some(rooms), Some(cursor)) = (&self.group, &self.rooms, &mut self.cursor)
        else {
            return Ok(());
        };
        match event {
            // Once each, in order: a message seen already (in the history
            // sent on join) is dropped, and one that comes after a gap
            // brings the missing ones from the history first.
            PresenceRoomEvent::Message(entry) => {
                for entry in rooms.history.catch_up(group, cursor, entry).await? {
                    socket.send_json(&PresenceRoomEvent::Message(entry)).await?;
                }
                Ok(())
            }
            PresenceRoomEvent::PresenceDiff(diff) => {
                socket
                    .send_json(&PresenceRoomEvent::PresenceDiff(diff))
                    .await
            }
        }
    }
    // ANCHOR_END: event
}
