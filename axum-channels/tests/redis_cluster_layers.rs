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
//! The queue layer (`RedisClusterLayer`) keeps messages in Redis, so it
//! must lose nothing when a slot moves; its `group_send` reaches members
//! whose keys are in different slots, one script call per slot.
//!
//! Without redis-server and redis-cli every test says so on stderr and
//! passes; under `CI=true` it fails.
#![cfg(feature = "redis")]

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use axum_channels::layer::redis::{
    RedisClusterLayer, RedisConfig, RedisPubSubLayer, non_local_name,
};
use axum_channels::layer::{ChannelLayer, LayerMessage};
use channels_testkit::RedisCluster;
use serde_json::json;
use tokio::time::{Instant, sleep, timeout};

/// One message every `PACE` while a test runs.
const PACE: Duration = Duration::from_millis(10);

/// How soon messages must flow again after the cluster changed.
const RECOVERY: Duration = Duration::from_secs(5);

/// Messages sent at `PACE` in the moment between a master accepting them and
/// its replica copying them, which a killed master may take with it: 100 ms.
const LAST_MOMENT: usize = 10;

/// The log of a test, on stderr when `RUST_LOG` asks for it (redis-rs's
/// `log` lines too): what a failing run shows of the layer's recovery.
fn trace() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn numbered(n: u64) -> LayerMessage {
    json!({"type": "test.message", "n": n})
        .as_object()
        .expect("an object")
        .clone()
}

fn config(cluster: &RedisCluster) -> RedisConfig {
    RedisConfig::default()
        .with_hosts(cluster.urls())
        .with_block_timeout(Duration::from_secs(1))
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

/// Two pub/sub layers on `cluster` with a room's [`Traffic`] flowing from
/// one to the other (for 300 ms already), the slot of the room's group,
/// and the port of the master that holds it.
async fn pubsub_room(
    cluster: &RedisCluster,
) -> (
    Arc<RedisPubSubLayer>,
    Arc<RedisPubSubLayer>,
    Traffic,
    u16,
    u16,
) {
    let sender = pubsub(cluster).await;
    let receiver = pubsub(cluster).await;
    let traffic = Traffic::start(Arc::clone(&sender), Arc::clone(&receiver)).await;
    sleep(Duration::from_millis(300)).await;
    let slot = keyslot(cluster, "asgi__group__room").await;
    let master = cluster.master_of(slot).await.port;
    (sender, receiver, traffic, slot, master)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_follows_a_group_whose_slot_moves() {
    trace();
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let (sender, receiver, traffic, slot, from) = pubsub_room(&cluster).await;
    let mut reconnected = receiver.reconnected();
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
    trace();
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let (sender, _receiver, traffic, _, master) = pubsub_room(&cluster).await;
    let changed = Instant::now();
    cluster.failover(master).await;
    cluster.wait_until_ok(RECOVERY).await;
    sleep(Duration::from_millis(1500)).await;
    let (got, last) = traffic.finish(&sender).await;
    let lost = report("CLUSTER FAILOVER", &got, last, changed);
    assert!(lost <= 300, "lost {lost}: more than 3 s of traffic");
}

// Failed in about one run in six (the last message never arrived; no node
// held the room's subscription) until the subscriber subscribed everything
// once more a second after subscribing it again (`subscriber::CONFIRM`):
// redis-rs can confirm an `SSUBSCRIBE` on a node connection it then
// replaces, and the subscription goes with the dropped connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_survives_a_killed_master() {
    trace();
    let Some(mut cluster) = RedisCluster::start().await else {
        return;
    };
    let (sender, _receiver, traffic, _, master) = pubsub_room(&cluster).await;
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

/// A dead master kept in every node's slot map for `STALE_FOR`: its replica
/// is held back from taking over (`hold_failover`), then promoted by hand
/// (`take_over`), and messages must flow again within `RECOVERY` of the
/// promotion. Whatever slot map the layers read meanwhile names the dead
/// master: what `cluster::Renewing` is for, when redis-rs keeps such a map
/// (it got through this one on its own in our runs, so this bounds the
/// recovery rather than shows that fault).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_leaves_a_stale_slot_map_behind() {
    trace();
    let Some(mut cluster) = RedisCluster::start().await else {
        return;
    };
    let (sender, _receiver, traffic, _, master) = pubsub_room(&cluster).await;
    let replica = cluster.hold_failover(master).await;
    cluster.kill(master).await;
    sleep(STALE_FOR).await;
    cluster.take_over(replica, RECOVERY).await;
    let promoted = Instant::now();
    sleep(Duration::from_secs(2)).await;
    let (got, last) = traffic.finish(&sender).await;
    flowing_again("pub/sub, stale slot map", &got, last, promoted);
}

/// How long `hold_failover` keeps a dead master in every node's slot map.
const STALE_FOR: Duration = Duration::from_secs(3);

/// Asserts that a message arrived within `RECOVERY` of `promoted`, and the
/// last one too (what the dead master's slot refused meanwhile is lost).
fn flowing_again(what: &str, got: &[(u64, Instant)], last: u64, promoted: Instant) {
    let received: BTreeSet<u64> = got.iter().map(|(n, _)| *n).collect();
    assert!(
        received.contains(&u64::MAX),
        "{what}: the last message never arrived"
    );
    let again = got
        .iter()
        .find(|(_, at)| *at >= promoted)
        .map(|(_, at)| at.duration_since(promoted))
        .expect("messages after the promotion");
    assert!(
        again < RECOVERY,
        "{what}: silent for {again:?} after the promotion"
    );
    let lost = (1..=last).filter(|n| !received.contains(n)).count();
    say(format!(
        "cluster: {what}: flowing again {again:?} after the promotion; \
         {lost} of {last} messages lost"
    ));
}

async fn queue(cluster: &RedisCluster) -> Arc<RedisClusterLayer> {
    queue_with(config(cluster)).await
}

/// The queue layer on the cluster `config` names, with its settings.
async fn queue_with(config: RedisConfig) -> Arc<RedisClusterLayer> {
    Arc::new(
        RedisClusterLayer::connect(config)
            .await
            .expect("connect the queue layer to the cluster"),
    )
}

/// A group whose members' names make one message per key larger than
/// `max_message_size` (here a few members of one process, with a small
/// limit; in production some 13,000 with the default 1 MiB) gets several
/// messages per key, each under the limit, as on one Redis: every member
/// gets the message once, and the `group_send` does not fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_group_send_splits_a_key_over_max_message_size() {
    trace();
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let small = config(&cluster).with_max_message_size(300);
    let (members, sender) = (queue_with(small.clone()).await, queue_with(small).await);
    let mut channels = Vec::new();
    for _ in 0..12 {
        let channel = members.new_channel("specific").await.expect("new_channel");
        members
            .group_add("room", &channel)
            .await
            .expect("group_add");
        channels.push(channel);
    }
    sender
        .group_send("room", numbered(7))
        .await
        .expect("a group_send over one payload's worth of names");
    for channel in &channels {
        let message = timeout(RECOVERY, members.receive(channel))
            .await
            .expect("every member got the group message")
            .expect("receive");
        assert_eq!(message["n"], 7);
    }
    for channel in &channels {
        assert!(
            timeout(Duration::from_millis(200), members.receive(channel))
                .await
                .is_err(),
            "{channel} got the message twice"
        );
    }
}

/// A process key's backlog comes out in one pop, whichever receiver asked,
/// as on one Redis: the receivers then write runs, not a frame at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_takes_a_process_keys_backlog_in_one_pop() {
    trace();
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let layer = queue(&cluster).await;
    let channel = layer.new_channel("specific").await.expect("new_channel");
    for n in 0..10 {
        layer.send(&channel, numbered(n)).await.expect("send");
    }
    let first = timeout(RECOVERY, layer.receive(&channel))
        .await
        .expect("the first message")
        .expect("receive");
    assert_eq!(first["n"], 0);
    let key = queue_key(&channel);
    let node = cluster.master_of(keyslot(&cluster, &key).await).await;
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", node.port)).expect("a URL");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the key's master");
    let left: usize = redis::cmd("ZCARD")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("ZCARD");
    assert_eq!(left, 0, "one receive took the whole backlog out of Redis");
    for n in 1..10 {
        let message = timeout(RECOVERY, layer.receive(&channel))
            .await
            .expect("the rest, in order")
            .expect("receive");
        assert_eq!(message["n"], n);
    }
}

/// Two plain channels whose keys (`asgi{name}`) share a slot, as the
/// cluster computes it (`CLUSTER KEYSLOT`), tried until two names meet.
async fn two_channels_in_one_slot(cluster: &RedisCluster) -> (String, String) {
    let mut seen = std::collections::HashMap::new();
    for i in 0.. {
        let name = format!("tryagain{i}");
        let slot = keyslot(cluster, &format!("asgi{{{name}}}")).await;
        if let Some(other) = seen.insert(slot, name.clone()) {
            return (other, name);
        }
    }
    unreachable!("the loop returns")
}

/// A slot half moved (`begin_move`: one of a group's two keys in it moved,
/// the other not) makes the group-send script on both meet `TRYAGAIN`;
/// the layer retries it with backoff, and the `group_send` succeeds once
/// the move is finished a second later. The retries are logged at debug;
/// no warning, since no call failed (warnings are per episode of failed
/// calls, `a_refusing_cluster_is_retried_and_logged_once`).
///
/// On the current-thread runtime, so that the layer's log is this test's.
#[tokio::test]
async fn queue_waits_out_tryagain_while_a_slot_moves() {
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let (logs, _guard) = channels_testkit::Logs::capture(tracing::Level::DEBUG);
    let layer =
        RedisClusterLayer::connect(config(&cluster).with_command_timeout(Duration::from_secs(10)))
            .await
            .expect("connect the queue layer to the cluster");
    let (a, b) = two_channels_in_one_slot(&cluster).await;
    let (key_a, key_b) = (format!("asgi{{{a}}}"), format!("asgi{{{b}}}"));
    let slot = keyslot(&cluster, &key_a).await;
    assert_eq!(slot, keyslot(&cluster, &key_b).await, "{a} and {b}");
    for channel in [&a, &b] {
        layer.group_add("room", channel).await.expect("group_add");
        // Its key exists from now on, so that it can be moved or not.
        layer.send(channel, numbered(0)).await.expect("send");
    }
    let from = cluster.master_of(slot).await.port;
    let to = other_master(&cluster, from).await;
    cluster.begin_move(slot, to, &[&key_a]).await;

    // The call can get through once the other key has moved too, which
    // `finish_move` does first: not before it starts.
    let finishing = async {
        sleep(Duration::from_secs(1)).await;
        let finishing = Instant::now();
        cluster.finish_move(slot, to).await;
        finishing
    };
    let sending = async {
        let sent = layer.group_send("room", numbered(1)).await;
        (sent, Instant::now())
    };
    let (finishing, (sent, returned)) = tokio::join!(finishing, sending);
    sent.expect("a group_send through TRYAGAIN succeeds once the slot has moved");
    assert!(
        returned >= finishing,
        "the group_send returned while the slot was half moved"
    );
    assert_eq!(cluster.master_of(slot).await.port, to);
    for channel in [&a, &b] {
        for n in [0, 1] {
            let message = timeout(RECOVERY, layer.receive(channel))
                .await
                .expect("a message")
                .expect("receive");
            assert_eq!(message["n"], n, "{channel}");
        }
    }
    let lines = logs.lines().join("\n");
    assert!(
        logs.lines()
            .iter()
            .any(|line| line.contains("refused a command; retrying") && line.contains("TryAgain")),
        "the script met TRYAGAIN and was retried:\n{lines}"
    );
    assert_eq!(
        logs.count_at("WARN", "refuses"),
        0,
        "no call failed:\n{lines}"
    );
}

/// The queue layer through the stale slot map of
/// `pubsub_leaves_a_stale_slot_map_behind`: the group's key lives on the
/// killed master; once its replica is promoted, a `group_send` must get
/// through within `RECOVERY` and reach the member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_leaves_a_stale_slot_map_behind() {
    trace();
    let Some(mut cluster) = RedisCluster::start().await else {
        return;
    };
    let sender = queue(&cluster).await;
    let receiver = queue(&cluster).await;
    let channel = receiver.new_channel("specific").await.expect("new_channel");
    receiver
        .group_add("room", &channel)
        .await
        .expect("group_add");
    sender
        .group_send("room", numbered(1))
        .await
        .expect("group_send");
    let first = timeout(RECOVERY, receiver.receive(&channel))
        .await
        .expect("the first message")
        .expect("receive");
    assert_eq!(first["n"], 1);
    // The membership reaches the replica before its master dies.
    sleep(Duration::from_millis(300)).await;

    let slot = keyslot(&cluster, "asgi:group:room").await;
    let master = cluster.master_of(slot).await.port;
    let replica = cluster.hold_failover(master).await;
    cluster.kill(master).await;
    // Calls meanwhile fail (the slot has no master): the layer's
    // connection reads slot maps that name the dead one.
    let refused = sender.group_send("room", numbered(0)).await;
    assert!(refused.is_err(), "the group's master is dead: {refused:?}");
    sleep(STALE_FOR).await;
    cluster.take_over(replica, RECOVERY).await;
    let promoted = Instant::now();
    loop {
        match sender.group_send("room", numbered(2)).await {
            Ok(()) => break,
            Err(err) => assert!(
                promoted.elapsed() < RECOVERY,
                "group_send still fails {:?} after the promotion: {err}",
                promoted.elapsed()
            ),
        }
    }
    let message = timeout(RECOVERY, receiver.receive(&channel))
        .await
        .expect("the member got the group message")
        .expect("receive");
    assert_eq!(message["n"], 2);
    say(format!(
        "cluster: queue, stale slot map: group_send got through {:?} after the promotion",
        promoted.elapsed()
    ));
}

/// The cluster layout's key of a queue channel (`{prefix}{{non-local}}`).
fn queue_key(channel: &str) -> String {
    format!("asgi{{{}}}", non_local_name(channel))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_group_send_reaches_members_in_every_slot() {
    trace();
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    // Six processes, each with a member: six keys, in slots of their own.
    let mut members = Vec::new();
    let mut masters = BTreeSet::new();
    for _ in 0..6 {
        let layer = queue(&cluster).await;
        let channel = layer.new_channel("specific").await.expect("new_channel");
        layer.group_add("room", &channel).await.expect("group_add");
        let slot = keyslot(&cluster, &queue_key(&channel)).await;
        masters.insert(cluster.master_of(slot).await.port);
        members.push((layer, channel));
    }
    assert!(
        masters.len() >= 2,
        "the members' keys should span several masters, not {masters:?}"
    );
    let sender = queue(&cluster).await;
    for n in 1..=3 {
        sender
            .group_send("room", numbered(n))
            .await
            .expect("group_send");
    }
    for (layer, channel) in &members {
        for n in 1..=3 {
            let message = timeout(RECOVERY, layer.receive(channel))
                .await
                .expect("a member got the group message")
                .expect("receive");
            assert_eq!(message["n"], n);
        }
    }
    say(format!(
        "cluster: queue group_send reached 6 members on {} masters",
        masters.len()
    ));
}

/// A new channel of `layer`, added to `group`.
async fn member_of(layer: &RedisClusterLayer, group: &str) -> String {
    let channel = layer.new_channel("specific").await.expect("new_channel");
    layer.group_add(group, &channel).await.expect("group_add");
    channel
}

/// Sends message number `n` to `group`.
async fn send_numbered(sender: &RedisClusterLayer, group: &str, n: u64) {
    sender
        .group_send(group, numbered(n))
        .await
        .expect("group_send");
}

/// Receives the next message on `channel`, which must be number `n`.
async fn expect_next(layer: &RedisClusterLayer, channel: &str, n: u64, why: &str) {
    let message = timeout(RECOVERY, layer.receive(channel))
        .await
        .unwrap_or_else(|_| panic!("{why}: nothing came"))
        .expect("receive");
    assert_eq!(message["n"], n, "{why}");
}

/// Checks that nothing more comes to `channel`.
async fn expect_nothing(layer: &RedisClusterLayer, channel: &str, why: &str) {
    let more = timeout(Duration::from_millis(300), layer.receive(channel)).await;
    assert!(more.is_err(), "{why}: got {more:?}");
}

/// A sender that has sent to a group before sends the next message in one
/// round trip, to the keys it remembers, each checked against its
/// membership version, while it checks the group's digest. Members that
/// another process adds or removes must be seen at once all the same: on a
/// key the sender remembers (the version), and on a key it has never sent
/// to (the digest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_group_send_sees_members_changed_by_another_process() {
    trace();
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let sender = queue(&cluster).await;
    let other = queue(&cluster).await;
    let first = member_of(&other, "room").await;
    // From the third message on, the sender knows the key's version.
    for n in 1..=3 {
        send_numbered(&sender, "room", n).await;
        expect_next(&other, &first, n, "a member").await;
    }

    // On the remembered key: one member joins, one leaves.
    let second = member_of(&other, "room").await;
    other
        .group_discard("room", &first)
        .await
        .expect("group_discard");
    send_numbered(&sender, "room", 4).await;
    expect_next(&other, &second, 4, "it joined on a remembered key").await;
    expect_nothing(&other, &first, "it left the group").await;

    // On a key the sender has never sent to: another process joins.
    let third_layer = queue(&cluster).await;
    let third = member_of(&third_layer, "room").await;
    send_numbered(&sender, "room", 5).await;
    expect_next(&third_layer, &third, 5, "it joined on a new key").await;
    expect_next(&other, &second, 5, "still a member").await;

    // Nothing changed: the remembered keys serve.
    for n in 6..=7 {
        send_numbered(&sender, "room", n).await;
        expect_next(&third_layer, &third, n, "still a member").await;
        expect_next(&other, &second, n, "still a member").await;
    }
    expect_nothing(&other, &first, "it left the group").await;
}

/// A membership lapses after `group_expiry` for a sender that remembers
/// it too. Here the key it is on has a newer member, whose join gave the
/// key the version the sender remembers: the version stays valid after
/// the older membership lapses, so the sender must see by the time each
/// member joined that the key needs reading again. Group expiry 3 s
/// (whole seconds make a membership last 3 to 4 s): the lapsed membership
/// is 4.3 s old, the newer one 2.3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_group_send_lets_a_remembered_membership_lapse() {
    trace();
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let lapsing = config(&cluster).with_group_expiry(Duration::from_secs(3));
    let (sender, members) = (queue_with(lapsing.clone()).await, queue_with(lapsing).await);
    let joined = Instant::now();
    let older = member_of(&members, "room").await;
    sleep(Duration::from_millis(2000)).await;
    let newer = member_of(&members, "room").await;
    for n in 1..=3 {
        send_numbered(&sender, "room", n).await;
        expect_next(&members, &older, n, "a member").await;
        expect_next(&members, &newer, n, "a member").await;
    }
    sleep((joined + Duration::from_millis(4300)).saturating_duration_since(Instant::now())).await;
    send_numbered(&sender, "room", 4).await;
    expect_next(&members, &newer, 4, "its membership is 2.3 s old").await;
    expect_nothing(&members, &older, "its membership lapsed").await;
}

/// Sends `count` numbered messages to `channel` at `PACE` while `change`
/// runs, then receives: the queue layer must deliver every one, in order.
async fn queue_keeps_everything_while(
    cluster: &mut RedisCluster,
    what: &str,
    change: impl AsyncFnOnce(&mut RedisCluster, u16),
) {
    let receiver = queue(cluster).await;
    let sender = queue(cluster).await;
    let channel = receiver.new_channel("specific").await.expect("new_channel");
    let slot = keyslot(cluster, &queue_key(&channel)).await;
    // The room's members are kept on the same master as the channel's
    // messages, so that a change of that master touches both.
    let master = cluster.master_of(slot).await.port;
    let mut room = String::new();
    for i in 0.. {
        room = format!("room{i}");
        let group_slot = keyslot(cluster, &format!("asgi:group:{room}")).await;
        if cluster.master_of(group_slot).await.port == master {
            break;
        }
    }
    receiver
        .group_add(&room, &channel)
        .await
        .expect("group_add");
    let count: u64 = 200;
    let sending = {
        let sender = Arc::clone(&sender);
        let room = room.clone();
        tokio::spawn(async move {
            let mut failed = Vec::new();
            for n in 1..=count {
                // A send that fails is the caller's to retry; count it.
                if sender.group_send(&room, numbered(n)).await.is_err() {
                    failed.push(n);
                }
                sleep(PACE).await;
            }
            failed
        })
    };
    let receiving = {
        let receiver = Arc::clone(&receiver);
        tokio::spawn(async move {
            let mut got = Vec::new();
            let mut longest = Duration::ZERO;
            let mut last = Instant::now();
            while let Ok(Ok(message)) = timeout(RECOVERY * 2, receiver.receive(&channel)).await {
                let n = message["n"].as_u64().expect("numbered");
                got.push(n);
                longest = longest.max(last.elapsed());
                last = Instant::now();
                if n == count {
                    break;
                }
            }
            (got, longest)
        })
    };
    sleep(Duration::from_millis(300)).await;
    change(cluster, slot).await;
    let failed = sending.await.expect("the sender");
    let (got, longest) = receiving.await.expect("the receiver");
    assert!(
        longest < RECOVERY,
        "{what}: the receiver heard nothing for {longest:?}"
    );
    let expected: Vec<u64> = (1..=count).filter(|n| !failed.contains(n)).collect();
    say(format!(
        "cluster: queue, {what}: received {} of {count}; {} sends failed and were not retried ({failed:?}); \
         longest silence {longest:?}",
        got.len(),
        failed.len()
    ));
    if what == "killed master" {
        // Replication is asynchronous: what the master accepted in its last
        // moment, before its replica copied it, may die with it (Redis
        // promises no more). And a send that failed when the master died
        // may have reached it before its reply was lost, so it may arrive
        // too. What arrives arrives once, in order.
        let mut sent = 1..=count;
        assert!(
            got.iter().all(|n| sent.any(|e| e == *n)),
            "{what}: what arrives was sent, and arrives once, in order: {got:?}"
        );
        let lost = expected.iter().filter(|n| !got.contains(n)).count();
        assert!(
            lost <= LAST_MOMENT,
            "{what}: {lost} accepted messages lost, more than a last moment's"
        );
    } else {
        assert_eq!(
            got, expected,
            "{what}: every accepted message, once, in order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_loses_nothing_when_its_slot_moves() {
    trace();
    let Some(mut cluster) = RedisCluster::start().await else {
        return;
    };
    queue_keeps_everything_while(&mut cluster, "slot move", async |cluster, slot| {
        let from = cluster.master_of(slot).await.port;
        let to = other_master(cluster, from).await;
        cluster.move_slot(slot, to).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_loses_nothing_in_a_planned_failover() {
    trace();
    let Some(mut cluster) = RedisCluster::start().await else {
        return;
    };
    queue_keeps_everything_while(&mut cluster, "CLUSTER FAILOVER", async |cluster, slot| {
        let master = cluster.master_of(slot).await.port;
        cluster.failover(master).await;
    })
    .await;
}

// Once failed in 4 of 6 runs: the test killed a master in the first
// seconds of the cluster, before its replica had copied anything (Redis 7
// waits 5 s before a replica's first sync), so the promoted replica had no
// room: `group_send` found no members. The harness now waits for the
// replicas; what a killed master may take is its last moment's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_across_a_killed_master() {
    trace();
    let Some(mut cluster) = RedisCluster::start().await else {
        return;
    };
    queue_keeps_everything_while(&mut cluster, "killed master", async |cluster, slot| {
        let master = cluster.master_of(slot).await.port;
        cluster.kill(master).await;
        cluster.wait_for_takeover(master, RECOVERY * 2).await;
    })
    .await;
}

/// A cluster that refuses every call (`CLUSTERDOWN`: a master and its
/// replica both killed, so a slot has no live owner and, with
/// `cluster-require-full-coverage` on as by default, every node refuses):
///
/// - a call made meanwhile is retried with backoff and succeeds once the
///   cluster serves again, if that is within the layer's `command_timeout`
///   (layer `b`, 20 s); redis-rs alone gives up after about 4 s of retries;
/// - calls that run out of time fail with `Backend`, and however many fail,
///   the log says it once when it starts and once when it is over (layer
///   `a`, 1 s; and the pub/sub layer `p`, 1 s, whose publishes fail the
///   same way).
///
/// On the current-thread runtime, so that the layers' log is this test's.
#[tokio::test]
async fn a_refusing_cluster_is_retried_and_logged_once() {
    let Some(mut cluster) = RedisCluster::start().await else {
        return;
    };
    let (logs, _guard) = channels_testkit::Logs::capture(tracing::Level::INFO);
    let short = RedisClusterLayer::connect(
        config(&cluster)
            .with_prefix("a")
            .with_command_timeout(Duration::from_secs(1)),
    )
    .await
    .expect("connect layer a");
    let patient = RedisClusterLayer::connect(
        config(&cluster)
            .with_prefix("b")
            .with_command_timeout(Duration::from_secs(20)),
    )
    .await
    .expect("connect layer b");
    let member = patient.new_channel("specific").await.expect("new_channel");
    patient.group_add("room", &member).await.expect("group_add");
    let pubsub = RedisPubSubLayer::connect_cluster(
        config(&cluster)
            .with_prefix("p")
            .with_command_timeout(Duration::from_secs(1)),
    )
    .await
    .expect("connect layer p");

    // A master that holds none of layer b's keys (a restarted node comes
    // back empty), and its replica.
    let mut keep = BTreeSet::new();
    for key in [
        "b:group:room".to_owned(),
        format!("b{{{}}}", non_local_name(&member)),
    ] {
        keep.insert(cluster.master_of(keyslot(&cluster, &key).await).await.port);
    }
    let master = cluster
        .nodes()
        .await
        .into_iter()
        .find(|node| node.master && !node.slots.is_empty() && !keep.contains(&node.port))
        .expect("three masters, b's keys on at most two")
        .port;
    let replica = cluster.replica_port(master).await.expect("a replica");
    // Rooms of layer p: one whose sharded channel is on the master about
    // to die, one on a master that lives.
    let mut dead_room = None;
    let mut live_room = None;
    for i in 0.. {
        let room = format!("room{i}");
        let owner = cluster
            .master_of(keyslot(&cluster, &format!("p__group__{room}")).await)
            .await
            .port;
        if owner == master {
            dead_room.get_or_insert(room);
        } else {
            live_room.get_or_insert(room);
        }
        if dead_room.is_some() && live_room.is_some() {
            break;
        }
    }
    let (dead_room, live_room) = (dead_room.expect("found"), live_room.expect("found"));
    cluster.kill(master).await;
    cluster.kill(replica).await;
    cluster.wait_until_down(RECOVERY * 2).await;
    let down = Instant::now();

    // b's call starts while every node refuses.
    let waiting = tokio::spawn(async move {
        let sent = patient.group_send("room", numbered(1)).await;
        (patient, sent)
    });
    // a's calls fail, each after its 1 s.
    let mut errors = Vec::new();
    for n in 0..5 {
        match short.group_send("room", numbered(n)).await {
            Err(err) => errors.push(err.to_string()),
            Ok(()) => panic!("a group_send succeeded on a cluster that is down"),
        }
    }
    assert!(
        errors.iter().any(|err| err.contains("ClusterDown")),
        "the cluster refused with CLUSTERDOWN: {errors:?}"
    );
    for n in 0..3 {
        assert!(
            pubsub.group_send(&dead_room, numbered(n)).await.is_err(),
            "a publish to a room whose master is dead succeeded"
        );
    }
    // Redis 7 serves sharded pub/sub on a live master while the cluster is
    // down (`cluster-allow-pubsubshard-when-down`, on by default).
    pubsub
        .group_send(&live_room, numbered(0))
        .await
        .expect("a room on a live master keeps talking while the cluster is down");

    cluster.restart(master).await;
    cluster.restart(replica).await;
    cluster.wait_until_ok(RECOVERY * 4).await;
    say(format!(
        "cluster: refused for {:?} (CLUSTERDOWN), then served again",
        down.elapsed()
    ));
    let (patient, sent) = waiting.await.expect("b's group_send");
    sent.expect("a call made while the cluster refused succeeds once it serves again");
    let message = timeout(RECOVERY, patient.receive(&member))
        .await
        .expect("the member got it")
        .expect("receive");
    assert_eq!(message["n"], 1);

    // a serves again: after a quiet second, a success ends its episode.
    sleep(Duration::from_millis(1100)).await;
    short
        .group_send("room", numbered(9))
        .await
        .expect("a group_send once the cluster serves");
    pubsub
        .group_send(&dead_room, numbered(9))
        .await
        .expect("a publish once the cluster serves");
    let lines = logs.lines().join("\n");
    let warned = |prefix: &str| {
        logs.lines()
            .iter()
            .filter(|l| l.contains(" WARN ") && l.contains("refuses") && l.contains(prefix))
            .count()
    };
    assert_eq!(
        warned("prefix=\"a\""),
        1,
        "five failed calls, one warning:\n{lines}"
    );
    assert_eq!(warned("prefix=\"b\""), 0, "b's call did not fail:\n{lines}");
    assert_eq!(
        warned("prefix=\"p\""),
        1,
        "three failed publishes, one warning:\n{lines}"
    );
    assert_eq!(
        logs.count_at("INFO", "serves this layer's calls again"),
        2,
        "one line for each layer when it is over:\n{lines}"
    );
}
