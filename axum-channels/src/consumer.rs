//! The [`Consumer`] trait: what you implement to handle one WebSocket
//! connection.
//!
//! A consumer is a plain struct, one value per connection. The
//! [runner](crate::runner) builds it from the request's [`Scope`], then calls
//! its lifecycle methods in order, never two at once:
//!
//! 1. [`connect`](Consumer::connect), *before* the handshake is answered, so
//!    the consumer can refuse with an HTTP 403 by not accepting;
//! 2. [`receive`](Consumer::receive) for each text or binary message, and
//!    [`event`](Consumer::event) for each message from its channel layer;
//! 3. [`disconnect`](Consumer::disconnect) exactly once, with the close code.
//!
//! Everything a consumer does to its client or its layer goes through the
//! [`Socket`] it is handed. This module holds only what you write against;
//! how the connection is driven lives in [`runner`](crate::runner).
//!
//! The trait's methods are `async fn`s in a trait (Rust 1.75 and later),
//! written as `impl Future` so that the futures are required to be `Send`.
//! That needs no `#[async_trait]` and no boxing: the runner is generic over
//! the consumer type, so every call is resolved at compile time. (The
//! [`ChannelLayer`](crate::layer::ChannelLayer) trait is different: it is used
//! as `Arc<dyn ChannelLayer>`, and a trait object needs boxed futures, which
//! is what `#[async_trait]` writes for us.)

use std::future::Future;

use axum::http::Extensions;

use crate::error::Result;
use crate::layer::LayerEvent;
use crate::socket::{Frame, Socket};

pub use crate::budget::TooFast;

/// The largest message a consumer accepts unless it says otherwise: 64 KiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 * 1024;

/// Handles one WebSocket connection: one value per connected client.
///
/// Implement the lifecycle methods with `async fn`; the runner calls them in
/// order and never concurrently, so `&mut self` is all the state you need.
pub trait Consumer: Sized + Send + 'static {
    /// Messages this consumer takes from a channel layer, as a `serde` enum
    /// tagged by `"type"` and marked [`LayerEvent`]. A consumer that uses no
    /// layer says [`NoEvents`].
    type Event: LayerEvent;

    /// The largest text or binary message accepted, in bytes. A larger one
    /// closes the connection with code 1009 and a reason that says the limit.
    const MAX_MESSAGE_SIZE: usize = DEFAULT_MAX_MESSAGE_SIZE;

    /// The alias of the channel layer this consumer uses, if any (see
    /// [`Layers`](crate::layer::Layers)). With a layer, each connection gets
    /// a channel of its own, and [`event`](Consumer::event) receives what
    /// arrives on it.
    const LAYER: Option<&'static str> = None;

    /// Whether a failed layer call during a layer outage (Redis away) ends
    /// the connection. By default it does not: a `group_send(..)?` that
    /// fails while Redis restarts is logged by the layer (once per outage)
    /// and the client stays connected, so a short blip does not turn into
    /// every client reconnecting at once. Say `true` for a consumer that is
    /// of no use without its layer.
    const CLOSE_ON_LAYER_OUTAGE: bool = false;

    /// Builds the consumer for one connection from its request.
    fn new(scope: &Scope) -> Self;

    /// Groups to join before [`connect`](Consumer::connect) and to leave
    /// after [`disconnect`](Consumer::disconnect). Joining first means the
    /// consumer hears everything said in its groups from the very start,
    /// including its own announcement. While the connection lives, the
    /// runner renews these memberships well before the layer would let them
    /// lapse.
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
    ///
    /// Nothing can be sent *to the client* any more: `send_text` and friends
    /// return [`Error::Closed`](crate::Error::Closed). The channel layer is
    /// still attached until this returns, so this is the place to tell the
    /// others (`socket.group_send(...)`, e.g. "someone left") and to clean
    /// up. The declared [`groups`](Consumer::groups) are left right after.
    fn disconnect(&mut self, socket: &mut Socket, code: u16) -> impl Future<Output = ()> + Send {
        let _ = (socket, code);
        async {}
    }

    /// The client sent more than its
    /// [`InboundBudget`](crate::settings::InboundBudget) allows; the frame
    /// that went over is dropped. By default the connection is closed with
    /// 1008 and a reason that says the limit. A consumer that would rather
    /// warn can send an error frame instead and return without closing:
    /// the runner then stops reading from this client until its budget has
    /// refilled (`too_fast.wait`), while the layer's messages still flow.
    fn too_fast(
        &mut self,
        socket: &mut Socket,
        too_fast: TooFast,
    ) -> impl Future<Output = Result<()>> + Send {
        close_too_fast(socket, too_fast)
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
/// It has no values, so no message can ever be decoded into it, and none can
/// be sent.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum NoEvents {}

impl LayerEvent for NoEvents {}

/// What a consumer knows about the request that opened its connection.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    path: String,
    query: Option<String>,
    params: Vec<(String, String)>,
    /// The request's extensions: what the app shares with its consumers
    /// through axum's `Extension` (see [`Scope::extension`]).
    extensions: Extensions,
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

    /// Sets the query string (without its `?`), as the router would.
    pub fn with_query(mut self, query: Option<String>) -> Self {
        self.query = query;
        self
    }

    /// Sets the request's extensions, as the runner does.
    pub fn with_extensions(mut self, extensions: Extensions) -> Self {
        self.extensions = extensions;
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

    /// A value the app shares with its consumers, such as a job queue or a
    /// database pool, or `None` if the app shares none of type `T`.
    ///
    /// A consumer is built by the library, so it cannot be handed such
    /// things as arguments. The app adds them to its router with axum's
    /// [`Extension`](axum::Extension) instead, and every request, the
    /// WebSocket handshake included, carries a copy:
    ///
    /// ```
    /// use axum::{Extension, Router};
    /// use axum_channels::Scope;
    ///
    /// #[derive(Clone)]
    /// struct Greeting(&'static str);
    ///
    /// // In the app: `Router::new().route(...).layer(Extension(Greeting("hi")))`.
    /// # let _: Router = Router::new().layer(Extension(Greeting("hi")));
    /// // In `Consumer::new`, which the runner hands the request's scope:
    /// # let mut extensions = axum::http::Extensions::new();
    /// # extensions.insert(Greeting("hi"));
    /// # let scope = Scope::new("/ws/hello").with_extensions(extensions);
    /// let greeting = scope.extension::<Greeting>().map(|g| g.0);
    /// assert_eq!(greeting, Some("hi"));
    /// ```
    pub fn extension<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.extensions.get::<T>()
    }
}

/// What [`Consumer::too_fast`] does by default: close with 1008 and a
/// reason that says the limit.
pub(crate) async fn close_too_fast(socket: &mut Socket, too_fast: TooFast) -> Result<()> {
    socket
        .close(crate::close_code::POLICY_VIOLATION, &too_fast.to_string())
        .await
}
