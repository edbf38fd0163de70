//! [`RedisConfig`]: what both Redis layers are built from, with the Python
//! layers' defaults, and the checks that refuse a bad configuration at start.
//!
//! Every duration and size has a range, checked by
//! [`RedisConfig::validate`] before a layer connects: that keeps each
//! deadline, purge cut-off and `EXPIRE` the layers compute from them within
//! what the clocks, the integers and Redis can hold.

use std::time::Duration;

use crate::layer::{LayerError, MAX_EXPIRY, names};

/// Settings of [`RedisLayer`](super::RedisLayer) and
/// [`RedisPubSubLayer`](super::RedisPubSubLayer).
///
/// The defaults are those of the Python layers (`channels_redis`,
/// `fast-channels`), so a Rust and a Python process that leave them alone
/// agree on the wire. A Python peer must use the same `hosts` (in the same
/// order), `prefix`, `expiry`, `group_expiry` and capacities, and its
/// defaults for the serializer (msgpack), the random prefix length (12) and
/// encryption (none).
///
/// The settings marked *Rust only* have no Python counterpart and do not
/// change what is on the wire.
///
/// Durations on the wire are whole seconds: Python passes `int(expiry)`, so
/// fractions are dropped here too (and a duration under one second is
/// refused, since Redis would read it as 0).
///
/// Ranges (see [`validate`](Self::validate)): `expiry` and `group_expiry`
/// from 1 s to [`MAX_EXPIRY`] (10 years); `block_timeout` from 1 s, and
/// `command_timeout` from 1 ms, to [`MAX_TIMEOUT`] (1 hour); capacities at
/// least 1; `max_message_size` from 1 byte to [`MAX_MESSAGE_SIZE_LIMIT`]
/// (512 MiB, the most Redis stores in one value).
///
/// `#[non_exhaustive]`: build it with [`new`](Self::new) (or `Default`)
/// and change what you need, with the `with_*` methods or by assigning
/// fields:
///
/// ```
/// # use std::time::Duration;
/// # use axum_channels::layer::redis::RedisConfig;
/// let config = RedisConfig::new("redis://127.0.0.1:6379")
///     .with_prefix("queue")
///     .with_expiry(Duration::from_secs(900))
///     .with_capacity(1000);
/// # assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisConfig {
    /// Redis URLs, one per shard, e.g. `redis://127.0.0.1:6379/0` (default:
    /// `redis://localhost:6379`, as in Python). With several hosts, names are
    /// spread over them with Python's consistent hash, so every process must
    /// list the same hosts in the same order.
    pub hosts: Vec<String>,
    /// Put in front of every Redis key or channel name (default `"asgi"`).
    /// Two layers on one Redis with different prefixes never see each
    /// other's messages; pick prefixes where neither starts with the other
    /// (see `flush`).
    pub prefix: String,
    /// How long a message waits to be received before it is dropped
    /// (default 60 s). Queue layer only.
    pub expiry: Duration,
    /// How long a group membership lasts unless renewed (default one day).
    /// Queue layer only; the runner renews live connections' memberships.
    pub group_expiry: Duration,
    /// Messages a channel may hold (default 100). Queue layer: the limit on
    /// the channel's key in Redis (`send` fails with `ChannelFull`,
    /// `group_send` skips that member). Both layers: the limit on the local
    /// buffer of each channel.
    pub capacity: usize,
    /// Capacity for channels whose name matches a pattern, first match wins.
    /// Patterns are Python's `fnmatch` globs, as in memory: `*` (any run of
    /// characters), `?` (one character) and `[...]` / `[!...]` (a character
    /// class), e.g. `("background-jobs*", 1000)`.
    pub channel_capacity: Vec<(String, usize)>,
    /// *Rust only.* How long one blocking pop (`BZPOPMIN`) waits before it is
    /// issued again (default 5 s, Python's `brpop_timeout`). Whole seconds,
    /// at least 1. Shorter means a closed channel's popper stops sooner;
    /// longer means fewer idle round trips. Queue layer only.
    pub block_timeout: Duration,
    /// *Rust only.* The longest any layer call may take (default 2 s). When
    /// Redis is away or does not answer, calls fail with
    /// [`LayerError::Backend`] within this time instead of hanging.
    pub command_timeout: Duration,
    /// *Rust only.* The largest encoded message, in bytes (default 1 MiB).
    /// A bigger message is refused with [`LayerError::MessageTooLarge`];
    /// a bigger payload from a peer is dropped with one log line.
    pub max_message_size: usize,
}

/// The default [`RedisConfig::max_message_size`]: 1 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1024 * 1024;

/// The largest [`RedisConfig::max_message_size`]: 512 MiB, Redis's own
/// limit on one string (`proto-max-bulk-len`).
pub const MAX_MESSAGE_SIZE_LIMIT: usize = 512 * 1024 * 1024;

/// The longest [`RedisConfig::block_timeout`] and
/// [`RedisConfig::command_timeout`]: one hour.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60 * 60);

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            hosts: vec!["redis://localhost:6379".to_owned()],
            prefix: "asgi".to_owned(),
            expiry: Duration::from_secs(60),
            group_expiry: Duration::from_secs(24 * 60 * 60),
            capacity: 100,
            channel_capacity: Vec::new(),
            block_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(2),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }
}

setters!(RedisConfig {
    with_hosts(hosts: Vec<String>),
    with_expiry(expiry: Duration),
    with_group_expiry(group_expiry: Duration),
    with_capacity(capacity: usize),
    with_block_timeout(block_timeout: Duration),
    with_command_timeout(command_timeout: Duration),
    with_max_message_size(max_message_size: usize),
});

impl RedisConfig {
    /// The defaults, on one Redis at `url` (e.g. from `REDIS_URL`).
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            hosts: vec![url.into()],
            ..RedisConfig::default()
        }
    }

    /// Sets [`prefix`](Self::prefix) and returns the configuration.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Adds a capacity for the channels whose names match `pattern`, after
    /// the patterns already there (see
    /// [`channel_capacity`](Self::channel_capacity)).
    #[must_use]
    pub fn with_channel_capacity(mut self, pattern: impl Into<String>, capacity: usize) -> Self {
        self.channel_capacity.push((pattern.into(), capacity));
        self
    }

    /// The capacity of `channel`: the first matching pattern's, or
    /// [`capacity`](Self::capacity).
    pub fn capacity_of(&self, channel: &str) -> usize {
        names::capacity_of(&self.channel_capacity, self.capacity, channel)
    }

    /// `expiry` in the whole seconds the wire uses.
    pub(crate) fn expiry_secs(&self) -> u64 {
        self.expiry.as_secs()
    }

    /// `group_expiry` in the whole seconds the wire uses.
    pub(crate) fn group_expiry_secs(&self) -> u64 {
        self.group_expiry.as_secs()
    }

    /// `block_timeout` in the whole seconds `BZPOPMIN` takes on Redis 5.
    pub(crate) fn block_secs(&self) -> u64 {
        self.block_timeout.as_secs().max(1)
    }

    /// Checks every setting against its range (see [`RedisConfig`]),
    /// without connecting: [`LayerError::InvalidConfig`] naming the first
    /// setting outside it, e.g. "group_expiry must be between 1 s and 10
    /// years, not 0ns". Both layers' `connect` call it first.
    pub fn validate(&self) -> Result<(), LayerError> {
        let invalid = |field, reason: String| Err(LayerError::invalid_config(field, reason));
        if self.hosts.is_empty() {
            return invalid("hosts", "is empty: give at least one redis:// URL".into());
        }
        // The wire counts whole seconds, so a second is the least that is
        // not read as 0.
        for (field, value, max, max_text) in [
            ("expiry", self.expiry, MAX_EXPIRY, "10 years"),
            ("group_expiry", self.group_expiry, MAX_EXPIRY, "10 years"),
            ("block_timeout", self.block_timeout, MAX_TIMEOUT, "1 hour"),
        ] {
            if !(Duration::from_secs(1)..=max).contains(&value) {
                return invalid(
                    field,
                    format!("must be between 1 s and {max_text}, not {value:?}"),
                );
            }
        }
        if !(Duration::from_millis(1)..=MAX_TIMEOUT).contains(&self.command_timeout) {
            return invalid(
                "command_timeout",
                format!(
                    "must be between 1 ms and 1 hour, not {:?}",
                    self.command_timeout
                ),
            );
        }
        if self.capacity == 0 {
            return invalid("capacity", "must be at least 1, not 0".into());
        }
        if let Some((pattern, _)) = self.channel_capacity.iter().find(|(_, c)| *c == 0) {
            return invalid(
                "channel_capacity",
                format!("of {pattern:?} must be at least 1, not 0"),
            );
        }
        if !(1..=MAX_MESSAGE_SIZE_LIMIT).contains(&self.max_message_size) {
            return invalid(
                "max_message_size",
                format!(
                    "must be between 1 byte and 512 MiB, not {} bytes",
                    self.max_message_size
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_pattern_wins() {
        let config = RedisConfig {
            capacity: 5,
            channel_capacity: vec![("jobs*".into(), 3), ("jobs.urgent".into(), 1)],
            ..RedisConfig::default()
        };
        assert_eq!(config.capacity_of("jobs.urgent"), 3);
        assert_eq!(config.capacity_of("jobs"), 3);
        assert_eq!(config.capacity_of("chat"), 5);
    }

    #[test]
    fn bad_settings_are_refused_with_a_reason() {
        let cases = [
            RedisConfig {
                hosts: vec![],
                ..RedisConfig::default()
            },
            RedisConfig {
                expiry: Duration::from_millis(500),
                ..RedisConfig::default()
            },
            RedisConfig {
                capacity: 0,
                ..RedisConfig::default()
            },
        ];
        for (config, field) in cases.into_iter().zip(["hosts", "expiry", "capacity"]) {
            let err = config.validate().unwrap_err();
            assert!(
                matches!(&err, LayerError::InvalidConfig { field: f, .. } if *f == field),
                "{err}"
            );
            assert!(!err.is_outage());
            let text = err.to_string();
            assert!(
                text.starts_with(&format!("invalid channel layer configuration: {field} ")),
                "{text}"
            );
        }
        assert!(RedisConfig::new("redis://127.0.0.1:1").validate().is_ok());
    }
}
