//! The Redis layers under faults: a configuration at the edge of what
//! time arithmetic can hold, a Redis that goes away and comes back, and a
//! background task that panics.
//!
//! Each test starts its own redis-server (see
//! `channels_testkit::RedisServer`; without one installed it says so
//! and passes). Waits are polls with a deadline, never fixed sleeps.
#![cfg(feature = "redis")]

use std::sync::Arc;
use std::time::Duration;

use axum_channels::layer::redis::{RedisConfig, RedisLayer, RedisPubSubLayer};
use axum_channels::layer::{ChannelLayer, LayerMessage};
use channels_testkit::{Logs, RedisServer};
use serde_json::json;
use tokio::time::{Instant, timeout};

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
    RedisConfig::new(url).with_block_timeout(Duration::from_secs(1))
}

/// Polls `condition` every 20 ms until it holds, failing after [`GUARD`].
async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + GUARD;
    while !condition().await {
        assert!(Instant::now() < deadline, "{what}: not within {GUARD:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
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
    let Some(server) = RedisServer::start().await else {
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
        let connected = RedisLayer::connect(
            config(&server.url())
                .with_prefix(prefix.clone())
                .with_expiry(expiry),
        )
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

/// A Redis that goes away costs one warning when the outage starts and one
/// line when it ends, whatever happens in between: 50 failing calls, a
/// receiver's popper or subscription retrying, a membership to restore.
async fn an_outage_is_one_warning_and_one_info(
    layer: Arc<dyn ChannelLayer>,
    server: &mut RedisServer,
) {
    let (logs, _guard) = Logs::capture(tracing::Level::DEBUG);
    let member = layer.new_channel("specific").await.unwrap();
    layer.group_add("room", &member).await.unwrap();
    // A consumer waits on its channel all through the outage.
    let waiting = {
        let layer = Arc::clone(&layer);
        let member = member.clone();
        tokio::spawn(async move { layer.receive(&member).await })
    };
    tokio::task::yield_now().await;

    server.kill().await;
    eventually("a call fails once Redis is gone", || {
        let layer = Arc::clone(&layer);
        async move { layer.send("jobs", numbered(0)).await.is_err() }
    })
    .await;
    for n in 0..50 {
        let failed = layer.group_send("room", numbered(n)).await;
        let err = failed.expect_err("a call while Redis is down");
        assert!(err.is_outage(), "{err}");
    }

    server.restart().await;
    let mut n = 100;
    eventually("a call succeeds once Redis is back", || {
        n += 1;
        let layer = Arc::clone(&layer);
        async move { layer.group_send("room", numbered(n)).await.is_ok() }
    })
    .await;
    // The membership and the subscriptions were restored: group messages
    // reach the waiting consumer again.
    let got = loop {
        n += 1;
        let _ = layer.group_send("room", numbered(n)).await;
        if waiting.is_finished() {
            break waiting.await.unwrap().unwrap();
        }
        assert!(n < 300, "no group message reached the consumer");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(got["n"].as_u64().unwrap() > 100, "{got:?}");

    let host = format!("127.0.0.1:{}", server.port());
    let logs_text = logs.lines().join("\n");
    assert_eq!(logs.count_at("WARN", ""), 1, "one warning:\n{logs_text}");
    assert_eq!(
        logs.count_at("WARN", &format!("Redis at {host} is unreachable")),
        1,
        "{logs_text}"
    );
    assert_eq!(logs.count_at("INFO", ""), 1, "one info line:\n{logs_text}");
    assert_eq!(
        logs.count_at("INFO", &format!("Redis at {host} is back after")),
        1,
        "{logs_text}"
    );
    assert_eq!(logs.count_at("ERROR", ""), 0, "{logs_text}");
    assert!(
        logs.count_at("DEBUG", "") >= 50,
        "each failed call is still a debug line:\n{logs_text}"
    );
}

#[tokio::test]
async fn a_queue_layer_outage_is_one_warning_and_one_info() {
    let Some(mut server) = RedisServer::start().await else {
        return;
    };
    let layer = RedisLayer::connect(config(&server.url())).await.unwrap();
    an_outage_is_one_warning_and_one_info(Arc::new(layer), &mut server).await;
}

#[tokio::test]
async fn a_pubsub_layer_outage_is_one_warning_and_one_info() {
    let Some(mut server) = RedisServer::start().await else {
        return;
    };
    let layer = RedisPubSubLayer::connect(config(&server.url()))
        .await
        .unwrap();
    an_outage_is_one_warning_and_one_info(Arc::new(layer), &mut server).await;
}

/// A popper that panics (a bug, injected here) used to end silently, and
/// with it every delivery of its key: the receiver below waited forever.
/// Now the panic is an error line naming the task and the panic, and the
/// popper is started again, so the message still arrives.
#[tokio::test]
async fn a_popper_that_panics_is_logged_and_restarted() {
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let (logs, _guard) = Logs::capture(tracing::Level::DEBUG);
    let layer = RedisLayer::connect(config(&server.url())).await.unwrap();
    let channel = layer.new_channel("specific").await.unwrap();
    layer.inject_popper_panic();
    layer.send(&channel, numbered(1)).await.unwrap();
    let got = timeout(GUARD, layer.receive(&channel)).await;
    let logs_text = logs.lines().join("\n");
    assert_eq!(
        got.expect("the message arrives after the popper restarts")
            .unwrap(),
        numbered(1),
        "{logs_text}"
    );
    assert_eq!(
        logs.count_at("ERROR", "channel layer task popper of "),
        1,
        "{logs_text}"
    );
    assert_eq!(
        logs.count_at("ERROR", "panicked: injected fault"),
        1,
        "{logs_text}"
    );

    // And again, panicking as soon as a receiver waits, before anything
    // was sent.
    layer.inject_popper_panic();
    let layer = Arc::new(layer);
    let waiting = {
        let layer = Arc::clone(&layer);
        let channel = channel.clone();
        tokio::spawn(async move { layer.receive(&channel).await })
    };
    eventually("the popper panics again", || {
        let logs = logs.clone();
        async move { logs.count_at("ERROR", "panicked: injected fault") == 2 }
    })
    .await;
    layer.send(&channel, numbered(2)).await.unwrap();
    let got = timeout(GUARD, waiting).await;
    assert_eq!(got.expect("arrives").unwrap().unwrap(), numbered(2));
}
