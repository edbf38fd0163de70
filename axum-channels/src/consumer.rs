//! The [`Consumer`] trait, and the glue that runs one consumer per connection.
//!
//! [`consumer::<C>()`](consumer()) gives you an axum route. For every
//! WebSocket request on it, the runner:
//!
//! 1. builds a fresh `C` from the request's [`Scope`] (its path and
//!    parameters);
//! 2. calls [`Consumer::connect`] *before* answering the handshake, so the
//!    consumer can refuse with an HTTP 403 if it never accepts;
//! 3. completes the handshake and delivers what `connect` sent;
//! 4. calls [`Consumer::receive`] for each text or binary message, one at a
//!    time, in order;
//! 5. calls [`Consumer::disconnect`] exactly once with the close code, also
//!    when the client vanished without a close frame (code 1006).
//!
//! Bad input ends only the connection that sent it, and always with a close
//! frame that says why: a message over [`Consumer::MAX_MESSAGE_SIZE`] gets
//! 1009, a text frame that is not UTF-8 gets 1007, and an error returned by
//! the consumer (or a panic in it) gets 1011 and one log line.

use std::any::type_name;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::RawPathParams;
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use futures_util::FutureExt;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio_tungstenite::tungstenite;

use crate::close_code;
use crate::error::{Error, Result};
use crate::layer::{self, ChannelLayer, LayerError};
use crate::socket::{Handshake, Inbox, Socket};

/// The largest message a consumer accepts unless it says otherwise: 64 KiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 * 1024;

/// How long to wait for the client to answer our close frame before giving up
/// on a polite goodbye and dropping the connection.
const CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Handles one WebSocket connection: one value per connected client.
///
/// Implement the lifecycle methods with `async fn`; the runner calls them in
/// order and never concurrently, so `&mut self` is all the state you need.
pub trait Consumer: Sized + Send + 'static {
    /// Messages this consumer takes from a channel layer, as a `serde` enum
    /// tagged by `"type"`. A consumer that uses no layer says [`NoEvents`].
    type Event: DeserializeOwned + Send + 'static;

    /// The largest text or binary message accepted, in bytes. A larger one
    /// closes the connection with code 1009 and a reason that says the limit.
    const MAX_MESSAGE_SIZE: usize = DEFAULT_MAX_MESSAGE_SIZE;

    /// The alias of the channel layer this consumer uses, if any (see
    /// [`Layers`](crate::layer::Layers)). With a layer, each connection gets
    /// a channel of its own, and [`event`](Consumer::event) receives what
    /// arrives on it.
    const LAYER: Option<&'static str> = None;

    /// Builds the consumer for one connection from its request.
    fn new(scope: &Scope) -> Self;

    /// Groups to join before [`connect`](Consumer::connect) and to leave
    /// after [`disconnect`](Consumer::disconnect). Joining first means the
    /// consumer hears everything said in its groups from the very start,
    /// including its own announcement.
    fn groups(&self) -> Vec<String> {
        Vec::new()
    }

    /// The client asks to connect. Call [`Socket::accept`] to let it in, or
    /// [`Socket::close`] (or simply return without accepting) to refuse it.
    fn connect(&mut self, socket: &mut Socket) -> impl Future<Output = Result<()>> + Send;

    /// The client sent a message.
    fn receive(
        &mut self,
        socket: &mut Socket,
        frame: Frame,
    ) -> impl Future<Output = Result<()>> + Send;

    /// The connection is over; `code` is the close code the client sent, the
    /// one we sent if we closed first, or 1006 if the client just vanished.
    /// Sending is no longer possible; this is the place to clean up.
    fn disconnect(&mut self, socket: &mut Socket, code: u16) -> impl Future<Output = ()> + Send {
        let _ = (socket, code);
        async {}
    }

    /// A message arrived from the channel layer, decoded by its `"type"`.
    /// A message that does not decode into `Self::Event` is logged and
    /// dropped; the connection carries on.
    fn event(
        &mut self,
        socket: &mut Socket,
        event: Self::Event,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = (socket, event);
        async { Ok(()) }
    }
}

/// The event type of a consumer that takes no messages from a channel layer.
///
/// It has no values, so no message can ever be decoded into it.
#[derive(Debug, serde::Deserialize)]
pub enum NoEvents {}

/// A message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A text frame (always valid UTF-8: the runner checks).
    Text(String),
    /// A binary frame.
    Binary(Bytes),
}

/// What a consumer knows about the request that opened its connection.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    path: String,
    query: Option<String>,
    params: Vec<(String, String)>,
}

impl Scope {
    /// A scope for `path` with no parameters; handy in tests.
    pub fn new(path: impl Into<String>) -> Self {
        Scope {
            path: path.into(),
            ..Scope::default()
        }
    }

    /// Adds a path parameter, as the router would.
    pub fn with_param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.push((name.into(), value.into()));
        self
    }

    /// The request path, e.g. `/ws/room/general`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The query string without its `?`, if there was one.
    pub fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }

    /// A path parameter by name, percent-decoded: for the route
    /// `/ws/room/{room_name}`, `param("room_name")` of `/ws/room/caf%C3%A9` is
    /// `"café"`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// A route that runs consumer `C` for every WebSocket connection on it, as in
/// `Router::new().route("/ws/system", consumer::<SystemChat>())` (the crate
/// documentation has a complete example).
///
/// The route is for a `Router` without state; a router with state can mount
/// it with `Router::route_service`.
///
/// # Panics
///
/// If `C` uses a channel layer: route it with
/// [`Layers::consumer`](crate::layer::Layers::consumer) instead, which knows
/// the app's layers.
///
/// # Panics
///
/// If `C` uses a channel layer: route it with
/// [`Layers::consumer`](crate::layer::Layers::consumer) instead, which knows
/// the app's layers.
pub fn consumer<C: Consumer>() -> MethodRouter {
    if let Some(alias) = C::LAYER {
        panic!(
            "{} uses the channel layer {alias:?}: route it with `layers.consumer::<{}>()`",
            type_name::<C>(),
            short_type_name::<C>()
        );
    }
    route_with_layer::<C>(None)
}

pub(crate) fn route_with_layer<C: Consumer>(layer: Option<Arc<dyn ChannelLayer>>) -> MethodRouter {
    get(
        move |upgrade: WebSocketUpgrade,
              params: Result<RawPathParams, RawPathParamsRejection>,
              uri: Uri| handshake::<C>(upgrade, params, uri, layer.clone()),
    )
}

fn short_type_name<C>() -> &'static str {
    let name = type_name::<C>();
    name.rsplit("::").next().unwrap_or(name)
}

async fn handshake<C: Consumer>(
    upgrade: WebSocketUpgrade,
    params: Result<RawPathParams, RawPathParamsRejection>,
    uri: Uri,
    layer: Option<Arc<dyn ChannelLayer>>,
) -> Response {
    let params = match params {
        Ok(params) => params
            .iter()
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect(),
        Err(RawPathParamsRejection::MissingPathParams(_)) => Vec::new(),
        Err(rejection) => return rejection.into_response(),
    };
    let scope = Scope {
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        params,
    };

    let mut consumer = C::new(&scope);
    let mut socket = Socket::connecting();
    let groups = consumer.groups();
    if let Some(layer) = layer {
        // Subscribed before `connect`, so nothing sent to the groups from
        // now on (such as our own "joined" announcement) is missed.
        if let Err(err) = socket.attach(layer, &groups).await {
            tracing::warn!(path = scope.path(), %err, "cannot join the channel layer; refusing");
            socket.detach(&groups).await;
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    }
    let connected = contained(consumer.connect(&mut socket)).await;
    let refusal = match (connected, socket.handshake()) {
        (Ok(()), Handshake::Accepted) => {
            return upgrade
                .max_message_size(C::MAX_MESSAGE_SIZE)
                .max_frame_size(C::MAX_MESSAGE_SIZE)
                .on_upgrade(move |ws| run(consumer, socket, groups, ws));
        }
        (Err(err), _) => {
            tracing::warn!(path = scope.path(), %err, "connect failed; refusing the handshake");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        (Ok(()), Handshake::Refused(reason)) => {
            tracing::debug!(
                path = scope.path(),
                reason,
                "connection refused before accept"
            );
            (StatusCode::FORBIDDEN, reason).into_response()
        }
        (Ok(()), Handshake::Undecided) => {
            tracing::debug!(path = scope.path(), "connect did not accept; refusing");
            StatusCode::FORBIDDEN.into_response()
        }
    };
    socket.detach(&groups).await;
    refusal
}

/// Drives one accepted connection from the handshake to `disconnect`.
async fn run<C: Consumer>(mut consumer: C, mut socket: Socket, groups: Vec<String>, ws: WebSocket) {
    socket.open(ws).await;
    let code = serve(&mut consumer, &mut socket).await;
    let disconnected = async {
        consumer.disconnect(&mut socket, code).await;
        Ok(())
    };
    if let Err(err) = contained(disconnected).await {
        tracing::warn!(%err, "disconnect failed");
    }
    socket.detach(&groups).await;
}

/// What woke the runner up.
enum Input {
    Client(Option<Result<Message, axum::Error>>),
    Layer(Result<layer::Message, LayerError>),
}

/// Waits for the client and, if the consumer has a channel, the layer, at
/// once: whichever speaks first is handled first. Nothing polls.
async fn next_input(socket: &mut Socket, inbox: Option<&Inbox>) -> Input {
    if socket.is_closing() {
        // We said goodbye: only the client's answer matters now, and a client
        // that does not answer in time is treated as gone.
        let reply = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, socket.recv()).await;
        return Input::Client(reply.ok().flatten());
    }
    // ANCHOR: select
    match inbox {
        Some(inbox) => tokio::select! {
            next = socket.recv() => Input::Client(next),
            message = inbox.layer.receive(&inbox.channel) => Input::Layer(message),
        },
        None => Input::Client(socket.recv().await),
    }
    // ANCHOR_END: select
}

/// Serves the connection until it ends; returns the close code.
async fn serve<C: Consumer>(consumer: &mut C, socket: &mut Socket) -> u16 {
    let mut peer_code = None;
    let mut inbox = socket.inbox();
    loop {
        let next = match next_input(socket, inbox.as_ref()).await {
            Input::Client(next) => next,
            Input::Layer(Ok(message)) => {
                let outcome = match serde_json::from_value::<C::Event>(Value::Object(message)) {
                    Ok(event) => contained(consumer.event(socket, event)).await,
                    Err(err) => {
                        tracing::warn!(
                            consumer = type_name::<C>(),
                            %err,
                            "dropped a layer message this consumer cannot handle"
                        );
                        Ok(())
                    }
                };
                handle_outcome(socket, outcome).await;
                continue;
            }
            Input::Layer(Err(err)) => {
                // The client can still be served; it just hears no more from
                // the layer.
                tracing::warn!(%err, "stopped receiving from the channel layer");
                inbox = None;
                continue;
            }
        };
        let message = match next {
            Some(Ok(message)) => message,
            Some(Err(err)) => return fail(socket, err, C::MAX_MESSAGE_SIZE).await,
            None => {
                return peer_code
                    .or(socket.sent_close_code())
                    .unwrap_or(close_code::ABNORMAL);
            }
        };
        let frame = match message {
            Message::Text(text) => Frame::Text(text.as_str().to_owned()),
            Message::Binary(bytes) => Frame::Binary(bytes),
            Message::Close(frame) => {
                // Keep reading: the next read sends our reply and ends the
                // stream, which completes the closing handshake.
                peer_code = Some(frame.map_or(close_code::NO_STATUS, |frame| frame.code));
                continue;
            }
            // tungstenite answers pings by itself.
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        if socket.is_closing() {
            continue; // the client had not seen our close frame yet
        }
        let outcome = contained(consumer.receive(socket, frame)).await;
        handle_outcome(socket, outcome).await;
    }
}

/// Runs one call into the consumer, turning a panic into an error: a bug in
/// a consumer then ends its connection like any other error (a 1011 close
/// frame, the groups left, `disconnect` called) instead of dropping it
/// without a word and leaving its group memberships behind.
async fn contained(call: impl Future<Output = Result<()>>) -> Result<()> {
    match AssertUnwindSafe(call).catch_unwind().await {
        Ok(outcome) => outcome,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|text| text.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned());
            Err(Error::Other(format!("the consumer panicked: {what}")))
        }
    }
}

/// A consumer's error ends its connection with 1011 and one log line; a
/// closed socket needs nothing more.
async fn handle_outcome(socket: &mut Socket, outcome: Result<()>) {
    match outcome {
        Ok(()) | Err(Error::Closed) => {}
        Err(err) => {
            tracing::warn!(%err, "consumer failed; closing the connection with 1011");
            let _ = socket
                .close(close_code::INTERNAL_ERROR, "internal error")
                .await;
        }
    }
}

/// Ends the connection after a failed read, telling the client why when it
/// is still there to hear it. Returns the close code for `disconnect`.
async fn fail(socket: &mut Socket, err: axum::Error, max_message_size: usize) -> u16 {
    if let Some(code) = socket.sent_close_code() {
        // We had already closed; a client that hangs up instead of answering
        // our close frame does not change why the connection ended.
        socket.drop_connection();
        return code;
    }
    let (code, reason) = match err.into_inner().downcast::<tungstenite::Error>() {
        Ok(err) => match *err {
            tungstenite::Error::Capacity(_) => (
                close_code::MESSAGE_TOO_BIG,
                format!("message too big: the limit is {max_message_size} bytes"),
            ),
            tungstenite::Error::Utf8(_) => (
                close_code::INVALID_PAYLOAD,
                "text frames must be valid UTF-8".to_owned(),
            ),
            tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            ) => (close_code::ABNORMAL, String::new()),
            tungstenite::Error::Protocol(err) => (close_code::PROTOCOL_ERROR, err.to_string()),
            _ => (close_code::ABNORMAL, String::new()),
        },
        Err(_) => (close_code::ABNORMAL, String::new()),
    };
    if code == close_code::ABNORMAL {
        socket.drop_connection();
    } else {
        tracing::info!(code, reason, "closing a connection that sent bad input");
        socket.refuse(code, &reason).await;
    }
    code
}
