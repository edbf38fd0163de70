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
//! Backends:
//! - [`InMemoryLayer`] ([`memory`]): inside one process, with no services
//!   at all. The default of every step.
//!
//! [`Layers`] holds the layers an app uses under short aliases (`"chat"`,
//! `"queue"`, ...), built once at start.

pub mod memory;
mod names;
mod registry;

use std::fmt;

use async_trait::async_trait;

pub use memory::{InMemoryLayer, MemoryConfig};
pub use names::{MAX_NAME_LENGTH, group_name_for, validate_channel_name, validate_group_name};
pub use registry::Layers;

/// A layer message: a JSON object with a string `"type"` field.
pub type Message = serde_json::Map<String, serde_json::Value>;

/// A place where consumers exchange messages, by channel and by group.
///
/// Every method takes `&self`: a layer is shared by all connections (behind an
/// `Arc`) and does its own locking.
#[async_trait]
pub trait ChannelLayer: Send + Sync + 'static {
    /// A new, unique channel name that starts with `prefix`, for one
    /// consumer to receive on.
    async fn new_channel(&self, prefix: &str) -> Result<String, LayerError>;

    /// Puts `message` in `channel`. Fails with [`LayerError::ChannelFull`]
    /// when the channel already holds its capacity.
    async fn send(&self, channel: &str, message: Message) -> Result<(), LayerError>;

    /// Waits for the next message of `channel`. Cancelling the wait loses
    /// nothing: a message is only taken out when it is returned.
    async fn receive(&self, channel: &str) -> Result<Message, LayerError>;

    /// Adds `channel` to `group` (again, if it was there: that renews its
    /// membership's expiry).
    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError>;

    /// Removes `channel` from `group`.
    async fn group_discard(&self, group: &str, channel: &str) -> Result<(), LayerError>;

    /// Sends `message` to every channel in `group`. A full member channel
    /// misses the message (logged as `ChannelFull`); the others still get it.
    async fn group_send(&self, group: &str, message: Message) -> Result<(), LayerError>;

    /// Drops every message, channel and group.
    async fn flush(&self) -> Result<(), LayerError>;

    /// Frees what the layer still holds for `channel` once nobody will
    /// receive on it again. Not part of Django's API; layers whose messages
    /// expire on their own may leave it as it is.
    async fn close_channel(&self, channel: &str) -> Result<(), LayerError> {
        let _ = channel;
        Ok(())
    }
}

/// Which kind of name broke the naming rules.
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
/// in the caller, and an unknown alias is a configuration mistake to report
/// at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerError {
    /// A channel or group name breaks the rules (see [`validate_channel_name`]).
    InvalidName {
        /// Channel or group.
        kind: NameKind,
        /// The offending name.
        name: String,
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
    /// The backend failed (e.g. its server went away).
    Backend(String),
}

impl fmt::Display for LayerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
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
            LayerError::Backend(message) => write!(f, "channel layer failed: {message}"),
        }
    }
}

impl std::error::Error for LayerError {}
