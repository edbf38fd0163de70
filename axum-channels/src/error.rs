//! The error type shared by consumers and the runner.
//!
//! A consumer's methods return [`Result`], so `?` works on every socket call.
//! The variants are few on purpose: each one tells the runner what to do next.
//! A closed socket ends the connection quietly (the peer is gone; there is no
//! one left to tell), while any other error is logged once and the connection
//! is closed with code 1011. Either way only this one connection is affected.

use std::fmt;

use crate::layer::LayerError;

/// What can go wrong while a consumer handles its connection.
///
/// `#[non_exhaustive]`: a match on it needs a `_` arm. Where another error
/// caused this one (a layer's, serde_json's),
/// [`source`](std::error::Error::source) returns it.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The WebSocket is closed (by the peer, or by [`Socket::close`]), so
    /// nothing more can be sent on it.
    ///
    /// [`Socket::close`]: crate::Socket::close
    Closed,
    /// The consumer tried to send before calling [`Socket::accept`].
    ///
    /// [`Socket::accept`]: crate::Socket::accept
    NotAccepted,
    /// The consumer used a channel-layer call but has no layer (its
    /// `Consumer::LAYER` is `None`).
    NoLayer,
    /// The channel layer refused or failed.
    Layer(LayerError),
    /// A value could not be encoded to JSON or decoded from it (`?` on a
    /// `serde_json` call). Handled as [`Other`](Error::Other) is.
    Json(serde_json::Error),
    /// Any other failure, described for the log.
    Other(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Closed => f.write_str("the WebSocket is closed"),
            Error::NotAccepted => f.write_str(
                "cannot send before the connection is accepted: call `socket.accept()` first",
            ),
            Error::NoLayer => f.write_str(
                "this consumer has no channel layer: set `const LAYER` and route it with `layers.route()`",
            ),
            Error::Layer(err) => err.fmt(f),
            Error::Json(err) => write!(f, "JSON error: {err}"),
            Error::Other(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Layer(err) => Some(err),
            Error::Json(err) => Some(err),
            _ => None,
        }
    }
}

impl From<LayerError> for Error {
    fn from(err: LayerError) -> Self {
        Error::Layer(err)
    }
}

impl From<serde_json::Error> for Error {
    fn from(err: serde_json::Error) -> Self {
        Error::Json(err)
    }
}
