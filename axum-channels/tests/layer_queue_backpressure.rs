//! What the queue layer's capacity bounds, exactly, with a real
//! redis-server: the Redis key's, which all process-specific channels of a
//! layer instance share (the wire format). A channel alone in its process
//! pushes back on its senders with `ChannelFull`; one whose neighbour keeps
//! the popper busy has its messages popped into its local buffer, which
//! keeps its newest `capacity` and counts each drop in
//! `axum_channels_queue_buffer_dropped_total{prefix}`.
//!
//! One test in its own binary, because a process has one metrics recorder.
#![cfg(feature = "redis")]

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum_channels::layer::redis::{RedisConfig, RedisLayer};
use axum_channels::layer::{ChannelLayer, LayerError, LayerMessage};
use axum_channels::server::metrics_route;
use axum_channels::testing::TestServer;
use channels_testkit::RedisServer;
use serde_json::json;
use tokio::time::{Instant, timeout};

const GUARD: Duration = Duration::from_secs(5);

fn numbered(n: u64) -> LayerMessage {
    json!({"type": "test.message", "n": n})
        .as_object()
        .unwrap()
        .clone()
}

async fn zcard(url: &str, key: &str) -> usize {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("ZCARD")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap()
}

fn dropped(scrape: &str, prefix: &str) -> f64 {
    let label = format!("prefix=\"{prefix}\"");
    scrape
        .lines()
        .find(|line| {
            line.starts_with("axum_channels_queue_buffer_dropped_total") && line.contains(&label)
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn capacity_is_the_keys_and_a_crowded_channel_drops_its_oldest_counted() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let server =
        TestServer::start(Router::new().merge(metrics_route().expect("one recorder"))).await;
    let layer = Arc::new(
        RedisLayer::connect(
            RedisConfig::new(redis.url())
                .with_prefix("bp")
                .with_capacity(3)
                .with_block_timeout(Duration::from_secs(1)),
        )
        .await
        .unwrap(),
    );
    let busy = layer.new_channel("specific").await.unwrap();
    let slow = layer.new_channel("specific").await.unwrap();
    let key = format!("bp{}", &slow[..slow.find('!').unwrap() + 1]);

    // Alone (nobody else here waits), the slow channel's backlog stays in
    // Redis, and its senders are told when the key is full.
    for n in 1..=3 {
        layer.send(&slow, numbered(n)).await.unwrap();
    }
    let full = layer.send(&slow, numbered(4)).await.unwrap_err();
    assert!(matches!(full, LayerError::ChannelFull { .. }), "{full}");
    // The key is shared: its neighbour's senders are told too.
    let full = layer.send(&busy, numbered(4)).await.unwrap_err();
    assert!(matches!(full, LayerError::ChannelFull { .. }), "{full}");
    for n in 1..=3 {
        let got = timeout(GUARD, layer.receive(&slow)).await.unwrap();
        assert_eq!(got.unwrap(), numbered(n));
    }

    // With a neighbour waiting, the popper takes whatever comes first in
    // the key, the slow channel's messages too, into its buffer of 3.
    let waiting = {
        let layer = Arc::clone(&layer);
        let busy = busy.clone();
        tokio::spawn(async move { layer.receive(&busy).await })
    };
    for n in 11..=16 {
        layer.send(&slow, numbered(n)).await.expect("Redis took it");
        let deadline = Instant::now() + GUARD;
        while zcard(&redis.url(), &key).await > 0 {
            assert!(Instant::now() < deadline, "the popper never took #{n}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for n in 14..=16 {
        let got = timeout(GUARD, layer.receive(&slow)).await.unwrap();
        assert_eq!(got.unwrap(), numbered(n), "the newest 3 are kept");
    }
    let scrape = server.get("/metrics").await.text();
    assert_eq!(dropped(&scrape, "bp"), 3.0, "one per drop:\n{scrape}");

    layer.send(&busy, numbered(99)).await.unwrap();
    let got = timeout(GUARD, waiting).await.unwrap().unwrap();
    assert_eq!(got.unwrap(), numbered(99));
    // Received, closed or expired messages are not drops.
    layer.close_channel(&slow).await.unwrap();
    let scrape = server.get("/metrics").await.text();
    assert_eq!(dropped(&scrape, "bp"), 3.0, "{scrape}");
}
