//! The runner: the glue that turns a [`Consumer`] type into an axum route
//! and drives one consumer per connection.
//!
//! [`route::<C>()`](route()) (or [`Layers::route`] for a consumer with a
//! channel layer) gives you an axum route. For every WebSocket request on
//! it, the runner:
//!
//! 1. builds a fresh `C` from the request's [`Scope`] (its path, its
//!    parameters and what the app shares through axum's `Extension`), gives
//!    it a channel on its layer and joins its groups;
//! 2. calls [`Consumer::connect`] *before* answering the handshake, so the
//!    consumer can refuse with an HTTP 403 if it never accepts;
//! 3. completes the handshake and delivers what `connect` sent;
//! 4. waits for the client and the layer at once, and calls
//!    [`Consumer::receive`] or [`Consumer::event`] for whichever speaks
//!    first, one call at a time, in order; meanwhile it renews the group
//!    memberships so that they never lapse while the connection lives,
//!    pings a client that has been silent, and closes the connection when
//!    the server shuts down;
//! 5. calls [`Consumer::disconnect`] exactly once with the close code, also
//!    when the client vanished without a close frame (code 1006), then
//!    leaves the groups and frees the channel.
//!
//! Bad input ends only the connection that sent it, and always with a close
//! frame that says why: a message over [`Consumer::MAX_MESSAGE_SIZE`] gets
//! 1009, a text frame that is not UTF-8 gets 1007, and an error returned by
//! the consumer (or a panic in it) gets 1011 and one log line.
//!
//! Each route applies [`Settings`]: before anything else, a handshake from
//! another site's page gets HTTP 403, and one past the connection limit (or
//! during shutdown) gets 503. A peer that stops answering pings, or stops
//! reading, is dropped after a deadline.

use std::any::type_name;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::RawPathParams;
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{Extensions, HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use futures_util::FutureExt;
use serde_json::Value;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_tungstenite::tungstenite;

use crate::close_code;
use crate::consumer::{Consumer, Scope};
use crate::error::{Error, Result};
use crate::layer::{ChannelLayer, LayerError, LayerMessage, Layers};
use crate::settings::{ConnectionPermit, Settings};
use crate::socket::{Frame, Handshake, Inbox, Socket};

/// A route that runs consumer `C` for every WebSocket connection on it, as in
/// `Router::new().route("/ws/system", route::<SystemChat>())` (the crate
/// documentation has a complete example).
///
/// The route is for a `Router` without state; a router with state can mount
/// it with `Router::route_service`.
///
/// Connections follow the process's [`Settings`] (from the environment).
///
/// # Panics
///
/// If `C` uses a channel layer: route it with [`Layers::route`] instead,
/// which knows the app's layers.
pub fn route<C: Consumer>() -> MethodRouter {
    route_with_layer::<C>(no_layer::<C>(), RouteSettings::Process)
}

/// [`route`] with settings of its own for this route's connections, e.g. a
/// longer write timeout for a consumer that streams large messages, or short
/// intervals in a test.
pub fn route_with<C: Consumer>(settings: Settings) -> MethodRouter {
    route_with_layer::<C>(no_layer::<C>(), RouteSettings::Own(settings))
}

fn no_layer<C: Consumer>() -> Option<Arc<dyn ChannelLayer>> {
    if let Some(alias) = C::LAYER {
        panic!(
            "{} uses the channel layer {alias:?}: route it with `layers.route::<{}>()`",
            type_name::<C>(),
            short_type_name::<C>()
        );
    }
    None
}

impl Layers {
    /// A route that runs consumer `C` with the layer it names in
    /// [`Consumer::LAYER`].
    ///
    /// # Panics
    ///
    /// When building the router, if `C` names an alias that is not
    /// registered: a mistake in the app's code, reported at start with the
    /// aliases that are registered, rather than at the first message.
    pub fn route<C: Consumer>(&self) -> MethodRouter {
        route_with_layer::<C>(self.layer_of::<C>(), RouteSettings::Process)
    }

    /// [`Layers::route`] with settings of its own (see [`route_with`]).
    pub fn route_with<C: Consumer>(&self, settings: Settings) -> MethodRouter {
        route_with_layer::<C>(self.layer_of::<C>(), RouteSettings::Own(settings))
    }

    fn layer_of<C: Consumer>(&self) -> Option<Arc<dyn ChannelLayer>> {
        let alias = C::LAYER?;
        match self.get(alias) {
            Ok(layer) => Some(layer),
            Err(err) => panic!("{}: {err}", type_name::<C>()),
        }
    }
}

/// Where a route's settings come from. The process's are looked up at each
/// handshake, not when the route is built, so that [`serve`](crate::serve)
/// can install them after the router exists.
#[derive(Clone)]
enum RouteSettings {
    Process,
    Own(Settings),
}

impl RouteSettings {
    fn get(&self) -> &Settings {
        match self {
            RouteSettings::Process => Settings::process(),
            RouteSettings::Own(settings) => settings,
        }
    }
}

fn route_with_layer<C: Consumer>(
    layer: Option<Arc<dyn ChannelLayer>>,
    settings: RouteSettings,
) -> MethodRouter {
    get(
        move |upgrade: WebSocketUpgrade,
              params: Result<RawPathParams, RawPathParamsRejection>,
              uri: Uri,
              headers: HeaderMap,
              extensions: Extensions| {
            let settings = settings.get().clone();
            handshake::<C>(
                upgrade,
                params,
                uri,
                headers,
                extensions,
                layer.clone(),
                settings,
            )
        },
    )
}

fn short_type_name<C>() -> &'static str {
    let name = type_name::<C>();
    name.rsplit("::").next().unwrap_or(name)
}

/// Why the settings refuse a handshake before any consumer code runs.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    ShuttingDown,
    Origin,
    ConnectionLimit,
}

impl Refusal {
    fn into_response(self) -> Response {
        let (label, status, text) = match self {
            Refusal::ShuttingDown => (
                "shutdown",
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            ),
            Refusal::Origin => (
                "origin",
                StatusCode::FORBIDDEN,
                "this origin may not open WebSockets here",
            ),
            Refusal::ConnectionLimit => (
                "limit",
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections; try again shortly",
            ),
        };
        metrics::counter!("axum_channels_handshakes_refused_total", "reason" => label).increment(1);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // Tells well-behaved clients when to try again.
            (status, [(header::RETRY_AFTER, "5")], text).into_response()
        } else {
            (status, text).into_response()
        }
    }
}

/// Refuses the handshakes the settings forbid, before any consumer code
/// runs; otherwise takes a place among the open connections.
fn admit(
    settings: &Settings,
    headers: &HeaderMap,
    path: &str,
) -> Result<ConnectionPermit, Refusal> {
    if settings.is_shutting_down() {
        return Err(Refusal::ShuttingDown);
    }
    let text = |name| headers.get(name).and_then(|value| value.to_str().ok());
    let (origin, host) = (text(header::ORIGIN), text(header::HOST));
    if !settings.allowed_origins.allows(origin, host) {
        tracing::warn!(
            path,
            origin,
            host,
            "refused a WebSocket from a page of another origin (ALLOWED_ORIGINS lets more in)"
        );
        return Err(Refusal::Origin);
    }
    settings.admit().ok_or_else(|| {
        tracing::warn!(
            path,
            max = settings.max_connections,
            "connection limit reached; refusing with 503 (MAX_CONNECTIONS raises it)"
        );
        Refusal::ConnectionLimit
    })
}

async fn handshake<C: Consumer>(
    upgrade: WebSocketUpgrade,
    params: Result<RawPathParams, RawPathParamsRejection>,
    uri: Uri,
    headers: HeaderMap,
    extensions: Extensions,
    layer: Option<Arc<dyn ChannelLayer>>,
    settings: Settings,
) -> Response {
    let permit = match admit(&settings, &headers, uri.path()) {
        Ok(permit) => permit,
        Err(refusal) => return refusal.into_response(),
    };
    // The extensions carry what the app shares with its consumers through
    // axum's `Extension` (see `Scope::extension`).
    let mut scope = Scope::new(uri.path())
        .with_query(uri.query().map(str::to_owned))
        .with_extensions(extensions);
    match params {
        Ok(params) => {
            for (key, value) in params.iter() {
                scope = scope.with_param(key, value);
            }
        }
        Err(RawPathParamsRejection::MissingPathParams(_)) => {}
        Err(rejection) => return rejection.into_response(),
    }

    let mut consumer = C::new(&scope);
    let mut socket = Socket::connecting(settings.write_timeout);
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
            metrics::counter!("axum_channels_handshakes_accepted_total").increment(1);
            let upgrade = upgrade
                .read_buffer_size(settings.read_buffer_size)
                .write_buffer_size(settings.write_buffer_size)
                .max_message_size(C::MAX_MESSAGE_SIZE)
                .max_frame_size(C::MAX_MESSAGE_SIZE);
            return upgrade.on_upgrade(move |ws| {
                let tasks = settings.clone();
                let connection = Connection {
                    groups,
                    _permit: permit,
                };
                // A graceful shutdown waits for this task to finish.
                tasks.track(run(consumer, socket, ws, settings, connection))
            });
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

/// What an accepted connection holds on to until it ends.
struct Connection {
    groups: Vec<String>,
    /// Its place among the open connections, given back when it ends.
    _permit: ConnectionPermit,
}

/// Drives one accepted connection from the handshake to `disconnect`.
async fn run<C: Consumer>(
    mut consumer: C,
    mut socket: Socket,
    ws: WebSocket,
    settings: Settings,
    connection: Connection,
) {
    socket.open(ws).await;
    let code = serve(&mut consumer, &mut socket, &connection.groups, &settings).await;
    let disconnected = async {
        consumer.disconnect(&mut socket, code).await;
        Ok(())
    };
    if let Err(err) = contained(disconnected).await {
        tracing::warn!(%err, "disconnect failed");
    }
    socket.detach(&connection.groups).await;
}

// ANCHOR: input
/// What woke the runner up.
enum Input {
    /// The client sent a frame, its read failed, or (`None`) it is gone.
    Client(Option<Result<Message, axum::Error>>),
    /// A message arrived in the connection's channel, or the layer failed.
    Layer(Result<LayerMessage, LayerError>),
    /// Time to renew the group memberships.
    Renew,
    /// The client has been silent for a while (see [`Keepalive`]).
    Keepalive,
    /// The server is shutting down.
    Shutdown,
}
// ANCHOR_END: input

/// What the runner waits on besides the client.
struct Waits<'a> {
    inbox: Option<&'a Inbox>,
    renewal: Option<&'a mut Interval>,
    keepalive: Option<Instant>,
    settings: &'a Settings,
}

/// Waits for the client, the layer (if the consumer has a channel) and the
/// timers at once: whichever is ready first is handled first. Nothing polls.
async fn next_input(socket: &mut Socket, waits: Waits<'_>) -> Input {
    if socket.is_closing() {
        // We said goodbye: only the client's answer matters now, and a client
        // that does not answer in time is treated as gone.
        let reply = tokio::time::timeout(waits.settings.close_timeout, socket.recv()).await;
        return Input::Client(reply.ok().flatten());
    }
    // A branch with nothing to wait for waits forever, so it never wins.
    let layer = async {
        match waits.inbox {
            Some(inbox) => inbox.layer.receive(&inbox.channel).await,
            None => std::future::pending().await,
        }
    };
    let renew = async {
        match waits.renewal {
            Some(interval) => interval.tick().await,
            None => std::future::pending().await,
        }
    };
    let keepalive = async {
        match waits.keepalive {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    };
    // ANCHOR: select
    tokio::select! {
        next = socket.recv() => Input::Client(next),
        message = layer => Input::Layer(message),
        _ = renew => Input::Renew,
        _ = keepalive => Input::Keepalive,
        _ = waits.settings.shutting_down() => Input::Shutdown,
    }
    // ANCHOR_END: select
}

/// A timer that fires at half the layer's group expiry, so a membership is
/// renewed long before it could lapse; `None` when there is nothing to renew.
fn renewal_timer(inbox: Option<&Inbox>, groups: &[String]) -> Option<Interval> {
    let expiry = inbox?.layer.group_expiry()?;
    if groups.is_empty() {
        return None;
    }
    let period = (expiry / 2).max(Duration::from_millis(10));
    let mut interval = tokio::time::interval_at(Instant::now() + period, period);
    // After a stall, renew once, not once per missed tick.
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    Some(interval)
}

/// Finds peers that have gone away without a word: after `interval` of
/// silence the server pings, and a peer that sends nothing back within
/// `timeout` is dropped. Any frame from the client counts as an answer.
struct Keepalive {
    interval: Duration,
    timeout: Duration,
    /// When the last ping went out, if it has not been answered yet.
    pinged: Option<Instant>,
    last_heard: Instant,
}

impl Keepalive {
    fn new(settings: &Settings) -> Option<Keepalive> {
        Some(Keepalive {
            interval: settings.ping_interval?,
            timeout: settings.pong_timeout,
            pinged: None,
            last_heard: Instant::now(),
        })
    }

    fn deadline(&self) -> Instant {
        match self.pinged {
            Some(pinged) => pinged + self.timeout,
            None => self.last_heard + self.interval,
        }
    }

    fn heard(&mut self) {
        self.pinged = None;
        self.last_heard = Instant::now();
    }
}

/// Serves the connection until it ends; returns the close code.
async fn serve<C: Consumer>(
    consumer: &mut C,
    socket: &mut Socket,
    groups: &[String],
    settings: &Settings,
) -> u16 {
    let mut peer_code = None;
    let mut inbox = socket.inbox();
    let mut renewal = renewal_timer(inbox.as_ref(), groups);
    let mut keepalive = Keepalive::new(settings);
    loop {
        let waits = Waits {
            inbox: inbox.as_ref(),
            renewal: renewal.as_mut(),
            keepalive: keepalive.as_ref().map(Keepalive::deadline),
            settings,
        };
        let next = match next_input(socket, waits).await {
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
            Input::Renew => {
                if let Some(inbox) = &inbox {
                    renew_memberships(inbox, groups).await;
                }
                continue;
            }
            Input::Keepalive => {
                let Some(alive) = keepalive.as_mut() else {
                    continue;
                };
                if alive.pinged.is_some() {
                    tracing::info!(
                        timeout = ?alive.timeout,
                        "dropping a connection whose peer stopped answering pings"
                    );
                    socket.drop_connection();
                    return close_code::ABNORMAL;
                }
                alive.pinged = Some(Instant::now());
                let _ = socket.ping().await;
                continue;
            }
            Input::Shutdown => {
                let _ = socket
                    .close(close_code::GOING_AWAY, "server shutting down")
                    .await;
                continue;
            }
        };
        if let Some(alive) = keepalive.as_mut() {
            alive.heard();
        }
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
            // tungstenite answers pings by itself; a pong has already
            // counted as a sign of life above.
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        metrics::counter!("axum_channels_frames_in_total").increment(1);
        if socket.is_closing() {
            continue; // the client had not seen our close frame yet
        }
        let outcome = contained(consumer.receive(socket, frame)).await;
        handle_outcome(socket, outcome).await;
    }
}

/// Joins the groups again, which pushes their expiry back. A failure is
/// logged and retried at the next tick: the membership has half its life
/// left.
async fn renew_memberships(inbox: &Inbox, groups: &[String]) {
    for group in groups {
        if let Err(err) = inbox.layer.group_add(group, &inbox.channel).await {
            tracing::warn!(group, %err, "could not renew a group membership");
        }
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
        socket.close_after_read_error(code, &reason).await;
    }
    code
}
