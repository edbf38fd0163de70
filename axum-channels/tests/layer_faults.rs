//! The Redis layers under faults: a configuration at the edge of what
//! time arithmetic can hold.
//!
//! Each test starts its own redis-server (see
//! `axum_channels::testing::RedisServer`; without one installed it says so
//! and passes). Waits are polls with a deadline, never fixed sleeps.
#![cfg(feature = "redis")]

use std::time::Duration;

use axum_channels::layer::redis::{RedisConfig, RedisLayer};
use axum_channels::layer::{ChannelLayer, LayerMessage};
use axum_channels::testing::RedisServer;
use serde_json::json;
use tokio::time::timeout;

/// How long something that should happen may take.
const GUARD: Duration = Duration::from_secs(5);

fn numbered(n: u64) -> LayerMessage {
    json!({"type": "test.message", "n": n})
        .as_object()
        .expect("an object")
        .clone()
}

/// Short blocking pops, so closed poppers stop soon.
fn config(url: &str) -> RedisConfig {
    RedisConfig {
        block_timeout: Duration::from_secs(1),
        ..RedisConfig::new(url)
    }
}

async fn zcard(url: &str, key: &str) -> usize {
    let mut conn = redis::Client::open(url)
        .expect("a valid URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis-server");
    redis::cmd("ZCARD")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("ZCARD")
}

/// An expiry too long for the purge's arithmetic (over `i64::MAX`
/// seconds) used to wrap the purge cut-off into the future, so that every
/// send emptied the queue it was adding to. Now such an expiry is refused
/// at start, naming the setting, and the longest accepted one keeps
/// everything.
#[tokio::test]
async fn a_huge_expiry_never_purges_the_queue_on_send() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let ten_years = Duration::from_secs(10 * 365 * 24 * 60 * 60);
    let huge = [
        ten_years,
        Duration::from_secs(i64::MAX as u64),
        Duration::from_secs(i64::MAX as u64 + 1),
        Duration::from_secs(u64::MAX),
        Duration::MAX,
    ];
    for (i, expiry) in huge.into_iter().enumerate() {
        let prefix = format!("huge{i}");
        let connected = RedisLayer::connect(RedisConfig {
            prefix: prefix.clone(),
            expiry,
            ..config(&server.url())
        })
        .await;
        let layer = match connected {
            Ok(layer) => layer,
            Err(err) => {
                let text = err.to_string();
                assert!(text.contains("expiry"), "{expiry:?}: {text}");
                continue;
            }
        };
        for n in 0..3 {
            layer.send("jobs", numbered(n)).await.unwrap();
        }
        assert_eq!(
            zcard(&server.url(), &format!("{prefix}jobs")).await,
            3,
            "with an expiry of {expiry:?}, a send purged what the others had queued"
        );
        // And they come out, in order.
        for n in 0..3 {
            let got = timeout(GUARD, layer.receive("jobs")).await;
            assert_eq!(got.unwrap().unwrap(), numbered(n));
        }
    }
}
