//! The queue layer's Redis connections under channel churn: a server whose
//! connections come and go opens and closes a channel per connection, and
//! that must not pile up blocking connections in Redis (each popper used to
//! get a new one while the last sat in `BZPOPMIN` for up to
//! `block_timeout`).
//!
//! Needs redis-server (see `channels_testkit::RedisServer`): without
//! it the test says so and passes, and under `CI=true` it fails.
#![cfg(feature = "redis")]

use std::time::Duration;

use axum_channels::layer::ChannelLayer;
use axum_channels::layer::redis::{RedisConfig, RedisLayer};
use channels_testkit::RedisServer;

/// `connected_clients` of `INFO clients`, counted from another connection
/// (which is one of them).
async fn connected_clients(url: &str) -> usize {
    let client = redis::Client::open(url).expect("a valid URL");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis");
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query_async(&mut conn)
        .await
        .expect("INFO clients");
    info.lines()
        .find_map(|line| line.strip_prefix("connected_clients:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("INFO clients has connected_clients")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_close_loop_leaves_the_client_count_flat() {
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let layer = RedisLayer::connect(
        RedisConfig::new(server.url())
            // Python's default: the longest a stuck pop could hold a connection.
            .with_block_timeout(Duration::from_secs(5)),
    )
    .await
    .expect("connect the queue layer");
    // One channel first, so that the steady state (a popper per host and
    // its connection) is in the count before the loop.
    let first = layer.new_channel("specific").await.unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(20), layer.receive(&first)).await;
    layer.close_channel(&first).await.unwrap();
    let before = connected_clients(&server.url()).await;

    for _ in 0..1000 {
        let channel = layer.new_channel("specific").await.unwrap();
        // Briefly: long enough for the popper to start its blocking pop.
        let _ = tokio::time::timeout(Duration::from_millis(1), layer.receive(&channel)).await;
        layer.close_channel(&channel).await.unwrap();
    }
    let after = connected_clients(&server.url()).await;
    eprintln!("connected_clients: {before} before 1000 open/close cycles, {after} after");
    assert!(
        after <= before + 1,
        "the loop left {after} Redis clients, {before} before"
    );
}
