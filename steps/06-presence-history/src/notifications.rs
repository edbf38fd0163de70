//! `/ws/notifications`: notifications for everybody, in JSON, on the
//! `"notifications"` layer.
//!
//! The client sends `{"message": "deploy done"}`; every member of the group
//! `notifications` gets `{"type": "user", "message": "🔔 Notification:
//! deploy done"}`. A program outside the server can send notifications of
//! its own types (`system`, `broadcast`, ...) to the same group. Joining is
//! announced; leaving is not. On Redis, `"notifications"` is a pub/sub layer
//! of its own, with the prefix `notify`.

use axum_channels::{InvalidMessage, JsonConsumer, LayerEvent, Result, Scope, Socket};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What a notification looks like, for the error messages.
const EXAMPLE: &str = r#"{"message": "hi"}"#;

// ANCHOR: notification
/// A notification as the client shows it: `{"type": "system", "message":
/// "🔔 Connected to notifications!"}`. `type` says who sent it: `system`,
/// `user`, `broadcast`, ... (`error` for an error about this client's own
/// frame).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}

impl Notification {
    pub fn new(kind: &str, message: impl Into<String>) -> Notification {
        Notification {
            kind: kind.to_owned(),
            message: message.into(),
        }
    }
}
// ANCHOR_END: notification

// ANCHOR: event
/// What travels through the layer: the notification as `data`,
/// `{"type": "notification_message", "data": {"type": "user", "message":
/// "..."}}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NotificationEvent {
    NotificationMessage { data: Notification },
}

impl LayerEvent for NotificationEvent {}
// ANCHOR_END: event

// ANCHOR: request
/// What the client sends: a JSON object whose `"message"`, if it has one,
/// is text. Other fields are ignored; without a message, the notification
/// says "No message", as in the original.
///
/// Decoded from a JSON object (`Map`) first: a derived struct alone would
/// also accept an array of its fields, so that `["hi"]` or `[]` would pass
/// for a notification.
#[derive(Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Map<String, Value>")]
pub struct NotificationRequest {
    pub message: Option<String>,
}

impl TryFrom<Map<String, Value>> for NotificationRequest {
    type Error = String;

    fn try_from(mut fields: Map<String, Value>) -> Result<NotificationRequest, String> {
        let message = match fields.remove("message") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(text),
            Some(_) => return Err("\"message\" must be text".to_owned()),
        };
        Ok(NotificationRequest { message })
    }
}
// ANCHOR_END: request

// ANCHOR: consumer
/// One receiver of notifications.
pub struct Notifications;

impl Notifications {
    /// The group every receiver joins, and anyone may send to.
    pub const GROUP: &str = "notifications";

    /// Sends `notification` to every member of the group.
    async fn notify(socket: &mut Socket, notification: Notification) -> Result<()> {
        let event = NotificationEvent::NotificationMessage { data: notification };
        socket.group_send(Notifications::GROUP, &event).await
    }
}
// ANCHOR_END: consumer

impl JsonConsumer for Notifications {
    // ANCHOR: types
    type Message = NotificationRequest;
    type Event = NotificationEvent;
    const LAYER: Option<&'static str> = Some("notifications");
    // ANCHOR_END: types

    fn new(_scope: &Scope) -> Self {
        Notifications
    }

    fn groups(&self) -> Vec<String> {
        vec![Notifications::GROUP.to_owned()]
    }

    // ANCHOR: connect
    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        socket.accept().await?;
        let hello = Notification::new("system", "🔔 Connected to notifications!");
        Notifications::notify(socket, hello).await
    }
    // ANCHOR_END: connect

    // ANCHOR: receive
    async fn receive(&mut self, socket: &mut Socket, request: NotificationRequest) -> Result<()> {
        let text = request.message.as_deref().unwrap_or("No message");
        let notification = Notification::new("user", format!("🔔 Notification: {text}"));
        Notifications::notify(socket, notification).await
    }
    // ANCHOR_END: receive

    // ANCHOR: event_handler
    async fn event(&mut self, socket: &mut Socket, event: NotificationEvent) -> Result<()> {
        match event {
            // The client gets the notification itself, without the wrapper.
            NotificationEvent::NotificationMessage { data } => socket.send_json(&data).await,
        }
    }
    // ANCHOR_END: event_handler

    // ANCHOR: invalid_message
    /// A frame that is not a notification gets an error notification, to
    /// its sender only, and the connection stays open.
    async fn invalid_message(
        &mut self,
        socket: &mut Socket,
        problem: InvalidMessage,
    ) -> Result<()> {
        let why = match problem {
            InvalidMessage::Binary { .. } => {
                format!("Binary frames are not notifications: send JSON text, e.g. {EXAMPLE}")
            }
            InvalidMessage::NotJson { detail } => {
                format!("Not JSON ({detail}): send e.g. {EXAMPLE}")
            }
            InvalidMessage::WrongShape { .. } => {
                format!("Send a JSON object with a text \"message\", e.g. {EXAMPLE}")
            }
        };
        socket
            .send_json(&Notification::new("error", format!("❌ {why}")))
            .await
    }
    // ANCHOR_END: invalid_message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_the_originals_shape() {
        let event = NotificationEvent::NotificationMessage {
            data: Notification::new("system", "🔔 hi"),
        };
        assert_eq!(
            serde_json::to_string(&event).unwrap(),
            r#"{"type":"notification_message","data":{"type":"system","message":"🔔 hi"}}"#
        );
    }

    #[test]
    fn a_request_needs_only_to_be_an_object() {
        let parse = |json| serde_json::from_str::<NotificationRequest>(json);
        assert_eq!(
            parse(r#"{"message": "hi"}"#).unwrap().message.as_deref(),
            Some("hi")
        );
        assert_eq!(parse(r#"{"foo": 1}"#).unwrap().message, None);
        assert_eq!(parse(r#"{"message": null}"#).unwrap().message, None);
        assert!(parse(r#"{"message": 5}"#).is_err());
        // Only objects: serde would read a derived struct from an array too.
        for not_an_object in ["[1, 2]", "[]", r#"["hi"]"#, r#""hi""#, "5"] {
            assert!(parse(not_an_object).is_err(), "{not_an_object}");
        }
    }
}
