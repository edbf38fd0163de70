//! The Redis layers on a real Redis Cluster (six nodes that
//! `channels_testkit::RedisCluster` starts per test) while the cluster
//! changes under them: a slot moved to another master, a master failed over
//! on purpose (`CLUSTER FAILOVER`), and a master killed. The conformance
//! suite runs on a cluster too (`layer_conformance.rs`,
//! `redis_pubsub_cluster`); these are the faults it cannot show.
//!
//! Each test sends numbered messages at a steady pace throughout, and
//! states on stderr what was lost: on pub/sub, what was published between
//! the slot leaving its node and the layer subscribing again on the new
//! owner, which the tests bound.
//!
//! Without redis-server and redis-cli every test says so on stderr and
//! passes; under `CI=true` it fails.
#![cfg(feature = "redis")]

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use axum_channels::layer::redis::{RedisConfig, RedisPubSubLayer};
use axum_channels::layer::{ChannelLayer, LayerMessage};
use channels_testkit::RedisCluster;
use serde_json::json;
use tokio::time::{Instant, sleep, timeout};

/// One message every `PACE` while a test runs.
const PACE: Duration = Duration::from_millis(10);

/// How soon messages must flow again after the cluster changed.
const RECOVERY: Duration = Duration::from_secs(5);

fn numbered(n: u64) -> LayerMessage {
    json!({"type": "test.message", "n": n})
        .as_object()
        .expect("an object")
        .clone()
}

fn config(cluster: &RedisCluster) -> RedisConfig {
    RedisConfig {
        hosts: cluster.urls(),
        block_timeout: Duration::from_secs(1),
        ..RedisConfig::default()
    }
}

async fn pubsub(cluster: &RedisCluster) -> Arc<RedisPubSubLayer> {
    Arc::new(
        RedisPubSubLayer::connect_cluster(config(cluster))
            .await
            .expect("connect the pub/sub layer to the cluster"),
    )
}

/// `CLUSTER KEYSLOT name`, asked of the cluster.
async fn keyslot(cluster: &RedisCluster, name: &str) -> u16 {
    let client = redis::Client::open(cluster.urls()[0].as_str()).expect("a URL");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to a node");
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(name)
        .query_async(&mut conn)
        .await
        .expect("CLUSTER KEYSLOT")
}

/// Another master than the one on `port`.
async fn other_master(cluster: &RedisCluster, port: u16) -> u16 {
    cluster
        .nodes()
        .await
        .into_iter()
        .find(|node| node.master && node.port != port && !node.slots.is_empty())
        .expect("three masters")
        .port
}

fn say(line: String) {
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// A room's traffic: `receiver` is in group `room` through one channel;
/// a task group-sends numbered messages from `sender` every `PACE` until
/// stopped. Returns what the receiver got.
struct Traffic {
    sent: Arc<std::sync::atomic::AtomicU64>,
    stop: tokio::sync::watch::Sender<bool>,
    sender: tokio::task::JoinHandle<()>,
    receiver: tokio::task::JoinHandle<Vec<(u64, Instant)>>,
}

impl Traffic {
    async fn start(sender: Arc<RedisPubSubLayer>, receiver: Arc<RedisPubSubLayer>) -> Traffic {
        let channel = receiver.new_channel("test").await.expect("new_channel");
        receiver
            .group_add("room", &channel)
            .await
            .expect("group_add");
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let counter = Arc::clone(&sent);
        let sending = tokio::spawn(async move {
            let mut n = 0;
            while !*stopped.borrow() {
                n += 1;
                // A send may fail while the slot's owner is away: it counts
                // as sent (and lost), as an app would see it.
                let _ = sender.group_send("room", numbered(n)).await;
                counter.store(n, std::sync::atomic::Ordering::SeqCst);
                sleep(PACE).await;
            }
        });
        let receiving = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Ok(Ok(message)) = timeout(RECOVERY * 2, receiver.receive(&channel)).await {
                let n = message["n"].as_u64().expect("numbered");
                got.push((n, Instant::now()));
                if n == u64::MAX {
                    break;
                }
            }
            got
        });
        Traffic {
            sent,
            stop,
            sender: sending,
            receiver: receiving,
        }
    }

    /// Stops sending, waits for the last message to arrive, and returns
    /// the numbers received and the last number sent.
    async fn finish(self, sender: &RedisPubSubLayer) -> (Vec<(u64, Instant)>, u64) {
        let _ = self.stop.send(true);
        let last_sent = Arc::clone(&self.sent);
        self.sender.await.expect("the sender");
        let last = last_sent.load(std::sync::atomic::Ordering::SeqCst);
        sender
            .group_send("room", numbered(u64::MAX))
            .await
            .expect("the last send");
        let got = self.receiver.await.expect("the receiver");
        (got, last)
    }
}

/// What a change of the cluster cost the room: asserts that messages
/// flowed again within `RECOVERY` of `changed`, and that nothing sent
/// after they did was lost; says how many were lost.
fn report(what: &str, got: &[(u64, Instant)], last: u64, changed: Instant) -> usize {
    let received: BTreeSet<u64> = got.iter().map(|(n, _)| *n).collect();
    assert!(
        received.contains(&u64::MAX),
        "{what}: the last message arrived"
    );
    // The longest silence the receiver saw: the cost of the change.
    let mut arrivals: Vec<Instant> = got.iter().map(|(_, at)| *at).collect();
    arrivals.insert(0, changed);
    let gap = arrivals
        .windows(2)
        .filter(|pair| pair[1] >= changed)
        .map(|pair| pair[1].saturating_duration_since(pair[0]))
        .max()
        .unwrap_or_default();
    assert!(gap < RECOVERY, "{what}: no message for {gap:?}");
    let lost: Vec<u64> = (1..=last).filter(|n| !received.contains(n)).collect();
    // Once flowing again, nothing more is lost: every number after the
    // last lost one arrived.
    if let Some(&newest_lost) = lost.last() {
        assert!(
            newest_lost < last,
            "{what}: the most recent message was lost: {lost:?}"
        );
    }
    say(format!(
        "cluster: {what}: pub/sub lost {} of {last} messages sent every {PACE:?} \
         (numbers {:?}); longest silence {gap:?}",
        lost.len(),
        lost
    ));
    lost.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_follows_a_group_whose_slot_moves() {
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let sender = pubsub(&cluster).await;
    let receiver = pubsub(&cluster).await;
    let mut reconnected = receiver.reconnected();
    let traffic = Traffic::start(Arc::clone(&sender), Arc::clone(&receiver)).await;
    sleep(Duration::from_millis(300)).await;

    let slot = keyslot(&cluster, "asgi__group__room").await;
    let from = cluster.master_of(slot).await.port;
    let to = other_master(&cluster, from).await;
    let changed = Instant::now();
    cluster.move_slot(slot, to).await;
    assert_eq!(cluster.master_of(slot).await.port, to);

    // The layer saw its subscription end and subscribed again.
    let event = timeout(RECOVERY, reconnected.recv())
        .await
        .expect("a Reconnected event within 5 s of the slot move")
        .expect("an event");
    say(format!(
        "cluster: slot move: resubscribed after {:?}",
        event.down_for
    ));
    sleep(Duration::from_millis(500)).await;
    let (got, last) = traffic.finish(&sender).await;
    let lost = report("slot move", &got, last, changed);
    // At most what was sent in the resubscription window.
    assert!(lost <= 100, "lost {lost}: more than 1 s of traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_follows_a_planned_failover() {
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let sender = pubsub(&cluster).await;
    let receiver = pubsub(&cluster).await;
    let traffic = Traffic::start(Arc::clone(&sender), Arc::clone(&receiver)).await;
    sleep(Duration::from_millis(300)).await;

    let slot = keyslot(&cluster, "asgi__group__room").await;
    let master = cluster.master_of(slot).await.port;
    let changed = Instant::now();
    cluster.failover(master).await;
    cluster.wait_until_ok(RECOVERY).await;
    sleep(Duration::from_millis(1500)).await;
    let (got, last) = traffic.finish(&sender).await;
    let lost = report("CLUSTER FAILOVER", &got, last, changed);
    assert!(lost <= 300, "lost {lost}: more than 3 s of traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_survives_a_killed_master() {
    let Some(mut cluster) = RedisCluster::start().await else {
        return;
    };
    let sender = pubsub(&cluster).await;
    let receiver = pubsub(&cluster).await;
    let traffic = Traffic::start(Arc::clone(&sender), Arc::clone(&receiver)).await;
    sleep(Duration::from_millis(300)).await;

    let slot = keyslot(&cluster, "asgi__group__room").await;
    let master = cluster.master_of(slot).await.port;
    let changed = Instant::now();
    cluster.kill(master).await;
    cluster.wait_for_takeover(master, RECOVERY * 2).await;
    say(format!(
        "cluster: killed master: a replica took over after {:?}",
        changed.elapsed()
    ));
    sleep(Duration::from_secs(2)).await;
    let (got, last) = traffic.finish(&sender).await;
    report("killed master", &got, last, changed);
}
