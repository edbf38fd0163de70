//! Channel layers on Redis (feature `redis`), so that several server
//! processes, worker processes, and Python processes share channels and
//! groups.
//!
//! Two layers, one [`ChannelLayer`](crate::layer::ChannelLayer) trait:
//!
//! | | [`RedisPubSubLayer`] | [`RedisLayer`] (queue) |
//! |---|---|---|
//! | a message | goes to whoever is subscribed at that moment | waits in a Redis sorted set until received |
//! | sent while nobody listens, or while Redis is away | **lost** | kept until `expiry` (while Redis is away: the send fails, with `Backend`) |
//! | capacity | none on the wire (local buffers are bounded) | per channel: `send` fails with `ChannelFull` |
//! | expiry | none | `expiry` for messages, `group_expiry` for memberships (renewed by the runner) |
//! | group membership | in this process only | in Redis, shared by every process |
//! | a plain channel (`worker.jobs`) | a broadcast: every subscribed process gets each message | a work queue: one receiver gets each message |
//! | Redis version | 6.0 or newer (RESP3) | 5.0 or newer (`BZPOPMIN`) |
//!
//! **Which to choose.** Pub/sub for live traffic where a missed message does
//! no harm, because the next one replaces it: chat rooms, notifications,
//! presence. It is the faster of the two and keeps nothing in Redis. The
//! queue layer when a message must survive a moment with no receiver: job
//! results, a consumer that reconnects, a worker that restarts, a burst
//! that a slow consumer works through (up to its capacity).
//!
//! **Interoperating with Python.** Both layers are wire-compatible with
//! `channels_redis` 4.x and `fast-channels` 1.x: a Python `group_send`
//! reaches Rust consumers and the other way round, and so does a `send` to a
//! channel name. The Python side must use the matching layer class
//! (`RedisPubSubChannelLayer` for [`RedisPubSubLayer`],
//! `RedisChannelLayer` for [`RedisLayer`]) with the same `hosts` in the same
//! order, `prefix`, `expiry`, `group_expiry`, `capacity` and
//! `channel_capacity`, and its defaults for `serializer_format` (msgpack),
//! `random_prefix_length` (12) and `symmetric_encryption_keys` (none). A
//! payload in another format is dropped with one log line that says so.
//! With redis-py 8, give the Python queue layer a `socket_timeout` above 5 s
//! (channels_redis#422).
//!
//! **On a Redis Cluster**, [`RedisPubSubLayer::connect_cluster`] uses
//! sharded pub/sub and follows slots that move and masters that fail over
//! (Redis 7.0 or newer), and [`RedisClusterLayer`] is the queue layer with a
//! key layout whose every script touches one slot. A Python peer cannot
//! join either. The book's appendix has a section on both.
//!
//! What these layers do better than channels_redis, without changing the
//! wire: a cancelled `receive` never loses a message, buffers are bounded
//! and freed when a consumer leaves, a send to a specific channel reaches it
//! with several hosts, `flush` uses `SCAN`, receivers drop expired messages,
//! a full channel is one warning per episode, calls fail within
//! [`RedisConfig::command_timeout`] while Redis is away, and everything
//! resumes by itself when it comes back. The book's appendix "Channel layers
//! on Redis" explains each.
//!
//! # Example
//!
//! The layers of the Python tutorial's sandbox: a pub/sub layer for chat and
//! a queue layer for reliable messages, both on the Redis of `REDIS_URL`.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use axum_channels::layer::redis::{RedisConfig, RedisLayer, RedisPubSubLayer};
//! use axum_channels::layer::{LayerError, Layers};
//!
//! async fn layers() -> Result<Layers, LayerError> {
//!     let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
//!     let chat = RedisPubSubLayer::connect(RedisConfig::new(&url).with_prefix("chat")).await?;
//!     let queue = RedisLayer::connect(
//!         RedisConfig::new(&url)
//!             .with_prefix("queue")
//!             .with_expiry(Duration::from_secs(900))
//!             .with_capacity(1000),
//!     )
//!     .await?;
//!     Ok(Layers::new().with("chat", chat).with("queue", queue))
//! }
//! ```
//!
//! The modules: `config` ([`RedisConfig`]), `cluster` (the cluster client,
//! the sharded subscriptions, and the cluster queue layer), `wire` (key names, the
//! consistent hash, the Lua scripts), `codec` (msgpack), `link` (a
//! supervised connection per host, which reports outages and announces
//! reconnections), `host` (the pub/sub layer's object per host: its link,
//! subscriptions, and the batches that keep them in step), `task` (the
//! supervision every background task runs under), `queue` and `pubsub` (the
//! layers). Messages wait for `receive` in the local buffers all layers
//! share (`layer/buffers.rs`).

mod cluster;
mod codec;
mod config;
mod host;
mod link;
mod pubsub;
mod queue;
mod room;
mod task;
mod wire;

use std::future::Future;
use std::time::Duration;

pub use cluster::RedisClusterLayer;
pub use config::{DEFAULT_MAX_MESSAGE_SIZE, MAX_MESSAGE_SIZE_LIMIT, MAX_TIMEOUT, RedisConfig};
pub use link::Reconnected;
pub use pubsub::RedisPubSubLayer;
pub use queue::RedisLayer;
pub use room::{RedisHistory, RedisPresence};
pub use wire::{consistent_hash, non_local_name};

use crate::layer::{BackendError, LayerError};

/// Runs one layer call within `timeout`, so that no call hangs on a Redis
/// that does not answer. A backend failure is a debug line here: the
/// outage itself is reported once per host by its link, and the caller
/// gets the error to decide what else to say.
async fn bounded<T>(
    call: &'static str,
    timeout: Duration,
    work: impl Future<Output = Result<T, LayerError>>,
) -> Result<T, LayerError> {
    let result = match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(elapsed) => Err(BackendError::with_source(
            format!("Redis did not answer within {timeout:?}"),
            elapsed,
        )
        .into()),
    };
    if let Err(LayerError::Backend(err)) = &result {
        tracing::debug!(call, %err, "channel layer call failed");
    }
    result
}
