//! Django-Channels-style consumers for [axum].
//!
//! A WebSocket connection is handled by a *consumer*: a plain struct, one
//! instance per connection, with three lifecycle methods. You write what each
//! one does; this crate runs them in the right order and takes care of the
//! WebSocket protocol around them.
//!
//! ```text
//!   client            axum-channels                     your consumer
//!   ──────            ─────────────                     ─────────────
//!   GET /ws/… ──────▶ Consumer::new(&scope) ──────────▶ build the state
//!                     connect(&mut socket)  ──────────▶ socket.accept()
//!   ◀──── 101 ─────── (handshake answered only now)
//!   text/binary ────▶ receive(&mut socket, frame) ────▶ socket.send_text(…)
//!   close / drop ───▶ disconnect(&mut socket, code) ──▶ clean up
//! ```
//!
//! A tour of the modules, in the order they depend on each other (each one
//! uses only those above it):
//!
//! - [`layer`]: channel layers, which let consumers talk to each other: the
//!   [`ChannelLayer`](layer::ChannelLayer) trait, the in-memory backend, the
//!   Redis backends (`layer::redis`, feature `redis`, wire-compatible with
//!   the Python layers), [`Layers`](layer::Layers) (the app's layers by
//!   alias), and [`LayerError`](layer::LayerError), the layers' own error
//!   type.
//! - [`error`]: [`Error`], what a consumer's methods return, and why it has
//!   so few variants.
//! - [`origin`]: the origin check against cross-site WebSocket hijacking,
//!   which refuses what it cannot parse.
//! - [`settings`]: [`Settings`], what a server on the internet needs (small
//!   buffers, pings, timeouts, an origin check, an inbound budget,
//!   connection limits), with safe defaults, checked when they are read.
//! - [`runtime`]: [`Runtime`], what every connection of one process shares
//!   (the connection limit, the shutdown, the tasks to wait for), handed to
//!   the routes explicitly, in each request.
//! - `membership` (internal): the drop guard that owns a connection's
//!   channel and groups, so that whatever way a connection ends, even a
//!   handshake cut off halfway, what it held in the layer is given back.
//! - [`socket`]: the [`Socket`] handle a consumer uses to accept, send and
//!   close, and to talk to its channel layer; and [`Frame`], a message from
//!   the client.
//! - [`consumer`]: the [`Consumer`] trait you implement. Start here.
//! - [`room`]: presence and history for rooms: who is here across every
//!   server (heartbeated entries, batched diffs), the room's last messages,
//!   and recovery of what a reconnecting client missed.
//! - [`json`]: [`JsonConsumer`], a consumer whose client sends JSON of one
//!   shape, decoded for you, with a clear error frame for anything else.
//! - [`runner`]: [`route()`], which turns a consumer type into an axum
//!   route, and the machinery that drives one consumer per connection: its
//!   `connect` in a task the client cannot cancel, its inbound budget, its
//!   deadlines.
//! - `http` (internal): the accept loop under [`serve()`], with a header
//!   read timeout and a cap on open sockets below the open-file limit.
//! - [`server`]: [`serve()`], which serves an app until Ctrl+C or SIGTERM,
//!   with a header timeout and a cap on open sockets, and then closes every
//!   WebSocket politely, within one deadline.
//! - [`close_code`]: the WebSocket close codes this crate uses, by name.
//! - `testing` (feature `testing`): what you need to test your consumers:
//!   `TestServer`, which serves a `Router` on a free port in the test's own
//!   runtime, and `TestClient`s that record a readable `Transcript` of what
//!   was said, for snapshot tests. It starts no process. The harnesses
//!   that run real programs beside a test (a server binary, a throwaway
//!   `redis-server`, nginx, the Python layers) are this repository's own,
//!   in the unpublished workspace crate `channels-testkit`.
//!
//! # Example
//!
//! ```
//! use axum::Router;
//! use axum_channels::{route, Consumer, Frame, NoEvents, Result, Scope, Socket};
//!
//! struct Shout;
//!
//! impl Consumer for Shout {
//!     type Event = NoEvents;
//!
//!     fn new(_scope: &Scope) -> Self {
//!         Shout
//!     }
//!
//!     async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
//!         socket.accept().await
//!     }
//!
//!     async fn receive(&mut self, socket: &mut Socket, frame: Frame) -> Result<()> {
//!         if let Frame::Text(text) = frame {
//!             socket.send_text(text.to_uppercase()).await?;
//!         }
//!         Ok(())
//!     }
//! }
//!
//! let app: Router = Router::new().route("/ws/shout", route::<Shout>());
//! ```

#[macro_use]
mod setters;

mod budget;
pub mod consumer;
pub mod error;
pub(crate) mod http;
pub mod json;
pub mod layer;
mod membership;
pub mod origin;
pub mod room;
pub mod runner;
pub mod runtime;
pub mod server;
pub mod settings;
pub mod socket;
#[cfg(feature = "testing")]
pub mod testing;

pub use consumer::{Consumer, DEFAULT_MAX_MESSAGE_SIZE, NoEvents, Scope, TooFast};
pub use error::{Error, Result};
pub use json::{InvalidMessage, JsonConsumer};
pub use layer::LayerEvent;
pub use runner::{route, route_with};
pub use runtime::Runtime;
pub use server::serve;
pub use settings::{ConnectionSettings, InboundBudget, Settings};
pub use socket::{Frame, Socket};

/// WebSocket close codes used by this crate, named so that logs and tests
/// read as words rather than numbers (RFC 6455, section 7.4.1).
pub mod close_code {
    /// The purpose of the connection has been fulfilled.
    pub const NORMAL: u16 = 1000;
    /// The peer sent something the protocol forbids.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// The peer sent a close frame without a code.
    pub const NO_STATUS: u16 = 1005;
    /// The endpoint is going away: the server is shutting down, or the
    /// browser left the page.
    pub const GOING_AWAY: u16 = 1001;
    /// The connection ended without a close frame (the client vanished).
    pub const ABNORMAL: u16 = 1006;
    /// A text frame was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// The peer broke a rule of this server, e.g. it stopped reading.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A message was larger than the consumer accepts.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The server hit an error it could not recover from for this connection.
    pub const INTERNAL_ERROR: u16 = 1011;
}
