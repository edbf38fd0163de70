//! Channel layers: how consumers, and other processes, talk to each other.
//!
//! A consumer only hears its own client. A *channel layer* gives every
//! consumer a mailbox, its **channel**, and lets anyone put messages in it.
//! Channels can join **groups**, and a message sent to a group lands in the
//! channel of every member. That is all a chat room needs: each connection
//! joins the room's group, and whatever one of them sends to the group, all of
//! them receive.
//!
//! The [`ChannelLayer`] trait has the semantics of Django Channels' layers, so
//! its vocabulary (`send`, `receive`, `group_add`, `group_send`, ...) carries
//! over, and so does the shape of a message: a JSON object whose `"type"`
//! field says what it is, e.g. `{"type": "room_message", "message": "hi"}`.
//! Such a message can cross Redis to a Python peer unchanged.
//!
//! (A *channel layer* has nothing to do with axum's `Router::layer` or
//! tower's `Layer`, which wrap a service in middleware. The name comes from
//! Django Channels, where it means the shared mailroom described here.)
//!
//! Backends:
//! - [`InMemoryLayer`] ([`memory`]): inside one process, with no services
//!   at all. The default of every step.
//! - `RedisPubSubLayer` and `RedisLayer` (`redis`, behind the cargo feature
//!   `redis`): on Redis, shared by several processes, and wire-compatible
//!   with the Python layers of channels_redis and fast-channels.
//!
//! [`Layers`] holds the layers an app uses under short aliases (`"chat"`,
//! `"queue"`, ...), built once at start.
//!
//! # Why the layers are not a crate of their own (yet)
//!
//! Nothing in this module uses axum, hyper or tungstenite: it needs tokio,
//! serde, `redis` and `metrics`, and the rest of the crate depends on it,
//! never the other way round (only [`Error`](crate::Error) wraps a
//! [`LayerError`]). It could be a crate of its own, and a program that only
//! talks to the layers (a job worker, an external sender, a Rust service
//! beside a Python app) would then build without axum and hyper: a shorter
//! first build, fewer dependencies to audit, and a semver boundary between
//! the wire-compatible layers and the WebSocket runner. We decided against
//! splitting it now. In this repository nobody would gain: the steps'
//! workers and external senders are binaries of the same package as their
//! server, so axum is built for them anyway. A second crate would cost the
//! tutorial a name to learn, a dependency line in every step, documentation
//! split over two crates whose links cross, and two versions to keep in
//! step. If a user of the layers alone appears, the split is mechanical:
//! move `layer/` into a crate (say `channels-layer`) and re-export it here
//! as `axum_channels::layer`, so no step's code changes. The middle way,
//! should the build time matter first, is a default-on cargo feature
//! (`server`) gating the axum half of this crate, so that
//! `default-features = false, features = ["redis"]` builds the layers
//! alone.

mod buffers;
pub(crate) use buffers::Locked;
mod episode;
pub mod memory;
mod names;
#[cfg(feature = "redis")]
pub mod redis;
mod registry;

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use memory::{InMemoryLayer, MemoryConfig};
pub use names::{
    GROUP_MARKER, MAX_NAME_LENGTH, group_name_for, validate_channel_name, validate_group_name,
};
pub use registry::Layers;

/// The longest `expiry` or `group_expiry` any layer accepts: 10 years (of
/// 365 days). Far beyond any real use, and far inside what clocks and
/// Redis's `EXPIRE` can count, so no deadline computed from it overflows.
pub const MAX_EXPIRY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// What travels through a layer: a JSON object with a string `"type"`
/// field, e.g. `{"type": "room_message", "message": "hi"}`. (Not to be
/// confused with a WebSocket message, which only ever goes to one client.)
pub type LayerMessage = serde_json::Map<String, Value>;

/// A Rust type that may be sent through a channel layer: an event enum (or
/// struct) that `serde` turns into an object with a `"type"` field.
///
/// ```
/// use axum_channels::layer::LayerEvent;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// #[serde(tag = "type", rename_all = "snake_case")]
/// enum RoomEvent {
///     RoomMessage { message: String },
/// }
///
/// impl LayerEvent for RoomEvent {}
/// ```
///
/// What is checked when:
/// - **at compile time**: only types marked `LayerEvent` can be sent with
///   [`Socket::group_send`](crate::Socket::group_send) and
///   [`Socket::send_to`](crate::Socket::send_to), so a string or a value of
///   the wrong type is a compile error, and so is a misspelt variant;
/// - **at run time**, on every send: that the value really serializes to an
///   object with a string `"type"`. A type marked `LayerEvent` without
///   `#[serde(tag = "type")]` fails there with [`LayerError::NotAnEvent`],
///   and nothing is sent.
///
/// A consumer's [`Event`](crate::Consumer::Event) type must be a
/// `LayerEvent`, so what it receives is also what it can send. Anything
/// else is refused by the compiler:
///
/// ```compile_fail
/// # async fn demo(socket: &mut axum_channels::Socket) -> axum_channels::Result<()> {
/// socket.group_send("room_general", &"hi").await // `&str` is not a LayerEvent
/// # }
/// ```
pub trait LayerEvent: Serialize + DeserializeOwned + Send + 'static {}

/// Serializes `event` into a [`LayerMessage`], checking that it has the
/// string `"type"` a receiving consumer dispatches on.
pub fn to_layer_message<E: Serialize + ?Sized>(event: &E) -> Result<LayerMessage, LayerError> {
    match serde_json::to_value(event) {
        Ok(Value::Object(map)) if map.get("type").is_some_and(Value::is_string) => Ok(map),
        Ok(_) => Err(LayerError::NotAnEvent {
            type_name: std::any::type_name::<E>(),
        }),
        Err(err) => Err(LayerError::serialize_with(
            format!("a {} could not be serialized", std::any::type_name::<E>()),
            err,
        )),
    }
}

/// A place where consumers exchange messages, by channel and by group.
///
/// Every method takes `&self`: a layer is shared by all connections (behind an
/// `Arc`) and does its own locking.
///
/// The trait uses `#[async_trait]` because apps hold their layers as
/// `Arc<dyn ChannelLayer>`: one `Layers` registry holds backends of
/// different types, chosen at start from the configuration. A trait object
/// needs every method's future to have one known type, so `#[async_trait]`
/// boxes them (`Pin<Box<dyn Future + Send>>`). The cost, one allocation per
/// call, is small next to a layer's own work. ([`Consumer`](crate::Consumer)
/// needs none of this: it is only ever used as a generic type.)
#[async_trait]
pub trait ChannelLayer: Send + Sync + 'static {
    /// A new, unique channel name that starts with `prefix`, for one
    /// consumer to receive on.
    async fn new_channel(&self, prefix: &str) -> Result<String, LayerError>;

    /// Puts `message` in `channel`. Fails with [`LayerError::ChannelFull`]
    /// when the channel already holds its capacity.
    ///
    /// On the Redis queue layer, capacity is counted per Redis key, and all
    /// the channels one layer makes with `new_channel` in a process share
    /// one key (channels_redis's wire format): they reach `ChannelFull`
    /// together, and a channel whose neighbours keep the process popping may
    /// have messages its senders got `Ok` for dropped from its local buffer,
    /// oldest first, counted in `axum_channels_queue_buffer_dropped_total`.
    async fn send(&self, channel: &str, message: LayerMessage) -> Result<(), LayerError>;

    /// Waits for the next message of `channel`. Cancelling the wait loses
    /// nothing: a message is only taken out when it is returned.
    async fn receive(&self, channel: &str) -> Result<LayerMessage, LayerError>;

    /// [`receive`](ChannelLayer::receive), with the message as the layer
    /// holds it. A group message is one copy shared by every member's
    /// channel: the runner reads each member's event out of that copy,
    /// where `receive` would first copy the whole message for every member
    /// but the last. The default wraps what `receive` returns; the layers of
    /// this crate hand over their shared copy.
    async fn receive_shared(&self, channel: &str) -> Result<Arc<LayerMessage>, LayerError> {
        self.receive(channel).await.map(Arc::new)
    }

    /// The next message of `channel` if one is already waiting in this
    /// process, without waiting; `None` if there is none (or the layer
    /// cannot tell without waiting). It takes a message out exactly as
    /// [`receive`](ChannelLayer::receive) would, so the two can be mixed.
    ///
    /// The runner uses it to hand a consumer, in one turn, the messages
    /// that arrived while it was busy, without waiting on the client, the
    /// timers and the layer again for each one. The default always says
    /// `None`: a layer that keeps it is read through `receive` alone, one
    /// message per turn.
    fn try_receive(&self, channel: &str) -> Option<Arc<LayerMessage>> {
        let _ = channel;
        None
    }

    /// Adds `channel` to `group` (again, if it was there: that renews its
    /// membership's expiry). A layer whose memberships live in this process
    /// (pub/sub) takes only a channel it holds (made by its `new_channel`,
    /// or received on here), and refuses any other with
    /// [`LayerError::NotLocal`], as Python's does.
    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError>;

    /// Removes `channel` from `group`.
    async fn group_discard(&self, group: &str, channel: &str) -> Result<(), LayerError>;

    /// Sends `message` to every channel in `group`. A full member channel
    /// misses the message (logged as `ChannelFull`); the others still get it.
    async fn group_send(&self, group: &str, message: LayerMessage) -> Result<(), LayerError>;

    /// Drops every message, channel and group.
    async fn flush(&self) -> Result<(), LayerError>;

    /// Frees what the layer still holds for `channel` once nobody will
    /// receive on it again. Not part of Django's API; layers whose messages
    /// expire on their own may leave it as it is.
    async fn close_channel(&self, channel: &str) -> Result<(), LayerError> {
        let _ = channel;
        Ok(())
    }

    /// How long a group membership lasts unless it is renewed by another
    /// [`group_add`](ChannelLayer::group_add), or `None` if memberships
    /// never lapse. The runner renews a live consumer's memberships at half
    /// this interval.
    fn group_expiry(&self) -> Option<Duration> {
        None
    }
}

/// Which kind of name broke the naming rules. Deliberately exhaustive: a
/// layer names channels and groups, and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A channel name.
    Channel,
    /// A group name.
    Group,
}

/// What can go wrong in a channel layer.
///
/// A typed error rather than a string, because callers react differently:
/// a full channel is routine under load (drop and log), a bad name is a bug
/// in the caller, an unknown alias or a bad setting is a configuration
/// mistake to report at start, and a backend failure is an outage to wait
/// out ([`is_outage`](LayerError::is_outage)).
///
/// `#[non_exhaustive]`: a match on it needs a `_` arm, so that a new kind
/// of failure is not a breaking change. Where another error caused this
/// one (Redis's, serde's), [`source`](std::error::Error::source) returns
/// it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LayerError {
    /// A channel or group name breaks the rules (see [`validate_channel_name`]):
    /// Django's, or ours that a channel name may not hold [`GROUP_MARKER`].
    InvalidName {
        /// Channel or group.
        kind: NameKind,
        /// The offending name.
        name: String,
    },
    /// `group_add` of a channel that has no buffer in this process, on a
    /// layer whose memberships are local (pub/sub): nothing here would ever
    /// receive its group messages, nor free them.
    NotLocal {
        /// The channel that was to join.
        channel: String,
        /// The group it was to join.
        group: String,
    },
    /// `receive` on a process-specific channel that another layer instance
    /// made (the queue layer): its messages are popped by that instance's
    /// process, so nothing would ever arrive here.
    ForeignChannel {
        /// The channel received on.
        channel: String,
    },
    /// The channel holds as many messages as its capacity allows.
    ChannelFull {
        /// The full channel.
        channel: String,
    },
    /// No layer is registered under this alias.
    UnknownAlias {
        /// The alias asked for.
        alias: String,
        /// The aliases that are registered.
        known: Vec<String>,
    },
    /// A value sent through a layer did not serialize to a JSON object with
    /// a string `"type"` (see [`LayerEvent`]).
    NotAnEvent {
        /// The Rust type that was sent.
        type_name: &'static str,
    },
    /// A value could not be serialized, or a payload from a peer could not
    /// be read (e.g. another serializer).
    Serialize {
        /// What could not be encoded or decoded, and why.
        message: String,
        /// The serializer's own error, where there is one (serde_json's,
        /// rmpv's); also the error's [`source`](std::error::Error::source).
        source: Option<Arc<dyn StdError + Send + Sync>>,
    },
    /// An encoded message is larger than the layer accepts (e.g. the Redis
    /// layers' `max_message_size`, 1 MiB by default).
    MessageTooLarge {
        /// The encoded size, in bytes.
        size: usize,
        /// The largest size allowed.
        limit: usize,
    },
    /// A setting of the layer's configuration is out of range; refused
    /// when the layer is built.
    InvalidConfig {
        /// The setting, e.g. `group_expiry`.
        field: &'static str,
        /// What is wrong with it, e.g. `must be between 1 s and 10 years, not 0ns`.
        reason: String,
    },
    /// The backend failed (e.g. its server went away), with the error that
    /// says why as its [`source`](std::error::Error::source).
    Backend(BackendError),
}

impl LayerError {
    /// True for a backend outage (Redis away, a timeout), false for a
    /// mistake in the caller's input.
    pub fn is_outage(&self) -> bool {
        matches!(self, LayerError::Backend(_))
    }

    /// A [`LayerError::Serialize`] described by `message` alone.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn serialize(message: impl Into<String>) -> Self {
        LayerError::Serialize {
            message: message.into(),
            source: None,
        }
    }

    /// A [`LayerError::Serialize`] caused by the serializer's `source`.
    pub(crate) fn serialize_with(
        message: impl Into<String>,
        source: impl StdError + Send + Sync + 'static,
    ) -> Self {
        LayerError::Serialize {
            message: message.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// A [`LayerError::InvalidConfig`] for `field`.
    pub(crate) fn invalid_config(field: &'static str, reason: impl Into<String>) -> Self {
        LayerError::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}

impl From<BackendError> for LayerError {
    fn from(err: BackendError) -> Self {
        LayerError::Backend(err)
    }
}

/// A failure of the layer's backend (Redis unreachable, a command that
/// timed out): an outage the caller may outlive, not a bug in its code.
///
/// It keeps the backend's own error as its
/// [`source`](std::error::Error::source), for callers that want to tell a
/// timeout from a refused connection. Its `Display` shows the message and
/// then the source's, so a log line of it alone (`%err`) says everything.
#[derive(Debug, Clone)]
pub struct BackendError {
    message: String,
    source: Option<Arc<dyn StdError + Send + Sync>>,
}

impl BackendError {
    /// A failure described by `message` alone.
    pub fn new(message: impl Into<String>) -> Self {
        BackendError {
            message: message.into(),
            source: None,
        }
    }

    /// A failure described by `message`, caused by `source`.
    pub fn with_source(
        message: impl Into<String>,
        source: impl StdError + Send + Sync + 'static,
    ) -> Self {
        BackendError {
            message: message.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// What failed, without the source's own message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        write_source(f, self.source.as_deref())
    }
}

impl StdError for BackendError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        as_source(self.source.as_deref())
    }
}

/// `": {source}"`, if there is a source: the layers' errors show their
/// cause's message after their own, so that one log line says everything.
fn write_source(f: &mut fmt::Formatter<'_>, source: Option<&SharedSource>) -> fmt::Result {
    match source {
        Some(source) => write!(f, ": {source}"),
        None => Ok(()),
    }
}

/// A kept cause as what [`StdError::source`] returns.
fn as_source(source: Option<&SharedSource>) -> Option<&(dyn StdError + 'static)> {
    source.map(|source| source as &(dyn StdError + 'static))
}

/// The cause an error keeps: shared, so that the error stays `Clone`.
type SharedSource = dyn StdError + Send + Sync;

impl fmt::Display for LayerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerError::InvalidName {
                kind: NameKind::Channel,
                name,
            } if names::follows_django_rules(name) => write!(
                f,
                "invalid channel name {name:?}: a channel name may not hold {GROUP_MARKER:?}, \
                 which group channels use ({{prefix}}{GROUP_MARKER}{{group}}): a message sent \
                 to it would reach a group's members"
            ),
            LayerError::InvalidName {
                kind: NameKind::Channel,
                name,
            } => write!(
                f,
                "invalid channel name {name:?}: use ASCII letters, digits, '-', '_' and '.', \
                 with at most one '!', in fewer than {MAX_NAME_LENGTH} characters"
            ),
            LayerError::InvalidName {
                kind: NameKind::Group,
                name,
            } => write!(
                f,
                "invalid group name {name:?}: use ASCII letters, digits, '-', '_' and '.', \
                 in fewer than {MAX_NAME_LENGTH} characters"
            ),
            LayerError::NotLocal { channel, group } => write!(
                f,
                "cannot add channel {channel:?} to group {group:?}: this layer only adds \
                 channels that exist in this process (made by its new_channel, or received \
                 on here), as Python's RedisPubSubChannelLayer does; join with the consumer's \
                 own channel name"
            ),
            LayerError::ForeignChannel { channel } => write!(
                f,
                "cannot receive on {channel:?}: it is a process-specific channel of another \
                 layer instance (receive on names this layer's new_channel made)"
            ),
            LayerError::ChannelFull { channel } => {
                write!(f, "ChannelFull: channel {channel:?} is at capacity")
            }
            LayerError::UnknownAlias { alias, known } => write!(
                f,
                "no channel layer is registered as {alias:?} (registered: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ),
            LayerError::NotAnEvent { type_name } => write!(
                f,
                "a {type_name} is not a layer event: it must serialize to a JSON object \
                 with a string \"type\" field (add #[serde(tag = \"type\")])"
            ),
            LayerError::Serialize { message, source } => {
                write!(f, "cannot encode or decode a layer message: {message}")?;
                write_source(f, source.as_deref())
            }
            LayerError::MessageTooLarge { size, limit } => write!(
                f,
                "a layer message of {size} bytes is over the limit of {limit} bytes"
            ),
            LayerError::InvalidConfig { field, reason } => {
                write!(f, "invalid channel layer configuration: {field} {reason}")
            }
            LayerError::Backend(err) => write!(f, "channel layer failed: {err}"),
        }
    }
}

impl StdError for LayerError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            LayerError::Backend(err) => Some(err),
            LayerError::Serialize { source, .. } => as_source(source.as_deref()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io;

    use super::*;

    /// The first error of type `T` in `err`'s chain of sources.
    fn cause<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
        let mut next = err.source();
        while let Some(source) = next {
            if let Some(found) = source.downcast_ref::<T>() {
                return Some(found);
            }
            next = source.source();
        }
        None
    }

    #[test]
    fn a_backend_failure_keeps_its_cause() {
        let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
        let err = LayerError::from(BackendError::with_source("Redis at h:1", refused));
        assert!(err.is_outage());
        assert_eq!(
            cause::<io::Error>(&err).map(io::Error::kind),
            Some(io::ErrorKind::ConnectionRefused)
        );
        assert_eq!(
            err.to_string(),
            "channel layer failed: Redis at h:1: refused"
        );
        // And through a consumer's error, where `?` puts it.
        assert!(cause::<io::Error>(&crate::Error::from(err)).is_some());
        // No cause is made up where there was none.
        assert!(
            BackendError::new("the layer was dropped")
                .source()
                .is_none()
        );
        let full = LayerError::ChannelFull {
            channel: "c".into(),
        };
        assert!(full.source().is_none());
    }

    #[test]
    fn a_value_that_does_not_serialize_keeps_serdes_error() {
        let tuple_keys = BTreeMap::from([((1, 2), "not a JSON object key")]);
        let err = to_layer_message(&tuple_keys).unwrap_err();
        assert!(matches!(err, LayerError::Serialize { .. }), "{err}");
        assert!(cause::<serde_json::Error>(&err).is_some(), "{err}");
        assert!(
            err.to_string().contains("key must be a string"),
            "the cause's message is in the line: {err}"
        );
        let json = crate::Error::from(serde_json::from_str::<u8>("x").unwrap_err());
        assert!(cause::<serde_json::Error>(&json).is_some(), "{json}");
    }

    /// Nothing listens on port 1: connecting fails at once, and the error
    /// says why with redis's own error as its cause.
    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn a_redis_failure_keeps_redis_error() {
        use ::redis::RedisError;

        use crate::layer::redis::{RedisConfig, RedisLayer, RedisPubSubLayer};

        let config = RedisConfig::new("redis://127.0.0.1:1");
        let queue = RedisLayer::connect(config.clone()).await.err();
        let pubsub = RedisPubSubLayer::connect(config).await.err();
        for err in [queue, pubsub] {
            let err = err.expect("nothing listens on port 1");
            assert!(err.is_outage(), "{err}");
            assert!(cause::<RedisError>(&err).is_some(), "{err:?}");
        }
    }
}
