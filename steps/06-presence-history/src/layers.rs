//! The channel layers this app uses, each under an alias, built once when
//! the app is built.
//!
//! Consumers name the alias they need (`const LAYER: Option<&str> =
//! Some("chat")`), never a concrete layer, so moving a room from this
//! in-memory layer to Redis later changes this file and nothing else.
//!
//! The four aliases are the original's, with its settings: `"chat"` and
//! `"notifications"` are fast and keep nothing (pub/sub on Redis), while
//! `"queue"` and `"analytics"` keep each message until its receiver takes it
//! or it expires (the queue layer on Redis), up to a capacity per channel.
//!
//! On Redis, the layers may spread over several servers (shards): every
//! group and channel lives on one of them, picked by a hash of its name that
//! every process, Rust or Python, computes the same way. Or they go on a
//! Redis Cluster, where each name lives on the master that owns its slot.

use std::time::Duration;

use std::sync::Arc;

use axum_channels::layer::redis::{RedisClusterLayer, RedisConfig, RedisLayer, RedisPubSubLayer};
use axum_channels::layer::{ChannelLayer, InMemoryLayer, LayerError, Layers, MemoryConfig};

use crate::config::redis_hosts;

// ANCHOR: limits
/// How long a message may wait on the `"queue"` layer, and how many one
/// channel may hold: 15 minutes, 1000 messages.
const QUEUE_EXPIRY: Duration = Duration::from_secs(900);
const QUEUE_CAPACITY: usize = 1000;

/// The same for `"analytics"`: an hour, 5000 messages.
const ANALYTICS_EXPIRY: Duration = Duration::from_secs(3600);
const ANALYTICS_CAPACITY: usize = 5000;
// ANCHOR_END: limits

// ANCHOR: setup
/// Every layer of the app, by alias, in this process. The two that keep
/// messages on Redis get the same limits here.
pub fn setup() -> Layers {
    let queue = MemoryConfig::default()
        .with_expiry(QUEUE_EXPIRY)
        .with_capacity(QUEUE_CAPACITY);
    let analytics = MemoryConfig::default()
        .with_expiry(ANALYTICS_EXPIRY)
        .with_capacity(ANALYTICS_CAPACITY);
    Layers::new()
        .with("chat", InMemoryLayer::default())
        .with("queue", InMemoryLayer::new(queue))
        .with("notifications", InMemoryLayer::default())
        .with("analytics", InMemoryLayer::new(analytics))
}
// ANCHOR_END: setup

// ANCHOR: setup_redis
/// The same aliases in Redis, where every process on it shares them: the
/// servers that hold the connections, the workers that send them results,
/// and any program that sends them messages. The prefixes and limits are the
/// original's, so a Python process configured like it shares them too.
///
/// `url` is `REDIS_URL`: one Redis, or several, comma-separated, each a
/// shard. `cluster` is `REDIS_CLUSTER_URL`: with it, the four layers go on
/// that Redis Cluster instead. The queue layers' memberships last
/// `group_expiry` unless renewed.
pub async fn setup_redis(
    url: &str,
    cluster: Option<&str>,
    group_expiry: Duration,
) -> Result<Layers, String> {
    let hosts = redis_hosts(cluster.unwrap_or(url));
    let on_redis = |prefix: &str| {
        RedisConfig::default()
            .with_hosts(hosts.clone())
            .with_prefix(prefix)
            .with_group_expiry(group_expiry)
    };
    // The error as one line, as `main` prints it.
    let text = |err: LayerError| err.to_string();
    // One constructor or the other; the layers they make are the same to
    // the consumers, which only name the aliases.
    let pubsub = async |config: RedisConfig| -> Result<Arc<dyn ChannelLayer>, LayerError> {
        let layer: Arc<dyn ChannelLayer> = match cluster {
            None => Arc::new(RedisPubSubLayer::connect(config).await?),
            Some(_) => Arc::new(RedisPubSubLayer::connect_cluster(config).await?),
        };
        Ok(layer)
    };
    let queue = async |config: RedisConfig| -> Result<Arc<dyn ChannelLayer>, LayerError> {
        let layer: Arc<dyn ChannelLayer> = match cluster {
            None => Arc::new(RedisLayer::connect(config).await?),
            Some(_) => Arc::new(RedisClusterLayer::connect(config).await?),
        };
        Ok(layer)
    };
    let chat = pubsub(on_redis("chat")).await.map_err(text)?;
    let reliable = queue(
        on_redis("queue")
            .with_expiry(QUEUE_EXPIRY)
            .with_capacity(QUEUE_CAPACITY),
    )
    .await
    .map_err(text)?;
    let notifications = pubsub(on_redis("notify")).await.map_err(text)?;
    let analytics = queue(
        on_redis("analytics")
            .with_expiry(ANALYTICS_EXPIRY)
            .with_capacity(ANALYTICS_CAPACITY),
    )
    .await
    .map_err(text)?;
    Ok(Layers::new()
        .with_shared("chat", chat)
        .with_shared("queue", reliable)
        .with_shared("notifications", notifications)
        .with_shared("analytics", analytics))
}
// ANCHOR_END: setup_redis
