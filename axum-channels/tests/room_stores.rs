//! The room stores (`axum_channels::room`) on both backends: history and
//! recovery across two store instances on one Redis (two servers), presence
//! that counts names not connections, a dead server's entries swept after
//! their deadline and announced once, and the presence task's batched
//! diffs.
//!
//! Redis tests start their own redis-server (see
//! `channels_testkit::RedisServer`); without one they say so and pass,
//! and under `CI=true` they fail.
#![cfg(feature = "redis")]

use std::sync::Arc;
use std::time::Duration;

use axum_channels::layer::redis::{RedisConfig, RedisHistory, RedisPresence};
use axum_channels::layer::{ChannelLayer, InMemoryLayer};
use axum_channels::room::{
    History, HistoryStore, MemoryHistory, Position, Presence, PresenceConfig, PresenceStore,
};
use channels_testkit::RedisServer;
use serde_json::{Map, Value, json};

fn said(n: u64) -> Map<String, Value> {
    json!({"name": "alice", "text": format!("message {n}")})
        .as_object()
        .cloned()
        .unwrap()
}

fn config(redis: &RedisServer) -> RedisConfig {
    RedisConfig::default()
        .with_hosts(vec![redis.url()])
        .with_prefix("test")
}

/// What both backends must do with one history: recover exactly, or say
/// the gap is too old and hand back the latest.
/// `exact`: the store keeps exactly `size` (Redis keeps at least that).
async fn history_contract(a: &dyn HistoryStore, b: &dyn HistoryStore, size: u64, exact: bool) {
    let empty = a.recover("room_r", None).await.unwrap();
    assert_eq!((empty.top, empty.entries.len()), (0, 0));
    let mut last = None;
    for n in 1..=size + 5 {
        // Alternate stores: two servers appending to one room.
        let store = if n % 2 == 0 { a } else { b };
        let entry = store.append("room_r", said(n)).await.unwrap();
        assert_eq!(entry.offset, n, "offsets count up across servers");
        assert_eq!(entry.epoch, empty.epoch, "one epoch for the room");
        last = Some(entry);
    }
    let last = last.unwrap();
    let top = size + 5;
    // Missed the last 3: exactly those, from the other server.
    let since = Position {
        offset: top - 3,
        ..last.position()
    };
    let got = b.recover("room_r", Some(&since)).await.unwrap();
    assert!(got.recovered);
    let offsets: Vec<u64> = got.entries.iter().map(|e| e.offset).collect();
    assert_eq!(offsets, [top - 2, top - 1, top]);
    assert_eq!(got.entries[2].data["text"], format!("message {top}"));
    // Missed nothing.
    let got = a.recover("room_r", Some(&last.position())).await.unwrap();
    assert!(got.recovered && got.entries.is_empty());
    // Missed more than is kept: told so, and given the latest `size`.
    if exact {
        let since = Position {
            offset: 1,
            ..last.position()
        };
        let got = a.recover("room_r", Some(&since)).await.unwrap();
        assert!(!got.recovered);
        assert_eq!(got.entries.len() as u64, size);
        assert_eq!(got.entries.last().unwrap().offset, top);
    }
    // Another epoch, or an offset from the future: not recovered.
    let since = Position {
        offset: top - 1,
        epoch: "gone".into(),
    };
    assert!(!a.recover("room_r", Some(&since)).await.unwrap().recovered);
    let since = Position {
        offset: top + 10,
        ..last.position()
    };
    assert!(!a.recover("room_r", Some(&since)).await.unwrap().recovered);
}

#[tokio::test]
async fn memory_history_recovers_exactly() {
    let store = MemoryHistory::new(10);
    history_contract(&store, &store, 10, true).await;
}

#[tokio::test]
async fn redis_history_recovers_exactly_across_two_servers() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let ttl = Duration::from_secs(60);
    // Redis trims with `MAXLEN ~`: it keeps at least the size, and whole
    // blocks of 100; the latest `size` are what a new member gets.
    let a = RedisHistory::connect(&config(&redis), 10, ttl)
        .await
        .unwrap();
    let b = RedisHistory::connect(&config(&redis), 10, ttl)
        .await
        .unwrap();
    history_contract(&a, &b, 10, false).await;
    // Past a block, the trimmed ones are gone and recovery says so.
    for n in 0..300 {
        a.append("room_t", said(n)).await.unwrap();
    }
    let last = a.recover("room_t", None).await.unwrap();
    let since = Position {
        offset: 1,
        epoch: last.epoch.clone(),
    };
    let got = b.recover("room_t", Some(&since)).await.unwrap();
    assert!(!got.recovered);
    let offsets: Vec<u64> = got.entries.iter().map(|e| e.offset).collect();
    assert_eq!(offsets, (291..=300).collect::<Vec<_>>(), "the latest 10");
}

#[tokio::test]
async fn redis_presence_counts_names_and_sweeps_a_dead_server() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let ttl = Duration::from_millis(400);
    let a = RedisPresence::connect(&config(&redis), ttl).await.unwrap();
    let b = RedisPresence::connect(&config(&redis), ttl).await.unwrap();
    // Two tabs of alice, on two servers: one member.
    assert!(a.join("room_p", "alice", "a1").await.unwrap().first);
    let joined = b.join("room_p", "alice", "b1").await.unwrap();
    assert!(!joined.first);
    let joined = b.join("room_p", "bob", "b2").await.unwrap();
    assert!(joined.first);
    assert_eq!(joined.members, ["alice", "bob"]);
    // Server B dies: only A renews. After the deadline, A's heartbeat
    // sweeps B's entries: bob left (once), alice stays (her tab on A).
    let mut swept = Vec::new();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let conns = [("alice".to_owned(), "a1".to_owned())];
        let (back, gone) = a.heartbeat("room_p", &conns).await.unwrap();
        assert!(back.is_empty());
        swept.extend(gone);
    }
    assert_eq!(swept, ["bob"]);
    let (version, here, gone) = a
        .present("room_p", &["alice".into(), "bob".into()])
        .await
        .unwrap();
    assert_eq!((here, gone), (vec![true, false], Vec::<String>::new()));
    assert!(version >= 3);
    // The last tab closes: alice leaves.
    assert_eq!(
        a.leave("room_p", "alice", "a1").await.unwrap(),
        (true, vec![])
    );
}

/// The presence task sends one diff per flush, whatever the number of
/// joins, and the drop of a guard is a leave.
#[tokio::test]
async fn joins_are_batched_into_diffs() {
    let layer: Arc<dyn ChannelLayer> = Arc::new(InMemoryLayer::default());
    let config = PresenceConfig {
        flush: Duration::from_millis(100),
        ..PresenceConfig::default()
    };
    let presence = Presence::in_memory(Arc::clone(&layer), config).unwrap();
    let watcher = layer.new_channel("watch").await.unwrap();
    layer.group_add("room_b", &watcher).await.unwrap();
    let mut guards = Vec::new();
    for n in 0..200 {
        let membership = presence.join("room_b", &format!("user{n}")).await.unwrap();
        guards.push(membership.guard);
    }
    let mut joined = 0;
    let mut diffs = 0;
    while joined < 200 {
        let diff = layer.receive(&watcher).await.unwrap();
        assert_eq!(diff["type"], "presence_diff");
        joined += diff["joins"].as_array().unwrap().len();
        diffs += 1;
    }
    assert!(diffs <= 3, "200 joins took {diffs} diffs");
    drop(guards.pop());
    let diff = layer.receive(&watcher).await.unwrap();
    assert_eq!(diff["leaves"], json!(["user199"]));
    assert!(diff["version"].as_u64().unwrap() > 200);
    // History, through the same facade the consumers use.
    let history = History::in_memory(5);
    let entry = history.append("room_b", said(1)).await.unwrap();
    assert_eq!(entry.offset, 1);
}
