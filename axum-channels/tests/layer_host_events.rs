//! The pub/sub layer's `reconnected` event, and a replaced connection that
//! lingers: after the layer gives a connection up (as a failed `PING` probe
//! does) while clones of it are still alive, only the new connection
//! delivers, so no message arrives twice. On a real redis-server; without
//! one installed each test says so on stderr and passes.
#![cfg(feature = "redis")]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum_channels::layer::ChannelLayer;
use axum_channels::layer::redis::{RedisConfig, RedisPubSubLayer};
use channels_testkit::RedisServer;
use serde_json::json;
use tokio::time::timeout;

/// The layer is made to replace its connection while messages flow, the
/// old one kept alive for 2 s: every message after the resubscription
/// arrives once, none twice, and `reconnected` says so once. Without the
/// check on each push's connection, the lingering one delivered every
/// message a second time while it lived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lingering_replaced_connection_delivers_nothing_twice() {
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let url = server.url();
    let receiver = RedisPubSubLayer::connect(RedisConfig::new(&url))
        .await
        .expect("connect");
    let publisher = Arc::new(
        RedisPubSubLayer::connect(RedisConfig::new(&url))
            .await
            .expect("connect"),
    );
    let mut events = receiver.reconnected();
    let channel = receiver.new_channel("client").await.unwrap();
    receiver.group_add("room", &channel).await.unwrap();

    let publishing = {
        let publisher = Arc::clone(&publisher);
        tokio::spawn(async move {
            let mut published = Vec::new();
            for n in 0..1500u64 {
                let message = json!({"type": "test.message", "n": n});
                let message = message.as_object().unwrap().clone();
                if publisher.group_send("room", message).await.is_ok() {
                    published.push(n);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            published
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    receiver.force_reconnect();
    let event = timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("a reconnected event within 5 s")
        .expect("an event");
    assert_eq!(event.host, format!("127.0.0.1:{}", server.port()));
    assert_eq!(event.generation, 1);

    let mut received = Vec::new();
    while let Ok(message) = timeout(Duration::from_secs(2), receiver.receive(&channel)).await {
        received.push(message.unwrap()["n"].as_u64().unwrap());
    }
    let published = publishing.await.unwrap();
    let mut once = BTreeSet::new();
    let twice: Vec<u64> = received
        .iter()
        .copied()
        .filter(|n| !once.insert(*n))
        .collect();
    let missing: Vec<u64> = published
        .iter()
        .copied()
        .filter(|n| !once.contains(n))
        .collect();
    eprintln!(
        "lingering connection: {} published, {} received, {} twice, {} missing; reconnected \
         after {:?}",
        published.len(),
        received.len(),
        twice.len(),
        missing.len(),
        event.down_for
    );
    assert!(
        twice.is_empty(),
        "delivered twice: {} messages",
        twice.len()
    );
    if let (Some(first), Some(last)) = (missing.first(), missing.last()) {
        assert_eq!(
            (last - first + 1) as usize,
            missing.len(),
            "only one stretch around the reconnection is lost: {missing:?}"
        );
    }
    assert_eq!(received.last(), published.last(), "messages flow again");
    assert!(events.try_recv().is_err(), "one reconnection, one event");
}
