//! Where the rooms of `/ws/presence/{room_name}` keep who is here and what
//! was said: in this process, or in Redis when `REDIS_URL` is set, like the
//! channel layers (see `layers.rs`).
//!
//! The machinery (heartbeats, batched diffs, streams, recovery) is the
//! library's `axum_channels::room`; this file only picks the backends.

use std::sync::Arc;
use std::time::Duration;

use axum_channels::Runtime;
use axum_channels::layer::redis::{RedisConfig, RedisHistory, RedisPresence};
use axum_channels::layer::{ChannelLayer, LayerError};
use axum_channels::room::{History, Presence};

use crate::config::{Config, redis_hosts};

/// How long a room's history stays in Redis after its last message: a day.
const HISTORY_TTL: Duration = Duration::from_secs(24 * 3600);

// ANCHOR: rooms
/// Who is in each room, and what was said there. Cheap to clone: every
/// connection gets a copy through the request's extensions.
#[derive(Clone)]
pub struct Rooms {
    /// Presence by name, sent to each room's group as `presence_diff`s.
    pub presence: Presence,
    /// The last `HISTORY_SIZE` messages of each room.
    pub history: History,
}

impl Rooms {
    /// Both in this process: a ring of messages per room, and the names of
    /// this process's connections. `layer` carries the presence diffs; a
    /// shutdown of `runtime` waits for the last of them.
    pub fn in_memory(
        config: &Config,
        runtime: &Runtime,
        layer: Arc<dyn ChannelLayer>,
    ) -> Result<Rooms, LayerError> {
        Ok(Rooms {
            presence: Presence::in_memory_on(runtime, layer, config.presence)?,
            history: History::in_memory(config.history_size),
        })
    }

    /// Both in the Redis of `url` (its first server, with several), shared
    /// by every server on it.
    pub async fn redis(
        url: &str,
        config: &Config,
        runtime: &Runtime,
        layer: Arc<dyn ChannelLayer>,
    ) -> Result<Rooms, LayerError> {
        let on_redis = RedisConfig::default()
            .with_hosts(redis_hosts(url))
            .with_prefix("rooms");
        let store = RedisPresence::connect(&on_redis, config.presence.ttl).await?;
        let history = RedisHistory::connect(&on_redis, config.history_size, HISTORY_TTL).await?;
        Ok(Rooms {
            presence: Presence::on_runtime(runtime, Arc::new(store), layer, config.presence)?,
            history: History::new(Arc::new(history)),
        })
    }
}
// ANCHOR_END: rooms
