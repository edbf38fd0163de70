//! This step's servers with `REDIS_CLUSTER_URL`: the channel layers on a
//! real six-node Redis Cluster (`channels_testkit::RedisCluster`), the job
//! queue on a Redis of its own (`REDIS_URL`).
//!
//! What must hold: the four showcase layers (two pub/sub, two queue) span
//! two servers through the cluster; a room spans them too, and when
//! the master that holds the room's group is killed, its replica takes over
//! and the room talks again within 5 s, with no change to the app's code.
//! What was said in between is lost (pub/sub), and the test says how much.
//! On the queue layer (`/ws/reliable`), a room whose master is killed loses
//! nothing it accepted beyond the last moment before the replica copied it:
//! a program sends to the room through the same layer and counts which of
//! its sends the cluster accepted.
//!
//! Without redis-server and redis-cli the test says so and passes; with
//! `CI=true` it fails.

use std::time::Duration;

use axum_channels::layer::ChannelLayer;
use axum_channels::layer::redis::{RedisClusterLayer, RedisConfig};
use axum_channels::testing::{Received, Transcript};
use channels_testkit::{RedisCluster, RedisServer, ServerProcess};
use tokio::time::Instant;

const ROOM: &str = "/ws/room/lobby";
const JOINED: &str = "🚪 Someone joined room 'lobby'";

/// How soon the room must talk again after its master died.
const RECOVERY: Duration = Duration::from_secs(5);

/// The room's Redis channel on the `"chat"` layer: `{prefix}__group__{group}`.
const ROOM_CHANNEL: &str = "chat__group__room_lobby";

async fn keyslot(port: u16, name: &str) -> u16 {
    let output = tokio::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "cluster", "keyslot", name])
        .output()
        .await
        .expect("redis-cli");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("a slot")
}

/// Two servers of this step on `cluster`, with `redis` for the jobs.
async fn servers(cluster: &RedisCluster, redis: &RedisServer) -> (ServerProcess, ServerProcess) {
    let env = [
        ("REDIS_URL", redis.url()),
        ("REDIS_CLUSTER_URL", cluster.url()),
        // `SERVER_LOG` shows more of the servers' log in a failure.
        (
            "RUST_LOG",
            std::env::var("SERVER_LOG")
                .unwrap_or_else(|_| "warn,step_06_presence_history=info".into()),
        ),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let binary = env!("CARGO_BIN_EXE_step-06-presence-history");
    let a = ServerProcess::start(binary, &env).await;
    let b = ServerProcess::start(binary, &env).await;
    (a, b)
}

#[tokio::test]
async fn the_showcase_groups_span_two_servers_on_a_cluster() {
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (a, b) = servers(&cluster, &redis).await;
    let transcript = Transcript::default();
    // (endpoint, what A's client sends, what everyone then hears)
    let cases = [
        ("/ws/chat", "from A", "💬 from A"),
        ("/ws/reliable", "from A", "📨 from A"),
        (
            "/ws/notifications",
            r#"{"message": "from A"}"#,
            r#"{"type":"user","message":"🔔 Notification: from A"}"#,
        ),
        ("/ws/analytics", "from A", "📊 Analytics: from A"),
    ];
    for (path, said, heard) in cases {
        let mut on_a = a.connect_as("A", path, &transcript).await;
        let mut on_b = b.connect_as("B", path, &transcript).await;
        // Greetings, and B's join where the endpoint announces one.
        while on_a.try_recv(Duration::from_millis(300)).await.is_some() {}
        while on_b.try_recv(Duration::from_millis(300)).await.is_some() {}
        on_a.send_text(said).await;
        assert_eq!(on_a.recv_text().await, heard, "{path} on A");
        assert_eq!(on_b.recv_text().await, heard, "{path} on B");
    }
}

// A CI dry run on 2026-12-06 (after 24 passing runs) once saw both servers
// silent for the whole 10 s, and run in a loop this failed about one run in
// six: the servers had subscribed again, but no node held the room's
// subscription (redis-rs can confirm an `SSUBSCRIBE` on a node connection
// it then replaces). The pub/sub layer now subscribes everything once more
// a second after subscribing it again, and opens its cluster connection
// again when calls to a slot keep failing towards a node. A failure prints
// both servers' log; `SERVER_LOG=warn,step_06_presence_history=info,axum_channels=debug`
// shows more.
#[tokio::test]
async fn a_room_on_a_cluster_talks_again_after_its_master_dies() {
    let Some(mut cluster) = RedisCluster::start().await else {
        return;
    };
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (a, b) = servers(&cluster, &redis).await;

    let transcript = Transcript::default();
    let mut alice = a.connect_as("alice@A", ROOM, &transcript).await;
    assert_eq!(alice.recv_text().await, JOINED);
    let mut bob = b.connect_as("bob@B", ROOM, &transcript).await;
    assert_eq!(alice.recv_text().await, JOINED);
    assert_eq!(bob.recv_text().await, JOINED);
    alice.send_text("before").await;
    assert_eq!(bob.recv_text().await, "💬 before");
    assert_eq!(alice.recv_text().await, "💬 before");

    let first = cluster.nodes().await[0].port;
    let slot = keyslot(first, ROOM_CHANNEL).await;
    let master = cluster.master_of(slot).await.port;
    let killed = Instant::now();
    cluster.kill(master).await;

    // Alice keeps talking; Bob must hear her again within RECOVERY.
    let mut said = 0;
    let heard = loop {
        assert!(
            killed.elapsed() < RECOVERY * 2,
            "the room stayed silent for {:?} after its master died\n\
             server A:\n{}\nserver B:\n{}",
            killed.elapsed(),
            a.output(),
            b.output()
        );
        said += 1;
        alice.send_text(&format!("after {said}")).await;
        if let Some(frame) = bob.try_recv(Duration::from_millis(250)).await {
            break frame;
        }
    };
    let silence = killed.elapsed();
    // Whatever else is still on its way counts as heard.
    let mut heard_count = 1;
    while bob.try_recv(Duration::from_millis(500)).await.is_some() {
        heard_count += 1;
    }
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!(
            "step 06 on a cluster: the room talked again {silence:?} after its master died; \
             {} of {said} messages said meanwhile were lost; first heard: {heard:?}\n",
            said - heard_count
        )
        .as_bytes(),
    );
    assert!(silence < RECOVERY, "silent for {silence:?}");
}

/// The reliable chat's group, and the Redis key of its members on the
/// `"queue"` layer: `{prefix}:group:{group}`.
const RELIABLE: &str = "/ws/reliable";
const RELIABLE_GROUP_KEY: &str = "queue:group:reliable_chat";

/// How often the program says something to the reliable chat.
const PACE: Duration = Duration::from_millis(50);

/// Sends a master may take with it when it dies: what it accepted in its
/// last moment, before its replica copied it (replication is
/// asynchronous). 100 ms at `PACE`.
const LAST_MOMENT: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reliable_room_on_a_cluster_keeps_what_it_accepted_when_its_master_dies() {
    let Some(mut cluster) = RedisCluster::start().await else {
        return;
    };
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let (a, b) = servers(&cluster, &redis).await;
    let transcript = Transcript::default();
    let mut alice = a.connect_as("alice@A", RELIABLE, &transcript).await;
    let mut bob = b.connect_as("bob@B", RELIABLE, &transcript).await;
    // The greetings each connection sends the room.
    while alice.try_recv(Duration::from_millis(300)).await.is_some() {}
    while bob.try_recv(Duration::from_millis(300)).await.is_some() {}

    // A program on the same layer as the servers' "queue" alias.
    let config = RedisConfig::default()
        .with_hosts(cluster.urls())
        .with_prefix("queue");
    let sender = RedisClusterLayer::connect(config)
        .await
        .expect("connect the sender");
    let say = |n: u64| {
        serde_json::json!({"type": "reliable_chat_message", "message": format!("n{n}")})
            .as_object()
            .expect("an object")
            .clone()
    };

    // ANCHOR: reliable_kill
    let first = cluster.nodes().await[0].port;
    let slot = keyslot(first, RELIABLE_GROUP_KEY).await;
    let master = cluster.master_of(slot).await.port;
    let sending = tokio::spawn(async move {
        let mut accepted = Vec::new();
        let mut killed_at = None;
        for n in 1..=200u64 {
            if n == 40 {
                cluster.kill(master).await;
                killed_at = Some(Instant::now());
            }
            if sender.group_send("reliable_chat", say(n)).await.is_ok() {
                accepted.push(n);
            }
            tokio::time::sleep(PACE).await;
        }
        (accepted, killed_at.expect("killed"), cluster)
    });
    // ANCHOR_END: reliable_kill
    let hear = |mut client: axum_channels::testing::TestClient| async move {
        let mut heard: Vec<(u64, Instant)> = Vec::new();
        while let Some(frame) = client.try_recv(RECOVERY * 2).await {
            let Received::Text(text) = frame else {
                panic!("a member's connection ended: {frame}");
            };
            if let Some(n) = text.strip_prefix('n').and_then(|n| n.parse().ok()) {
                heard.push((n, Instant::now()));
                if n == 200 {
                    break;
                }
            }
        }
        heard
    };
    let (alice_heard, bob_heard) = tokio::join!(hear(alice), hear(bob));
    let (accepted, killed_at, _cluster) = sending.await.expect("the sender");
    for (who, heard) in [("alice@A", &alice_heard), ("bob@B", &bob_heard)] {
        let numbers: Vec<u64> = heard.iter().map(|(n, _)| *n).collect();
        let mut sorted = numbers.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(numbers, sorted, "{who} heard each once, in order");
        let lost: Vec<u64> = accepted
            .iter()
            .copied()
            .filter(|n| !numbers.contains(n))
            .collect();
        // The longest silence after the kill.
        let mut times: Vec<Instant> = vec![killed_at];
        times.extend(heard.iter().map(|(_, at)| *at).filter(|at| *at > killed_at));
        let silence = times
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!(
                "step 06 on a cluster, queue layer: {who} heard {} of 200; {} sends \
                 refused while the master was away; accepted and lost: {lost:?}; \
                 longest silence after the kill {silence:?}\n",
                numbers.len(),
                200 - accepted.len(),
            )
            .as_bytes(),
        );
        assert!(silence < RECOVERY, "{who} heard nothing for {silence:?}");
        assert!(
            lost.len() <= LAST_MOMENT,
            "{who} lost {lost:?}, accepted by the cluster"
        );
    }
}
