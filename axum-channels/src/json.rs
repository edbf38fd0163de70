//! [`JsonConsumer`]: a consumer whose client speaks JSON.
//!
//! Many endpoints take JSON messages of one shape, e.g.
//! `{"type": "translate", "content": "hello"}`. A `JsonConsumer` declares
//! that shape as a `serde` type, [`JsonConsumer::Message`], and its
//! [`receive`](JsonConsumer::receive) gets each message already decoded. A
//! frame that cannot be decoded (not JSON, JSON of another shape, or a
//! binary frame) goes to [`invalid_message`](JsonConsumer::invalid_message)
//! instead, whose default sends the client the error frame of
//! [`error_frame`](JsonConsumer::error_frame) and keeps the connection open:
//! one bad message is the client's mistake, not a reason to hang up.
//!
//! Every `JsonConsumer` is a [`Consumer`] (a blanket implementation does the
//! decoding), so it is routed like any other consumer, with
//! [`route`](crate::route) or [`Layers::route`](crate::layer::Layers::route).
//! Replies go out with [`Socket::send_json`].

use std::fmt;
use std::future::Future;

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::consumer::{Consumer, DEFAULT_MAX_MESSAGE_SIZE, Scope, TooFast, close_too_fast};
use crate::error::Result;
use crate::layer::LayerEvent;
use crate::socket::{Frame, Socket};

/// Handles one WebSocket connection whose client sends JSON messages of one
/// shape. The lifecycle is [`Consumer`]'s; only `receive` differs.
pub trait JsonConsumer: Sized + Send + 'static {
    /// The messages the client sends, as a `serde` type.
    type Message: DeserializeOwned + Send;

    /// As [`Consumer::Event`].
    type Event: LayerEvent;

    /// As [`Consumer::MAX_MESSAGE_SIZE`].
    const MAX_MESSAGE_SIZE: usize = DEFAULT_MAX_MESSAGE_SIZE;

    /// As [`Consumer::CLOSE_ON_LAYER_OUTAGE`].
    const CLOSE_ON_LAYER_OUTAGE: bool = false;

    /// As [`Consumer::LAYER`].
    const LAYER: Option<&'static str> = None;

    /// As [`Consumer::new`].
    fn new(scope: &Scope) -> Self;

    /// As [`Consumer::groups`].
    fn groups(&self) -> Vec<String> {
        Vec::new()
    }

    /// As [`Consumer::connect`].
    fn connect(&mut self, socket: &mut Socket) -> impl Future<Output = Result<()>> + Send;

    /// The client sent a message that decoded into `Self::Message`.
    fn receive(
        &mut self,
        socket: &mut Socket,
        message: Self::Message,
    ) -> impl Future<Output = Result<()>> + Send;

    /// The client sent a frame that did not decode. The default answers with
    /// [`error_frame`](JsonConsumer::error_frame) and keeps the connection
    /// open; override it to log, count, or close instead.
    fn invalid_message(
        &mut self,
        socket: &mut Socket,
        problem: InvalidMessage,
    ) -> impl Future<Output = Result<()>> + Send {
        let frame = self.error_frame(&problem);
        async move { socket.send_json(&frame).await }
    }

    /// The error frame [`invalid_message`](JsonConsumer::invalid_message)
    /// sends by default: `{"status": "error", "message": "❌ Invalid
    /// message: …"}`. Override it to speak your protocol's error format.
    fn error_frame(&self, problem: &InvalidMessage) -> Value {
        json!({"status": "error", "message": format!("❌ Invalid message: {problem}")})
    }

    /// As [`Consumer::disconnect`].
    fn disconnect(&mut self, socket: &mut Socket, code: u16) -> impl Future<Output = ()> + Send {
        let _ = (socket, code);
        async {}
    }

    /// As [`Consumer::too_fast`]: by default the connection is closed with
    /// 1008 and a reason that says the limit.
    fn too_fast(
        &mut self,
        socket: &mut Socket,
        too_fast: TooFast,
    ) -> impl Future<Output = Result<()>> + Send {
        close_too_fast(socket, too_fast)
    }

    /// As [`Consumer::event`].
    fn event(
        &mut self,
        socket: &mut Socket,
        event: Self::Event,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = (socket, event);
        async { Ok(()) }
    }
}

/// Why a frame could not be decoded into a [`JsonConsumer::Message`].
///
/// Deliberately exhaustive (not `#[non_exhaustive]`), as serde_json's
/// `Category` is: an app matches it to word its own error frame for each
/// problem, and a new problem should be a compile error there rather than
/// fall silently into a generic arm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidMessage {
    /// A binary frame, where JSON text was expected.
    Binary {
        /// Its length in bytes.
        len: usize,
    },
    /// Text that is not JSON at all.
    NotJson {
        /// What the JSON parser said.
        detail: String,
    },
    /// Valid JSON, but not of the expected shape (a missing field, a
    /// number where text was expected, an array instead of an object...).
    WrongShape {
        /// What `serde` said.
        detail: String,
    },
}

impl InvalidMessage {
    /// Decodes `frame` into `T`, or says why it can't be.
    pub fn decode<T: DeserializeOwned>(frame: &Frame) -> std::result::Result<T, InvalidMessage> {
        let text = match frame {
            Frame::Text(text) => text,
            Frame::Binary(bytes) => return Err(InvalidMessage::Binary { len: bytes.len() }),
        };
        // Parsing into a `Value` first tells "not JSON" from "wrong shape".
        let value: Value = serde_json::from_str(text).map_err(|err| InvalidMessage::NotJson {
            detail: err.to_string(),
        })?;
        serde_json::from_value(value).map_err(|err| InvalidMessage::WrongShape {
            detail: err.to_string(),
        })
    }
}

impl fmt::Display for InvalidMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidMessage::Binary { len } => write!(
                f,
                "expected a JSON text frame, got {len} bytes of binary data"
            ),
            InvalidMessage::NotJson { detail } => write!(f, "not valid JSON ({detail})"),
            InvalidMessage::WrongShape { detail } => f.write_str(detail),
        }
    }
}

/// Every `JsonConsumer` is a `Consumer`: this is where frames are decoded.
impl<C: JsonConsumer> Consumer for C {
    type Event = C::Event;
    const MAX_MESSAGE_SIZE: usize = C::MAX_MESSAGE_SIZE;
    const LAYER: Option<&'static str> = C::LAYER;
    const CLOSE_ON_LAYER_OUTAGE: bool = C::CLOSE_ON_LAYER_OUTAGE;

    fn new(scope: &Scope) -> Self {
        JsonConsumer::new(scope)
    }

    fn groups(&self) -> Vec<String> {
        JsonConsumer::groups(self)
    }

    fn connect(&mut self, socket: &mut Socket) -> impl Future<Output = Result<()>> + Send {
        JsonConsumer::connect(self, socket)
    }

    async fn receive(&mut self, socket: &mut Socket, frame: Frame) -> Result<()> {
        match InvalidMessage::decode(&frame) {
            Ok(message) => JsonConsumer::receive(self, socket, message).await,
            Err(problem) => self.invalid_message(socket, problem).await,
        }
    }

    fn too_fast(
        &mut self,
        socket: &mut Socket,
        too_fast: TooFast,
    ) -> impl Future<Output = Result<()>> + Send {
        JsonConsumer::too_fast(self, socket, too_fast)
    }

    fn disconnect(&mut self, socket: &mut Socket, code: u16) -> impl Future<Output = ()> + Send {
        JsonConsumer::disconnect(self, socket, code)
    }

    fn event(
        &mut self,
        socket: &mut Socket,
        event: Self::Event,
    ) -> impl Future<Output = Result<()>> + Send {
        JsonConsumer::event(self, socket, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Job {
        content: String,
    }

    #[test]
    fn decoding_tells_the_problems_apart() {
        let decode = |frame: Frame| InvalidMessage::decode::<Job>(&frame);
        assert_eq!(
            decode(Frame::Text(r#"{"content": "hi"}"#.into())),
            Ok(Job {
                content: "hi".into()
            })
        );
        assert!(matches!(
            decode(Frame::Text("not json".into())),
            Err(InvalidMessage::NotJson { .. })
        ));
        assert!(matches!(
            decode(Frame::Text(String::new())),
            Err(InvalidMessage::NotJson { .. })
        ));
        assert!(matches!(
            decode(Frame::Text("[1, 2]".into())),
            Err(InvalidMessage::WrongShape { .. })
        ));
        assert!(matches!(
            decode(Frame::Text(r#"{"content": 5}"#.into())),
            Err(InvalidMessage::WrongShape { .. })
        ));
        assert_eq!(
            decode(Frame::Binary(vec![0, 1].into())),
            Err(InvalidMessage::Binary { len: 2 })
        );
    }
}
