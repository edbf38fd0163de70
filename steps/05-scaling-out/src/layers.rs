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
//! every process, Rust or Python, computes the same way. Or the pub/sub
//! layers go on a Redis Cluster, where each lives on the node of its slot.

use std::time::Duration;

use axum_channels::layer::redis::{RedisConfig, RedisLayer, RedisPubSubLayer};
use axum_channels::layer::{InMemoryLayer, LayerError, Layers, MemoryConfig};

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
    let queue = MemoryConfig {
        expiry: QUEUE_EXPIRY,
        capacity: QUEUE_CAPACITY,
        ..MemoryConfig::default()
    };
    let analytics = MemoryConfig {
        expiry: ANALYTICS_EXPIRY,
        capacity: ANALYTICS_CAPACITY,
        ..MemoryConfig::default()
    };
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
/// shard. `cluster` is `REDIS_CLUSTER_URL`: with it, the two pub/sub layers
/// go on that Redis Cluster instead. The queue layers' memberships last
/// `group_expiry` unless renewed.
pub async fn setup_redis(
    url: &str,
    cluster: Option<&str>,
    group_expiry: Duration,
) -> Result<Layers, String> {
    let on_redis = |prefix: &str| RedisConfig {
        hosts: redis_hosts(url),
        prefix: prefix.to_owned(),
        group_expiry,
        ..RedisConfig::default()
    };
    // The error as one line, as `main` prints it.
    let text = |err: LayerError| err.to_string();
    let pubsub = async |prefix: &str| match cluster {
        None => RedisPubSubLayer::connect(on_redis(prefix)).await,
        Some(nodes) => {
            let on_cluster = RedisConfig {
                hosts: redis_hosts(nodes),
                ..on_redis(prefix)
            };
            RedisPubSubLayer::connect_cluster(on_cluster).await
        }
    };
    let chat = pubsub("chat").await.map_err(text)?;
    let queue = RedisLayer::connect(RedisConfig {
        expiry: QUEUE_EXPIRY,
        capacity: QUEUE_CAPACITY,
        ..on_redis("queue")
    })
    .await
    .map_err(text)?;
    let notifications = pubsub("notify").await.map_err(text)?;
    let analytics = RedisLayer::connect(RedisConfig {
        expiry: ANALYTICS_EXPIRY,
        capacity: ANALYTICS_CAPACITY,
        ..on_redis("analytics")
    })
    .await
    .map_err(text)?;
    Ok(Layers::new()
        .with("chat", chat)
        .with("queue", queue)
        .with("notifications", notifications)
        .with("analytics", analytics))
}
// ANCHOR_END: setup_redis
