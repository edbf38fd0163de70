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
//! Two things make that hold whatever the client does. What the connection
//! holds in its layer (its channel and every group it joined) is owned by a
//! drop guard, `Membership` (in `membership.rs`), so no path out of a
//! handshake, cancelled, refused or failed, leaves a member behind. And
//! steps 1 and 2 run in a task of their own: a client that resets the
//! connection while `connect` runs cannot cut `connect` off halfway, and a
//! connection whose `connect` accepted always gets its `disconnect`, even
//! when the client is gone before the upgrade.
//!
//! Bad input ends only the connection that sent it, and always with a close
//! frame that says why: a message over [`Consumer::MAX_MESSAGE_SIZE`] gets
//! 1009, a text frame that is not UTF-8 gets 1007, a client over its
//! inbound budget gets 1008, and an error returned by the consumer (or a
//! panic in it) gets 1011 and one log line.
//!
//! Each route applies [`ConnectionSettings`] and the process's [`Runtime`]:
//! before anything else, a handshake from another site's page gets HTTP
//! 403, and one past the connection limit (or during shutdown) gets 503. A
//! peer that stops answering pings, stops reading, or does not answer our
//! close frame is dropped at a deadline.

use std::any::type_name;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::RawPathParams;
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{Extensions, HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use futures_util::FutureExt;
use serde::Deserialize;
use tokio::sync::oneshot;
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};
use tokio_tungstenite::tungstenite;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::budget::Budget;
use crate::close_code;
use crate::consumer::{Consumer, Scope};
use crate::error::{Error, Result};
use crate::layer::{ChannelLayer, LayerError, LayerMessage, Layers};
use crate::runtime::{ConnectionPermit, Runtime, after};
use crate::settings::ConnectionSettings;
use crate::socket::{Frame, Handshake, Inbox, Socket};

/// A route that runs consumer `C` for every WebSocket connection on it, as in
/// `Router::new().route("/ws/system", route::<SystemChat>())` (the crate
/// documentation has a complete example).
///
/// The route is for a `Router` without state; a router with state can mount
/// it with `Router::route_service`. Connections follow the
/// [`ConnectionSettings`] of the [`Runtime`] that serves the app.
///
/// # Panics
///
/// If `C` uses a channel layer: route it with [`Layers::route`] instead,
/// which knows the app's layers.
pub fn route<C: Consumer>() -> MethodRouter {
    route_with_layer::<C>(no_layer::<C>(), None)
}

/// [`route`] with connection settings of its own, e.g. a longer write
/// timeout for a consumer that streams large messages, or short intervals
/// in a test. The connection limit and the shutdown are still the
/// process's: they belong to the [`Runtime`].
///
/// # Panics
///
/// When building the router, if a setting is out of range (see
/// [`ConnectionSettings::validate`]): a mistake in the app's code, reported
/// at start.
pub fn route_with<C: Consumer>(settings: ConnectionSettings) -> MethodRouter {
    route_with_layer::<C>(no_layer::<C>(), Some(checked(settings)))
}

fn checked(settings: ConnectionSettings) -> Arc<ConnectionSettings> {
    if let Err(err) = settings.validate() {
        panic!("route_with: {err}");
    }
    Arc::new(settings)
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
        route_with_layer::<C>(self.layer_of::<C>(), None)
    }

    /// [`Layers::route`] with connection settings of its own (see
    /// [`route_with`]).
    pub fn route_with<C: Consumer>(&self, settings: ConnectionSettings) -> MethodRouter {
        route_with_layer::<C>(self.layer_of::<C>(), Some(checked(settings)))
    }

    fn layer_of<C: Consumer>(&self) -> Option<Arc<dyn ChannelLayer>> {
        let alias = C::LAYER?;
        match self.get(alias) {
            Ok(layer) => Some(layer),
            Err(err) => panic!("{}: {err}", type_name::<C>()),
        }
    }
}

/// What a route knows when it is built: the consumer's layer and, if the
/// route has its own, its connection settings (otherwise the runtime's).
fn route_with_layer<C: Consumer>(
    layer: Option<Arc<dyn ChannelLayer>>,
    own_settings: Option<Arc<ConnectionSettings>>,
) -> MethodRouter {
    get(
        move |upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
              params: Result<RawPathParams, RawPathParamsRejection>,
              uri: Uri,
              headers: HeaderMap,
              extensions: Extensions| {
            let request = Request {
                params,
                uri,
                headers,
                extensions,
            };
            handshake::<C>(upgrade, request, layer.clone(), own_settings.clone())
        },
    )
}

fn short_type_name<C>() -> &'static str {
    let name = type_name::<C>();
    name.rsplit("::").next().unwrap_or(name)
}

/// The parts of a handshake request the runner reads.
struct Request {
    params: Result<RawPathParams, RawPathParamsRejection>,
    uri: Uri,
    headers: HeaderMap,
    extensions: Extensions,
}

/// Why a handshake is refused before any consumer code runs.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    ShuttingDown,
    Origin,
    ConnectionLimit,
    NoRuntime,
}

impl Refusal {
    fn into_response(self) -> Response {
        metrics::counter!("axum_channels_handshakes_refused_total", "reason" => self.label())
            .increment(1);
        self.answer()
    }

    fn label(self) -> &'static str {
        match self {
            Refusal::ShuttingDown => "shutdown",
            Refusal::Origin => "origin",
            Refusal::ConnectionLimit => "limit",
            Refusal::NoRuntime => "runtime",
        }
    }

    /// The HTTP answer, without counting it.
    fn answer(self) -> Response {
        let (status, text) = match self {
            Refusal::ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            ),
            Refusal::Origin => (
                StatusCode::FORBIDDEN,
                "this origin may not open WebSockets here",
            ),
            Refusal::ConnectionLimit => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections; try again shortly",
            ),
            Refusal::NoRuntime => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "this server is not set up for WebSockets",
            ),
        };
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
    runtime: &Runtime,
    settings: &ConnectionSettings,
    request: &Request,
) -> Result<ConnectionPermit, Refusal> {
    let path = request.uri.path();
    if runtime.is_shutting_down() {
        return Err(Refusal::ShuttingDown);
    }
    let headers = &request.headers;
    let origin = headers.get(header::ORIGIN);
    // HTTP/2 requests carry the host in the URI, not in a `Host` header.
    let authority = request
        .uri
        .authority()
        .and_then(|authority| HeaderValue::from_str(authority.as_str()).ok());
    let host = headers.get(header::HOST).or(authority.as_ref());
    // Several `Origin` headers are no browser's doing: refused.
    let single = headers.get_all(header::ORIGIN).iter().count() <= 1;
    // The server itself never terminates TLS: behind a proxy that does, the
    // page is `https://` while the request here is plain HTTP.
    let tls = false;
    if !single
        || !settings
            .allowed_origins
            .check(origin, host, tls)
            .is_allowed()
    {
        tracing::warn!(
            path,
            ?origin,
            ?host,
            "refused a WebSocket from a page of another origin (ALLOWED_ORIGINS lets more in)"
        );
        return Err(Refusal::Origin);
    }
    runtime.admit().ok_or_else(|| {
        tracing::warn!(
            path,
            max = runtime.settings().max_connections,
            "connection limit reached; refusing with 503 (MAX_CONNECTIONS raises it)"
        );
        Refusal::ConnectionLimit
    })
}

/// Answers a plain request (no upgrade headers) on a WebSocket route: the
/// 503 with `Retry-After` that a handshake would get now, while the server
/// shuts down or is full, else the 400 of a request that is no handshake.
/// Browsers hide the HTTP status of a failed handshake from the page, so a
/// page can ask this way why its handshake failed and when to try again.
fn not_a_handshake(runtime: Option<&Runtime>, rejection: WebSocketUpgradeRejection) -> Response {
    let Some(runtime) = runtime else {
        return rejection.into_response();
    };
    let full = runtime
        .settings()
        .max_connections
        .is_some_and(|max| runtime.open_connections() >= max);
    if runtime.is_shutting_down() {
        Refusal::ShuttingDown.answer()
    } else if full {
        Refusal::ConnectionLimit.answer()
    } else {
        rejection.into_response()
    }
}

/// The request's path, query, parameters and extensions, for `C::new`.
fn scope_of(request: Request) -> Result<Scope, RawPathParamsRejection> {
    // The extensions carry what the app shares with its consumers through
    // axum's `Extension` (see `Scope::extension`).
    let mut scope = Scope::new(request.uri.path())
        .with_query(request.uri.query().map(str::to_owned))
        .with_extensions(request.extensions);
    match request.params {
        Ok(params) => {
            for (key, value) in params.iter() {
                scope = scope.with_param(key, value);
            }
        }
        Err(RawPathParamsRejection::MissingPathParams(_)) => {}
        Err(rejection) => return Err(rejection),
    }
    Ok(scope)
}

/// Answers one handshake: admits it, lets the consumer's `connect` decide in
/// a task of its own, and upgrades the connection if it accepted.
async fn handshake<C: Consumer>(
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    request: Request,
    layer: Option<Arc<dyn ChannelLayer>>,
    own_settings: Option<Arc<ConnectionSettings>>,
) -> Response {
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            return not_a_handshake(request.extensions.get::<Runtime>(), rejection);
        }
    };
    let Some(runtime) = request.extensions.get::<Runtime>().cloned() else {
        tracing::error!(
            path = request.uri.path(),
            "no axum_channels::Runtime in this request: serve the app with \
             axum_channels::serve or Runtime::serve (or Runtime::attach)"
        );
        return Refusal::NoRuntime.into_response();
    };
    let settings = own_settings.unwrap_or_else(|| runtime.connection_settings());
    let permit = match admit(&runtime, &settings, &request) {
        Ok(permit) => permit,
        Err(refusal) => return refusal.into_response(),
    };
    let scope = match scope_of(request) {
        Ok(scope) => scope,
        Err(rejection) => return rejection.into_response(),
    };
    // If the client leaves now, hyper drops this future; the task goes on,
    // so `connect` is never cut off halfway.
    let (reply, decision) = oneshot::channel();
    let opening = Opening {
        runtime: runtime.clone(),
        settings: settings.clone(),
        permit,
        layer,
    };
    runtime.spawn(open::<C>(scope, opening, reply));
    let connection = match decision.await {
        Ok(Ok(connection)) => connection,
        Ok(Err(refused)) => return refused,
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    metrics::counter!("axum_channels_handshakes_accepted_total").increment(1);
    upgrade
        .read_buffer_size(settings.read_buffer_size)
        .write_buffer_size(settings.write_buffer_size)
        .max_message_size(C::MAX_MESSAGE_SIZE)
        .max_frame_size(C::MAX_MESSAGE_SIZE)
        .on_failed_upgrade(|err| {
            // The connection's drop still runs `disconnect` and leaves.
            tracing::info!(%err, "a WebSocket upgrade failed after the handshake");
        })
        .on_upgrade(move |ws| connection.run(ws))
}

/// What `open` needs besides the scope.
struct Opening {
    runtime: Runtime,
    settings: Arc<ConnectionSettings>,
    permit: ConnectionPermit,
    layer: Option<Arc<dyn ChannelLayer>>,
}

/// The consumer's decision, sent back to the handshake.
type Decision<C> = std::result::Result<Connection<C>, Response>;

/// Builds the consumer, joins its layer and runs `connect`; sends back the
/// accepted connection, or the response that refuses it.
async fn open<C: Consumer>(scope: Scope, opening: Opening, reply: oneshot::Sender<Decision<C>>) {
    let decision = decide::<C>(scope, opening).await;
    if let Err(Ok(connection)) = reply.send(decision) {
        // The client left while `connect` ran. It was accepted, so its
        // consumer hears that it is gone, as for any other connection.
        connection.end(close_code::ABNORMAL).await;
    }
}

async fn decide<C: Consumer>(scope: Scope, opening: Opening) -> Decision<C> {
    let mut consumer = C::new(&scope);
    let mut socket = Socket::connecting(&opening.settings);
    if let Some(layer) = opening.layer {
        // Subscribed before `connect`, so nothing sent to the groups from
        // now on (such as our own "joined" announcement) is missed.
        let groups = consumer.groups();
        if let Err(err) = socket.attach(layer, &groups, opening.runtime.clone()).await {
            tracing::warn!(path = scope.path(), %err, "cannot join the channel layer; refusing");
            socket.leave_layer().await;
            return Err(StatusCode::INTERNAL_SERVER_ERROR.into_response());
        }
    }
    let connected = contained(consumer.connect(&mut socket)).await;
    let refused = match (connected, socket.handshake()) {
        (Ok(()), Handshake::Accepted) => {
            return Ok(Connection {
                task: opening.runtime.task_token(),
                parts: Some(Box::new(Parts {
                    consumer,
                    socket,
                    settings: opening.settings,
                    _permit: opening.permit,
                })),
                runtime: opening.runtime,
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
    socket.leave_layer().await;
    Err(refused)
}

/// An accepted connection, from `connect` to `disconnect`. If it is dropped
/// before it ends (the upgrade failed, the handshake was abandoned), its
/// drop still runs `disconnect` and leaves the layer, in a task.
///
/// Its parts are boxed, so that what moves from the handshake to the
/// upgrade's closure and on into the connection's task is a pointer: a
/// value captured by a closure or passed to an async function keeps its
/// room in the task's future for the connection's whole life, even once
/// it has been moved out.
struct Connection<C: Consumer> {
    parts: Option<Box<Parts<C>>>,
    runtime: Runtime,
    /// Makes a shutdown wait for this connection from its acceptance on.
    task: TaskTrackerToken,
}

struct Parts<C> {
    consumer: C,
    socket: Socket,
    settings: Arc<ConnectionSettings>,
    /// Its place among the open connections, given back when it ends.
    _permit: ConnectionPermit,
}

impl<C: Consumer> Connection<C> {
    /// Completes the handshake and serves the connection until it ends.
    ///
    /// Not an `async fn`: its future would keep room for `ws` (some 370
    /// bytes) for as long as the connection lives. The socket takes `ws`
    /// here, before the future is made.
    fn run(mut self, ws: WebSocket) -> impl Future<Output = ()> + Send {
        let parts = self.parts.take().map(|mut parts| {
            parts.socket.upgrade(ws);
            parts
        });
        async move {
            let Some(mut parts) = parts else {
                return;
            };
            let connection = self;
            parts.socket.deliver_outbox().await;
            let code = serve(
                &mut parts.consumer,
                &mut parts.socket,
                &parts.settings,
                &connection.runtime,
            )
            .await;
            finish(parts, code).await;
        }
    }

    /// Ends a connection that never ran.
    async fn end(mut self, code: u16) {
        if let Some(parts) = self.parts.take() {
            finish(parts, code).await;
        }
    }
}

impl<C: Consumer> Drop for Connection<C> {
    fn drop(&mut self) {
        if let Some(parts) = self.parts.take() {
            let task = self.task.clone();
            self.runtime.spawn_cleanup(async move {
                finish(parts, close_code::ABNORMAL).await;
                drop(task);
            });
        }
    }
}

/// Calls `disconnect`, then leaves the groups and frees the channel.
async fn finish<C: Consumer>(mut parts: Box<Parts<C>>, code: u16) {
    let socket = &mut parts.socket;
    let disconnected = async {
        parts.consumer.disconnect(socket, code).await;
        Ok(())
    };
    if let Err(err) = contained(disconnected).await {
        tracing::warn!(%err, "disconnect failed");
    }
    parts.socket.leave_layer().await;
}

// ANCHOR: input
/// What woke the runner up.
enum Input {
    /// The client sent a frame, its read failed, or (`None`) it is gone.
    Client(Option<Result<Message, axum::Error>>),
    /// A message arrived in the connection's channel, or the layer failed.
    Layer(Result<Arc<LayerMessage>, LayerError>),
    /// Time to renew the group memberships.
    Renew,
    /// The client has been silent for a while (see [`Keepalive`]).
    Keepalive,
    /// The server is shutting down.
    Shutdown,
}
// ANCHOR_END: input

/// What the runner waits on besides the client. The timers and the
/// shutdown are the session's own, kept from one turn to the next: made
/// afresh each turn, they would be registered with tokio and taken out
/// again for every message the connection handles.
struct Waits<'a> {
    inbox: Option<&'a Inbox>,
    renewal: Option<&'a mut Interval>,
    keepalive: Option<Pin<&'a mut Sleep>>,
    /// The client is not read from before this (it went over its budget).
    paused_until: Option<Instant>,
    shutdown: Pin<&'a mut WaitForCancellationFutureOwned>,
}

/// Waits for the client, the layer (if the consumer has a channel) and the
/// timers at once: whichever is ready first is handled first. Nothing polls.
async fn next_input(socket: &mut Socket, waits: Waits<'_>) -> Input {
    if let Some(deadline) = socket.close_deadline() {
        // We said goodbye: only the client's answer matters now, and a client
        // that has not answered by the deadline is treated as gone, however
        // much else it sends meanwhile.
        // Boxed, as the pause below is: a connection spends little of
        // its life closing.
        let reply = Box::pin(tokio::time::timeout_at(deadline, socket.recv())).await;
        return Input::Client(reply.ok().flatten());
    }
    let client = async {
        if let Some(until) = waits.paused_until {
            // Boxed, as it is rare: inline, its timer would take room in
            // every idle connection's future.
            Box::pin(tokio::time::sleep_until(until)).await;
        }
        socket.recv().await
    };
    // A branch with nothing to wait for waits forever, so it never wins.
    let layer = async {
        match waits.inbox {
            Some(inbox) => inbox.layer.receive_shared(&inbox.channel).await,
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
            Some(timer) => timer.await,
            None => std::future::pending().await,
        }
    };
    // ANCHOR: select
    tokio::select! {
        next = client => Input::Client(next),
        message = layer => Input::Layer(message),
        _ = renew => Input::Renew,
        _ = keepalive => Input::Keepalive,
        _ = waits.shutdown => Input::Shutdown,
    }
    // ANCHOR_END: select
}

/// A timer that fires at half the layer's group expiry, so a membership is
/// renewed long before it could lapse; `None` without a layer, or with one
/// whose memberships never lapse.
fn renewal_timer(inbox: Option<&Inbox>) -> Option<Interval> {
    let expiry = inbox?.layer.group_expiry()?;
    let period = (expiry / 2).max(Duration::from_millis(10));
    let mut interval = tokio::time::interval_at(after(Instant::now(), period), period);
    // After a stall, renew once, not once per missed tick.
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    Some(interval)
}

/// Finds peers that have gone away without a word: after `interval` of
/// silence the server pings, and a peer that sends nothing back within
/// `timeout` is dropped. Any frame from the client counts as an answer.
///
/// Its timer is set lazily: hearing from the client moves the deadline
/// later without touching the timer, which then fires early, once, and is
/// set again to the deadline of the moment (see [`Keepalive::timer`]). A
/// client that talks all the time thus costs one timer a ping interval,
/// not one per frame.
struct Keepalive {
    interval: Duration,
    timeout: Duration,
    /// When the last ping went out, if it has not been answered yet.
    pinged: Option<Instant>,
    last_heard: Instant,
    /// Fires at [`deadline`](Keepalive::deadline) or before it.
    timer: Pin<Box<Sleep>>,
}

impl Keepalive {
    fn new(settings: &ConnectionSettings) -> Option<Keepalive> {
        let interval = settings.ping_interval?;
        let now = Instant::now();
        Some(Keepalive {
            interval,
            timeout: settings.pong_timeout,
            pinged: None,
            last_heard: now,
            timer: Box::pin(tokio::time::sleep_until(after(now, interval))),
        })
    }

    /// The timer to wait on, set again if it went off or would go off
    /// after the deadline.
    fn timer(&mut self) -> Pin<&mut Sleep> {
        let due = self.deadline();
        if self.timer.is_elapsed() || due < self.timer.deadline() {
            self.timer.as_mut().reset(due);
        }
        self.timer.as_mut()
    }

    /// Whether the deadline has really passed, rather than the timer
    /// having gone off at one the client has since moved.
    fn is_due(&self) -> bool {
        Instant::now() >= self.deadline()
    }

    fn deadline(&self) -> Instant {
        match self.pinged {
            Some(pinged) => after(pinged, self.timeout),
            None => after(self.last_heard, self.interval),
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
    settings: &ConnectionSettings,
    runtime: &Runtime,
) -> u16 {
    let mut session = Session::new(socket, settings, C::MAX_MESSAGE_SIZE, runtime);
    loop {
        let input = next_input(socket, session.waits()).await;
        // ANCHOR: boxed_handling
        // Boxed: the future of handling an input (the consumer's calls, a
        // write with its timeout) is several times the size of the wait
        // for one, and a connection is idle nearly all its life. Inline,
        // every idle connection would keep room for the largest of them;
        // boxed, a turn that handles something allocates it for that turn.
        let handled = Box::pin(session.handle(consumer, socket, input)).await;
        // ANCHOR_END: boxed_handling
        if let Some(code) = handled {
            return code;
        }
    }
}

/// What the runner keeps about one connection between two inputs.
struct Session {
    inbox: Option<Inbox>,
    renewal: Option<Interval>,
    keepalive: Option<Keepalive>,
    budget: Budget,
    /// Not read from before this: it went over its budget.
    paused_until: Option<Instant>,
    /// The code of the client's close frame, once it sent one.
    peer_code: Option<u16>,
    max_message_size: usize,
    /// Completes when the server starts shutting down.
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Session {
    fn new(
        socket: &Socket,
        settings: &ConnectionSettings,
        max_message_size: usize,
        runtime: &Runtime,
    ) -> Session {
        let inbox = socket.inbox();
        Session {
            renewal: renewal_timer(inbox.as_ref()),
            inbox,
            keepalive: Keepalive::new(settings),
            budget: Budget::new(settings.inbound, max_message_size),
            paused_until: None,
            peer_code: None,
            max_message_size,
            shutdown: Box::pin(runtime.shutting_down_token().clone().cancelled_owned()),
        }
    }

    /// Handles one input; `Some(code)` once the connection is over.
    async fn handle<C: Consumer>(
        &mut self,
        consumer: &mut C,
        socket: &mut Socket,
        input: Input,
    ) -> Option<u16> {
        match input {
            Input::Client(next) => self.on_client(consumer, socket, next).await,
            Input::Layer(message) => self.on_layer(consumer, socket, message).await,
            Input::Renew => {
                socket.renew_memberships().await;
                None
            }
            Input::Keepalive => self.on_silence(socket).await,
            Input::Shutdown => {
                let _ = socket
                    .close(close_code::GOING_AWAY, "server shutting down")
                    .await;
                None
            }
        }
    }

    fn waits(&mut self) -> Waits<'_> {
        Waits {
            inbox: self.inbox.as_ref(),
            renewal: self.renewal.as_mut(),
            keepalive: self.keepalive.as_mut().map(Keepalive::timer),
            paused_until: self.paused_until,
            shutdown: self.shutdown.as_mut(),
        }
    }

    /// A message from the layer goes to `event`, and so do the messages
    /// that arrived meanwhile, up to [`LAYER_BATCH`] in all, before the
    /// runner waits again; the layer failing ends only what the connection
    /// hears from it.
    ///
    /// In a busy room a member's channel often holds several messages by
    /// the time its task runs (the sender's connection handled a few
    /// frames in a row). Taking them in one turn, rather than one turn of
    /// `select!` each, spares a wait on the client, the timers and the
    /// layer per message, and their frames go out in one write to the
    /// socket rather than one each (writes were most of a busy room's
    /// cost); the bound keeps the client and the timers from waiting
    /// behind a channel that never empties.
    async fn on_layer<C: Consumer>(
        &mut self,
        consumer: &mut C,
        socket: &mut Socket,
        message: Result<Arc<LayerMessage>, LayerError>,
    ) -> Option<u16> {
        let message = match message {
            Ok(message) => message,
            Err(err) => {
                tracing::warn!(%err, "stopped receiving from the channel layer");
                self.inbox = None;
                return None;
            }
        };
        socket.gather();
        deliver(consumer, socket, &message).await;
        for _ in 1..LAYER_BATCH {
            // A closing socket waits for the client's answer alone, as
            // `next_input` does.
            if socket.is_closing() {
                break;
            }
            let Some(inbox) = &self.inbox else { break };
            let Some(message) = inbox.layer.try_receive(&inbox.channel) else {
                break;
            };
            deliver(consumer, socket, &message).await;
        }
        // A failed write has closed the socket; the next read says why.
        let _ = socket.flush().await;
        None
    }

    /// The client has been silent: ping it, or, if it did not answer the
    /// last ping either, drop it.
    async fn on_silence(&mut self, socket: &mut Socket) -> Option<u16> {
        let alive = self.keepalive.as_mut()?;
        if !alive.is_due() {
            return None; // heard from since the timer was set
        }
        if alive.pinged.is_some() {
            tracing::info!(
                timeout = ?alive.timeout,
                "dropping a connection whose peer stopped answering pings"
            );
            socket.drop_connection();
            return Some(close_code::ABNORMAL);
        }
        alive.pinged = Some(Instant::now());
        let _ = socket.ping().await;
        None
    }

    /// What the client sent: a frame for `receive` (within its budget), its
    /// close frame, or the end of the connection.
    async fn on_client<C: Consumer>(
        &mut self,
        consumer: &mut C,
        socket: &mut Socket,
        next: Option<Result<Message, axum::Error>>,
    ) -> Option<u16> {
        if let Some(alive) = self.keepalive.as_mut() {
            alive.heard();
        }
        let message = match next {
            Some(Ok(message)) => message,
            Some(Err(err)) => return Some(fail(socket, err, self.max_message_size).await),
            None => {
                let code = self.peer_code.or(socket.sent_close_code());
                return Some(code.unwrap_or(close_code::ABNORMAL));
            }
        };
        let frame = match message {
            Message::Text(text) => Frame::Text(text.as_str().to_owned()),
            Message::Binary(bytes) => Frame::Binary(bytes),
            Message::Close(frame) => {
                // Keep reading: the next read sends our reply and ends the
                // stream, which completes the closing handshake.
                self.peer_code = Some(frame.map_or(close_code::NO_STATUS, |frame| frame.code));
                return None;
            }
            // tungstenite answers pings by itself; a pong has already
            // counted as a sign of life above.
            Message::Ping(_) | Message::Pong(_) => return None,
        };
        metrics::counter!("axum_channels_frames_in_total").increment(1);
        if socket.is_closing() {
            return None; // the client had not seen our close frame yet
        }
        let size = match &frame {
            Frame::Text(text) => text.len(),
            Frame::Binary(bytes) => bytes.len(),
        };
        let outcome = match self.budget.spend(size) {
            Ok(()) => contained(consumer.receive(socket, frame)).await,
            Err(too_fast) => {
                metrics::counter!("axum_channels_frames_over_budget_total").increment(1);
                tracing::info!(%too_fast, "a client went over its inbound budget");
                self.paused_until = Some(after(Instant::now(), too_fast.wait));
                contained(consumer.too_fast(socket, too_fast)).await
            }
        };
        handle_outcome::<C>(socket, outcome).await;
        None
    }
}

/// How many layer messages one turn hands to `event` at most (see
/// [`Session::on_layer`]): a member a whole channel behind (100 messages by
/// default) catches up in four turns, and its client and timers never wait
/// behind more than this many events.
const LAYER_BATCH: usize = 32;

/// Hands one layer message to `event`. The event is read out of the shared
/// message, without copying the message first.
async fn deliver<C: Consumer>(consumer: &mut C, socket: &mut Socket, message: &LayerMessage) {
    let outcome = match C::Event::deserialize(message) {
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
    handle_outcome::<C>(socket, outcome).await;
}

/// Runs one call into the consumer, turning a panic into an error: a bug in
/// a consumer then ends its connection like any other error (a 1011 close
/// frame, the groups left, `disconnect` called) instead of dropping it
/// without a word.
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
/// closed socket needs nothing more. A layer outage (Redis away) is not the
/// consumer's fault and passes: the layer reports it once, and closing
/// every client that spoke during a short blip would only have them all
/// reconnect at once. A consumer that cannot work without its layer says
/// so with [`Consumer::CLOSE_ON_LAYER_OUTAGE`].
async fn handle_outcome<C: Consumer>(socket: &mut Socket, outcome: Result<()>) {
    match outcome {
        Ok(()) | Err(Error::Closed) => {}
        Err(Error::Layer(err)) if err.is_outage() && !C::CLOSE_ON_LAYER_OUTAGE => {
            tracing::debug!(%err, "a layer call failed during an outage; the client stays");
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{JsonConsumer, LayerEvent};
    use serde::Serialize;

    /// A consumer like step 05's notifications: JSON from the client, a
    /// group send, and a JSON frame per event.
    struct Notes;

    #[derive(Serialize, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum Note {
        NoteMessage { data: String },
    }

    impl LayerEvent for Note {}

    impl JsonConsumer for Notes {
        type Message = serde_json::Value;
        type Event = Note;
        const LAYER: Option<&'static str> = Some("notes");

        fn new(_: &Scope) -> Self {
            Notes
        }

        async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
            socket.accept().await
        }

        async fn receive(&mut self, socket: &mut Socket, message: serde_json::Value) -> Result<()> {
            let data = message.to_string();
            socket
                .group_send("notes", &Note::NoteMessage { data })
                .await
        }

        async fn event(&mut self, socket: &mut Socket, event: Note) -> Result<()> {
            match event {
                Note::NoteMessage { data } => socket.send_json(&data).await,
            }
        }
    }

    /// The size of the future `f` returns, without making one.
    fn future_size<A, B, F: Future>(_: impl FnOnce(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// What an idle connection's task holds is mostly the future of
    /// `Connection::run`: 2,632 bytes (in a test build) before the
    /// handling of an input was boxed and `ws` was kept out of it, 728
    /// after. Every idle connection pays for this, so a change that makes
    /// it grow again should be a decision, not an accident.
    #[test]
    fn an_idle_connection_s_future_stays_small() {
        let run = future_size(Connection::<Notes>::run);
        assert!(run <= 1024, "Connection::run's future is {run} bytes");
        // Moved from the handshake into the upgrade's closure and the task.
        assert!(std::mem::size_of::<Connection<Notes>>() <= 32);
    }
}
