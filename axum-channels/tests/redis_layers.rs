//! What the Redis layers do beyond the conformance suite: what they leave in
//! Redis (the wire format Python reads), several hosts, the faults of the
//! Python layers they avoid, bad input, and Redis going away.
//!
//! Every test starts its own redis-server(s) on free ports (see
//! `channels_testkit::RedisServer`): without redis-server installed
//! each says so on stderr and passes, and under `CI=true` it fails. Real
//! waits are short and bounded: polls with a deadline, never a fixed sleep
//! for something that can be awaited.
#![cfg(feature = "redis")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum_channels::layer::redis::{
    RedisConfig, RedisLayer, RedisPubSubLayer, consistent_hash, non_local_name,
};
use axum_channels::layer::{ChannelLayer, LayerError, LayerMessage};
use channels_testkit::{Logs, RedisServer};
use redis::aio::MultiplexedConnection;
use serde_json::json;
use tokio::time::{Instant, timeout};

/// How long a receive that should succeed may take.
const GUARD: Duration = Duration::from_secs(5);

fn msg(value: serde_json::Value) -> LayerMessage {
    value.as_object().expect("an object").clone()
}

fn numbered(n: u64) -> LayerMessage {
    msg(json!({"type": "test.message", "n": n}))
}

/// The test configuration: short blocking pops, so closed poppers stop soon.
fn config(hosts: &[String]) -> RedisConfig {
    RedisConfig::default()
        .with_hosts(hosts.to_vec())
        .with_block_timeout(Duration::from_secs(1))
}

async fn queue(hosts: &[String]) -> RedisLayer {
    RedisLayer::connect(config(hosts))
        .await
        .expect("connect the queue layer")
}

async fn pubsub(hosts: &[String]) -> RedisPubSubLayer {
    RedisPubSubLayer::connect(config(hosts))
        .await
        .expect("connect the pub/sub layer")
}

/// A plain connection, to look at what the layers left in Redis.
async fn raw(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .expect("a valid URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis-server")
}

async fn recv(layer: &dyn ChannelLayer, channel: &str) -> LayerMessage {
    match timeout(GUARD, layer.receive(channel)).await {
        Ok(Ok(message)) => message,
        Ok(Err(err)) => panic!("receive on {channel:?} failed: {err}"),
        Err(_) => panic!("receive on {channel:?} got nothing within {GUARD:?}"),
    }
}

/// Requires that `channel` holds nothing: a sentinel sent now is the next
/// message (no clock needed).
async fn assert_nothing_queued(layer: &dyn ChannelLayer, channel: &str, context: &str) {
    let sentinel = msg(json!({"type": "test.sentinel"}));
    layer
        .send(channel, sentinel.clone())
        .await
        .expect("send the sentinel");
    assert_eq!(recv(layer, channel).await, sentinel, "{context}");
}

/// The bytes a Python peer's core layer writes for `send(channel,
/// {"type": kind})`: 12 random bytes, then a msgpack map with
/// `__asgi_channel__` (a str) last. Written out by hand, from the wire
/// specification, so that it checks our reader rather than our writer.
fn python_send_payload(kind: &str, channel: &str) -> Vec<u8> {
    let mut bytes = vec![
        0x5c, 0xed, 0x62, 0x5c, 0x65, 0x22, 0x94, 0x30, 0xaa, 0x43, 0xa7, 0x3d,
    ];
    bytes.push(0x82); // a map of 2
    pack_str(&mut bytes, "type");
    pack_str(&mut bytes, kind);
    pack_str(&mut bytes, "__asgi_channel__");
    pack_str(&mut bytes, channel);
    bytes
}

fn pack_str(bytes: &mut Vec<u8>, text: &str) {
    let len = text.len();
    if len < 32 {
        bytes.push(0xa0 | len as u8);
    } else {
        assert!(len < 256);
        bytes.extend([0xd9, len as u8]);
    }
    bytes.extend_from_slice(text.as_bytes());
}

/// Polls `condition` every 20 ms until it holds, failing after `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn zcard(conn: &mut MultiplexedConnection, key: &str) -> usize {
    redis::cmd("ZCARD")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}

mod wire {
    //! What the layers leave in Redis is exactly what the Python layers
    //! write and read (the wire specification, §1.3-1.4, §2.2-2.3, §3).

    use super::*;

    #[tokio::test]
    async fn a_send_leaves_what_python_reads() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let layer = queue(&[server.url()]).await;
        let mut conn = raw(&server.url()).await;
        let channel = layer.new_channel("specific").await.unwrap();
        assert_eq!(
            channel.len(),
            74,
            "specific.{{32 hex}}!{{32 hex}}: {channel}"
        );
        layer
            .send(
                &channel,
                msg(json!({"type": "chat.message", "message": "hi"})),
            )
            .await
            .unwrap();

        let key = format!("asgi{}", non_local_name(&channel));
        let entries: Vec<(Vec<u8>, f64)> = redis::cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(entries.len(), 1, "one member in {key}");
        let (member, score) = &entries[0];
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            (now - score).abs() < 5.0,
            "the score is UNIX seconds: {score}"
        );
        assert!(score.fract() != 0.0, "a float, as time.time(): {score}");
        assert_eq!(member.len(), 12 + 1 + 5 + 8 + 3 + 13 + 17 + 2 + 74);
        assert_eq!(member[12], 0x83, "a map of 3 after 12 random bytes");
        let mut tail = vec![0xb0];
        tail.extend_from_slice(b"__asgi_channel__");
        tail.extend([0xd9, 74]);
        tail.extend_from_slice(channel.as_bytes());
        assert!(
            member.ends_with(&tail),
            "__asgi_channel__ last, as a str of the full name"
        );
        let ttl: i64 = redis::cmd("TTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!((59..=60).contains(&ttl), "EXPIRE expiry: {ttl}");

        layer.group_add("reliable_chat", &channel).await.unwrap();
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg("asgi:group:reliable_chat")
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(members, vec![channel.clone()]);
        let ttl: i64 = redis::cmd("TTL")
            .arg("asgi:group:reliable_chat")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!((86399..=86400).contains(&ttl), "EXPIRE group_expiry: {ttl}");

        // A group message to two local members is one member in Redis, with
        // __asgi_channel__ as an array (channels_redis#93).
        let second = layer.new_channel("specific").await.unwrap();
        layer.group_add("reliable_chat", &second).await.unwrap();
        layer
            .group_send("reliable_chat", msg(json!({"type": "chat.message"})))
            .await
            .unwrap();
        assert_eq!(
            zcard(&mut conn, &key).await,
            2,
            "the send's and the group's"
        );
        assert_eq!(recv(&layer, &channel).await["message"], "hi");
        for ch in [&channel, &second] {
            assert_eq!(recv(&layer, ch).await["type"], "chat.message");
        }
    }

    #[tokio::test]
    async fn a_python_send_and_group_send_arrive() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let layer = queue(&[server.url()]).await;
        let mut conn = raw(&server.url()).await;
        let channel = layer.new_channel("specific").await.unwrap();
        let key = format!("asgi{}", non_local_name(&channel));
        redis::cmd("ZADD")
            .arg(&key)
            .arg("1795673582.8629916") // a score in the past: a stale-looking but valid message
            .arg(python_send_payload("old.news", &channel))
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        // Python's bytes for group_send: __asgi_channel__ is an array.
        let mut group = python_send_payload("group.news", &channel);
        let at = group.len() - channel.len() - 2;
        group.insert(at, 0x91);
        let now = format!(
            "{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64()
        );
        redis::cmd("ZADD")
            .arg(&key)
            .arg(&now)
            .arg(group)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        // The first was sent long ago: older than `expiry`, so the receiver
        // drops it (channels_redis#182), and only the second arrives.
        assert_eq!(
            recv(&layer, &channel).await,
            msg(json!({"type": "group.news"}))
        );
        assert_nothing_queued(&layer, &channel, "the stale message was dropped").await;
    }

    #[tokio::test]
    async fn pubsub_publishes_bare_msgpack_on_python_names() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let layer = pubsub(&[server.url()]).await;
        let channel = layer.new_channel("specific").await.unwrap();
        assert!(channel.starts_with("asgispecific."), "{channel}");
        assert_eq!(channel.len(), "asgispecific.".len() + 32);

        let client = redis::Client::open(server.url()).unwrap();
        let mut spy = client.get_async_pubsub().await.unwrap();
        spy.psubscribe("asgi*").await.unwrap();
        layer.group_add("chat_room", &channel).await.unwrap();
        let hi = msg(json!({"type": "chat.message", "message": "hi"}));
        layer.group_send("chat_room", hi.clone()).await.unwrap();
        layer.send(&channel, hi.clone()).await.unwrap();

        use futures_util::StreamExt;
        let mut messages = spy.on_message();
        let expected: Vec<u8> = [
            &[0x82, 0xa7][..],
            b"message",
            &[0xa2],
            b"hi",
            &[0xa4],
            b"type",
            &[0xac],
            b"chat.message",
        ]
        .concat();
        for name in ["asgi__group__chat_room", channel.as_str()] {
            let published = timeout(GUARD, messages.next()).await.unwrap().unwrap();
            assert_eq!(published.get_channel_name(), name);
            assert_eq!(
                published.get_payload_bytes(),
                &expected[..],
                "a bare msgpack map, no random prefix"
            );
        }
        assert_eq!(recv(&layer, &channel).await, hi);
        assert_eq!(recv(&layer, &channel).await, hi);
    }
}

mod sharding {
    //! Several hosts: names live where Python's consistent hash puts them,
    //! and messages reach their receivers across hosts.

    use super::*;

    async fn two() -> Option<(RedisServer, RedisServer, Vec<String>)> {
        let a = RedisServer::start().await?;
        let b = RedisServer::start().await?;
        let urls = vec![a.url(), b.url()];
        Some((a, b, urls))
    }

    async fn exists(conn: &mut MultiplexedConnection, key: &str) -> bool {
        redis::cmd("EXISTS")
            .arg(key)
            .query_async::<u32>(conn)
            .await
            .unwrap()
            == 1
    }

    #[tokio::test]
    async fn queue_names_live_on_the_host_their_hash_picks() {
        let Some((_a, _b, urls)) = two().await else {
            return;
        };
        let layer = queue(&urls).await;
        let mut conns = [raw(&urls[0]).await, raw(&urls[1]).await];
        let member = layer.new_channel("specific").await.unwrap();
        let mut seen = [false; 2];
        for group in [
            "room_a",
            "room_b",
            "room_c",
            "reliable_chat",
            "chat",
            "news",
        ] {
            layer.group_add(group, &member).await.unwrap();
            let key = format!("asgi:group:{group}");
            let host = consistent_hash(group, 2);
            seen[host] = true;
            assert!(exists(&mut conns[host], &key).await, "{key} on host {host}");
            assert!(
                !exists(&mut conns[1 - host], &key).await,
                "{key} only there"
            );
        }
        assert_eq!(seen, [true, true], "the groups cover both hosts");

        let mut seen = [false; 2];
        for prefix in ["a", "b", "c", "d", "e", "f", "g", "h"] {
            let channel = layer.new_channel(prefix).await.unwrap();
            layer.send(&channel, numbered(1)).await.unwrap();
            let key = format!("asgi{}", non_local_name(&channel));
            let host = consistent_hash(non_local_name(&channel), 2);
            seen[host] = true;
            assert!(exists(&mut conns[host], &key).await, "{key} on host {host}");
            assert!(
                !exists(&mut conns[1 - host], &key).await,
                "{key} only there"
            );
        }
        assert!(
            seen.iter().all(|s| *s),
            "8 prefixes cover both hosts: {seen:?}"
        );

        // Plain channels go round robin, as in Python.
        for n in 0..2 {
            layer.send("worker.jobs", numbered(n)).await.unwrap();
        }
        for conn in &mut conns {
            assert_eq!(zcard(conn, "asgiworker.jobs").await, 1);
        }
        let mut got = vec![
            recv(&layer, "worker.jobs").await["n"].as_u64().unwrap(),
            recv(&layer, "worker.jobs").await["n"].as_u64().unwrap(),
        ];
        got.sort_unstable();
        assert_eq!(
            got,
            [0, 1],
            "a receiver reads a plain channel on every host"
        );
    }

    #[tokio::test]
    async fn a_specific_send_reaches_its_receiver_and_so_does_a_python_one() {
        let Some((_a, _b, urls)) = two().await else {
            return;
        };
        let sender = queue(&urls).await;
        let receiver = queue(&urls).await;
        // A channel whose full name hashes to the other host than its
        // non-local name: where Python's send loses the message.
        let mut channel = String::new();
        for _ in 0..64 {
            channel = receiver.new_channel("specific").await.unwrap();
            if consistent_hash(&channel, 2) != consistent_hash(non_local_name(&channel), 2) {
                break;
            }
        }
        let full_host = consistent_hash(&channel, 2);
        assert_ne!(full_host, consistent_hash(non_local_name(&channel), 2));

        sender.send(&channel, numbered(1)).await.unwrap();
        assert_eq!(recv(&receiver, &channel).await, numbered(1));

        // What Python's send writes: the right key, on the host of the full
        // name. The popper reads its key on every host, so it arrives too.
        let mut conn = raw(&urls[full_host]).await;
        redis::cmd("ZADD")
            .arg(format!("asgi{}", non_local_name(&channel)))
            .arg(format!(
                "{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs_f64()
            ))
            .arg(python_send_payload("from.python", &channel))
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            recv(&receiver, &channel).await,
            msg(json!({"type": "from.python"}))
        );
    }

    #[tokio::test]
    async fn group_send_reaches_members_on_every_host() {
        let Some((_a, _b, urls)) = two().await else {
            return;
        };
        // Layer instances are processes: find two whose keys live on
        // different hosts (each has a random client prefix).
        let mut members: [Option<(RedisLayer, String)>; 2] = [None, None];
        for _ in 0..64 {
            let layer = queue(&urls).await;
            let channel = layer.new_channel("specific").await.unwrap();
            let host = consistent_hash(non_local_name(&channel), 2);
            if members[host].is_none() {
                members[host] = Some((layer, channel));
            }
            if members.iter().all(Option::is_some) {
                break;
            }
        }
        let members: Vec<(RedisLayer, String)> = members.into_iter().map(Option::unwrap).collect();
        for (layer, channel) in &members {
            layer.group_add("room", channel).await.unwrap();
        }
        let sender = queue(&urls).await;
        sender.group_send("room", numbered(7)).await.unwrap();
        for (layer, channel) in &members {
            assert_eq!(recv(layer, channel).await, numbered(7));
        }
    }

    /// A process with more members of a group than one message can name
    /// (a server's share of 100,000 connections) gets several messages in
    /// its key, each under `max_message_size` and routed to some of them,
    /// as a Python reader reads any group message; each member gets its
    /// copy once. With one message, the send failed as too large.
    #[tokio::test]
    async fn a_group_too_large_for_one_message_gets_several() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let limit = 600;
        let small = || config(&[server.url()]).with_max_message_size(limit);
        let members = RedisLayer::connect(small()).await.unwrap();
        let mut channels = Vec::new();
        for _ in 0..20 {
            let channel = members.new_channel("specific").await.unwrap();
            members.group_add("crowd", &channel).await.unwrap();
            channels.push(channel);
        }
        let sender = RedisLayer::connect(small()).await.unwrap();
        sender.group_send("crowd", numbered(1)).await.unwrap();

        // Nobody receives yet, so the messages wait in Redis to be looked at.
        let key = format!("asgi{}", non_local_name(&channels[0]));
        let mut conn = raw(&server.url()).await;
        let payloads: Vec<Vec<u8>> = redis::cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            payloads.len() >= 3,
            "20 names of 75 bytes in 600-byte messages: {}",
            payloads.len()
        );
        for payload in &payloads {
            assert!(
                payload.len() <= limit,
                "a message of {} bytes",
                payload.len()
            );
        }
        for channel in &channels {
            assert_eq!(recv(&members, channel).await, numbered(1));
        }
        for channel in &channels {
            assert_nothing_queued(&members, channel, "each member got one copy").await;
        }
    }

    #[tokio::test]
    async fn pubsub_subscribes_where_the_hash_says_and_reaches_every_host() {
        let Some((_a, _b, urls)) = two().await else {
            return;
        };
        let first = pubsub(&urls).await;
        let second = pubsub(&urls).await;
        let mut conns = [raw(&urls[0]).await, raw(&urls[1]).await];
        let mut hosts = [false; 2];
        let mut channels = Vec::new();
        for group in ["room_a", "room_b", "room_c", "chat_room", "news", "lobby"] {
            let channel = first.new_channel("specific").await.unwrap();
            first.group_add(group, &channel).await.unwrap();
            let name = format!("asgi__group__{group}");
            let host = consistent_hash(&name, 2);
            hosts[host] = true;
            let subscribed: Vec<String> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .arg(&name)
                .query_async(&mut conns[host])
                .await
                .unwrap();
            assert_eq!(subscribed, vec![name.clone()], "{name} on host {host}");
            second.group_send(group, numbered(1)).await.unwrap();
            assert_eq!(recv(&first, &channel).await, numbered(1), "{group}");
            channels.push(channel);
        }
        assert_eq!(hosts, [true, true], "the groups cover both hosts");
        for channel in &channels {
            second.send(channel, numbered(2)).await.unwrap();
            assert_eq!(recv(&first, channel).await, numbered(2));
        }
    }
}

mod better_than_python {
    //! The faults of channels_redis (the wire specification, §7), each
    //! with the test that we do not have it.

    use super::*;

    /// channels_redis#366, #151, #165, channels#1683: receives cancelled at
    /// random moments while messages flow lose nothing, duplicate nothing,
    /// and keep the order.
    async fn cancelled_waits_lose_nothing(layer: Arc<dyn ChannelLayer>) {
        let channel = layer.new_channel("specific").await.unwrap();
        const COUNT: u64 = 200;
        let sender = {
            let layer = Arc::clone(&layer);
            let channel = channel.clone();
            tokio::spawn(async move {
                for n in 0..COUNT {
                    layer.send(&channel, numbered(n)).await.unwrap();
                    if n % 4 == 0 {
                        // Paced, so that receivers also wait (and are
                        // cancelled while waiting), not only find messages.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            })
        };
        let mut got = Vec::new();
        let mut cancelled = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut window = 0u64;
        while got.len() < COUNT as usize {
            assert!(
                Instant::now() < deadline,
                "received {} of {COUNT}",
                got.len()
            );
            // Windows of 0 to 2 ms: most receives are cancelled mid-wait.
            window = (window + 1) % 3;
            match timeout(Duration::from_millis(window), layer.receive(&channel)).await {
                Ok(message) => got.push(message.unwrap()["n"].as_u64().unwrap()),
                Err(_) => cancelled += 1,
            }
        }
        sender.await.unwrap();
        assert!(
            cancelled > 10,
            "the test cancelled only {cancelled} receives"
        );
        assert_eq!(got, (0..COUNT).collect::<Vec<_>>(), "all, once, in order");
    }

    #[tokio::test]
    async fn queue_cancelled_waits_lose_nothing() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        cancelled_waits_lose_nothing(Arc::new(queue(&[server.url()]).await)).await;
    }

    #[tokio::test]
    async fn pubsub_cancelled_waits_lose_nothing() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let config = config(&[server.url()]).with_capacity(1000);
        let layer = RedisPubSubLayer::connect(config).await.unwrap();
        cancelled_waits_lose_nothing(Arc::new(layer)).await;
    }

    /// channels_redis#212, channels#1361: a buffer holds at most the
    /// channel's capacity, and close_channel frees it (and leaves groups).
    #[tokio::test]
    async fn buffers_are_bounded_and_freed_by_close_channel() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let (logs, _guard) = Logs::capture(tracing::Level::INFO);
        let layer = Arc::new(
            RedisLayer::connect(config(&[server.url()]).with_capacity(3))
                .await
                .unwrap(),
        );
        let mut conn = raw(&server.url()).await;
        // Two channels of one process share one key: while `busy` waits,
        // the popper also pops what is sent to `idle`, into idle's buffer.
        let busy = layer.new_channel("specific").await.unwrap();
        let idle = layer.new_channel("specific").await.unwrap();
        let key = format!("asgi{}", non_local_name(&idle));
        let waiting = {
            let layer = Arc::clone(&layer);
            let busy = busy.clone();
            tokio::spawn(async move { layer.receive(&busy).await })
        };
        for n in 1..=6 {
            layer.send(&idle, numbered(n)).await.unwrap();
            eventually(GUARD, "the popper takes it", || async {
                zcard(&mut raw(&server.url()).await, &key).await == 0
            })
            .await;
        }
        for n in 4..=6 {
            assert_eq!(
                recv(&*layer, &idle).await,
                numbered(n),
                "the newest 3 are kept"
            );
        }
        assert_eq!(
            logs.count("local buffer is full"),
            1,
            "three drops, one warning"
        );

        layer.group_add("room", &idle).await.unwrap();
        assert_eq!(layer.local_channels(), 2);
        layer.close_channel(&idle).await.unwrap();
        assert_eq!(layer.local_channels(), 1, "the buffer is freed");
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg("asgi:group:room")
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            members.is_empty(),
            "close_channel left the group: {members:?}"
        );
        // A message for the closed channel is dropped, not buffered again.
        layer.send(&idle, numbered(9)).await.unwrap();
        layer.send(&busy, numbered(10)).await.unwrap();
        let got = timeout(GUARD, waiting).await.unwrap().unwrap().unwrap();
        assert_eq!(got, numbered(10));
        assert_eq!(layer.local_channels(), 1);
        layer.close_channel(&busy).await.unwrap();
        assert_eq!(layer.local_channels(), 0);
    }

    /// channels_redis#307: flush uses SCAN, which works where KEYS is
    /// denied, and it leaves another layer's keys alone even when that
    /// layer's prefix starts with ours.
    #[tokio::test]
    async fn flush_scans_and_spares_other_prefixes() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let ours = queue(&[server.url()]).await;
        let theirs = RedisLayer::connect(config(&[server.url()]).with_prefix("asgi2"))
            .await
            .unwrap();
        let mut conn = raw(&server.url()).await;
        let mut layers_keys = Vec::new();
        for layer in [&ours, &theirs] {
            let channel = layer.new_channel("specific").await.unwrap();
            layer.group_add("room", &channel).await.unwrap();
            layer.send(&channel, numbered(1)).await.unwrap();
            layer.send("worker.jobs", numbered(2)).await.unwrap();
            layers_keys.push(channel);
        }
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.sort();
        assert_eq!(keys.len(), 6, "{keys:?}");
        // Deny KEYS, as many managed Redis services do.
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg("-keys")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        ours.flush().await.expect("flush must not need KEYS");
        let mut left: Vec<String> = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .query_async(&mut conn)
                .await
                .unwrap();
            left.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        left.sort();
        let expected = vec![
            "asgi2:group:room".to_owned(),
            format!("asgi2{}", non_local_name(&layers_keys[1])),
            "asgi2worker.jobs".to_owned(),
        ];
        assert_eq!(left, expected, "only asgi2's keys are left");
    }

    /// channels_redis#96, #172, #181: a member that does not keep up costs
    /// one warning per episode, not one per message.
    #[tokio::test]
    async fn a_full_member_is_one_warning_per_episode() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let (logs, _guard) = Logs::capture(tracing::Level::INFO);
        let layer = RedisLayer::connect(config(&[server.url()]).with_capacity(2))
            .await
            .unwrap();
        let slow = layer.new_channel("specific").await.unwrap();
        layer.group_add("room", &slow).await.unwrap();
        for n in 0..6 {
            layer.group_send("room", numbered(n)).await.unwrap();
        }
        let warned = "group_send skipped member channels that are at capacity";
        assert_eq!(logs.count(warned), 1, "four skips, one warning");
        assert_eq!(recv(&layer, &slow).await, numbered(0)); // catches up a little...
        layer.group_send("room", numbered(10)).await.unwrap(); // ...and takes one
        for n in 11..14 {
            layer.group_send("room", numbered(n)).await.unwrap();
        }
        assert_eq!(logs.count(warned), 2, "...falls behind again: one more");
    }

    /// channels_redis#397: Redis older than 5.0 is refused at start. (A
    /// unit test of the check on INFO texts is in `wire.rs`; here, the
    /// message a user sees for a server that is not there at all.)
    #[tokio::test]
    async fn an_unreachable_redis_is_a_clear_error_at_start() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("redis://127.0.0.1:{port}");
        let started = Instant::now();
        let Err(err) = RedisLayer::connect(config(&[url])).await else {
            panic!("connected to nothing");
        };
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            matches!(&err, LayerError::Backend(why) if why.to_string().contains(&format!("127.0.0.1:{port}"))),
            "{err}"
        );
        let err = RedisLayer::connect(RedisConfig::default().with_hosts(vec![]))
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("hosts is empty"), "{err}");
    }

    /// Plain channels are work queues: each message goes to one receiver,
    /// and what a process popped but did not hand over goes back to Redis
    /// when it closes the channel.
    #[tokio::test]
    async fn plain_channels_are_work_queues_that_lose_nothing() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let url = server.url();
        let first = queue(std::slice::from_ref(&url)).await;
        let second = queue(std::slice::from_ref(&url)).await;
        let mut conn = raw(&url).await;

        // A receive cancelled before the message came: the popper still
        // pops it, into the local buffer.
        assert!(
            timeout(Duration::from_millis(50), first.receive("jobs"))
                .await
                .is_err()
        );
        first.send("jobs", numbered(1)).await.unwrap();
        eventually(GUARD, "the popper takes the job", || async {
            zcard(&mut raw(&url).await, "asgijobs").await == 0
        })
        .await;
        // Closing gives it back, for another worker.
        first.close_channel("jobs").await.unwrap();
        assert_eq!(zcard(&mut conn, "asgijobs").await, 1);
        assert_eq!(recv(&second, "jobs").await, numbered(1));

        // Two workers share the queue: every job is taken exactly once.
        let workers: Vec<Arc<RedisLayer>> = vec![Arc::new(first), Arc::new(second)];
        let taken = Arc::new(Mutex::new(Vec::new()));
        let tasks: Vec<_> = workers
            .iter()
            .map(|worker| {
                let worker = Arc::clone(worker);
                let taken = Arc::clone(&taken);
                tokio::spawn(async move {
                    while let Ok(Ok(job)) =
                        timeout(Duration::from_millis(1500), worker.receive("jobs")).await
                    {
                        taken.lock().unwrap().push(job["n"].as_u64().unwrap());
                    }
                })
            })
            .collect();
        for n in 100..140 {
            workers[0].send("jobs", numbered(n)).await.unwrap();
        }
        for task in tasks {
            task.await.unwrap();
        }
        let mut taken = taken.lock().unwrap().clone();
        taken.sort_unstable();
        assert_eq!(taken, (100..140).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn channel_capacity_patterns_apply() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let layer = RedisLayer::connect(
            config(&[server.url()])
                .with_capacity(4)
                .with_channel_capacity("jobs*", 2)
                .with_channel_capacity("exact", 1),
        )
        .await
        .unwrap();
        for (channel, capacity) in [("jobs.a", 2), ("jobs", 2), ("exact", 1), ("other", 4)] {
            for n in 0..capacity {
                layer.send(channel, numbered(n)).await.unwrap();
            }
            let refused = layer.send(channel, numbered(99)).await;
            assert!(
                matches!(&refused, Err(LayerError::ChannelFull { channel: full }) if full == channel),
                "{channel} holds {capacity}, got {refused:?}"
            );
        }
    }
}

mod bad_input {
    //! Bad input is a clear error, or one log line and a dropped payload;
    //! never a panic, and nobody else is affected.

    use super::*;

    #[tokio::test]
    async fn oversized_and_untyped_messages_are_refused() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let layers: [Box<dyn ChannelLayer>; 2] = [
            Box::new(queue(&[server.url()]).await),
            Box::new(pubsub(&[server.url()]).await),
        ];
        let big = msg(json!({"type": "big", "data": "x".repeat(2 << 20)}));
        for layer in &layers {
            let channel = layer.new_channel("specific").await.unwrap();
            for result in [
                layer.send(&channel, big.clone()).await,
                layer.group_send("room", big.clone()).await,
            ] {
                match result {
                    Err(LayerError::MessageTooLarge { size, limit }) => {
                        assert_eq!(limit, 1 << 20);
                        assert!(size > 2 << 20);
                    }
                    other => panic!("a 2 MiB message: {other:?}"),
                }
            }
            let untyped = msg(json!({"message": "no type"}));
            assert!(matches!(
                layer.send(&channel, untyped).await,
                Err(LayerError::Serialize { message, .. }) if message.contains("\"type\"")
            ));
            let routed = msg(json!({"type": "t", "__asgi_channel__": "elsewhere"}));
            assert!(matches!(
                layer.group_send("room", routed).await,
                Err(LayerError::Serialize { .. })
            ));
            let err = layer.receive("bad name").await.unwrap_err();
            assert!(matches!(err, LayerError::InvalidName { .. }), "{err}");
        }
    }

    #[tokio::test]
    async fn queue_peer_payloads_it_cannot_read_are_one_line_each() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let (logs, _guard) = Logs::capture(tracing::Level::INFO);
        let layer = RedisLayer::connect(config(&[server.url()]).with_max_message_size(4096))
            .await
            .unwrap();
        let mut conn = raw(&server.url()).await;
        let victim = layer.new_channel("specific").await.unwrap();
        let bystander = layer.new_channel("specific").await.unwrap();
        let key = format!("asgi{}", non_local_name(&victim));
        let prefix = [7u8; 12];
        let json_payload = format!("{{\"type\": \"x\", \"__asgi_channel__\": \"{victim}\"}}");
        let no_type = {
            let mut bytes = prefix.to_vec();
            bytes.push(0x81);
            pack_str(&mut bytes, "__asgi_channel__");
            pack_str(&mut bytes, &victim);
            bytes
        };
        let bad: Vec<Vec<u8>> = vec![
            [&prefix[..], &[0x92, 0x01, 0x02]].concat(), // an array, not a map
            no_type,
            [&prefix[..], json_payload.as_bytes()].concat(), // serializer_format="json"
            b"short".to_vec(),
            [&prefix[..], &vec![0xc4; 5000][..]].concat(), // over max_message_size
        ];
        // Scored a second ago (well within the expiry), so that they come
        // before the good messages below.
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
            - 1.0;
        for (i, payload) in bad.iter().enumerate() {
            redis::cmd("ZADD")
                .arg(&key)
                .arg(format!("{}", before + i as f64 * 0.001))
                .arg(payload)
                .query_async::<()>(&mut conn)
                .await
                .unwrap();
        }
        layer.send(&bystander, numbered(1)).await.unwrap();
        layer.send(&victim, numbered(2)).await.unwrap();
        assert_eq!(recv(&layer, &bystander).await, numbered(1));
        assert_eq!(recv(&layer, &victim).await, numbered(2));
        assert_eq!(
            logs.count("cannot read"),
            4,
            "one line per unreadable payload"
        );
        assert_eq!(logs.count("larger than max_message_size"), 1);
        assert_eq!(logs.count("serializer_format=\"json\""), 1, "JSON is named");
    }

    #[tokio::test]
    async fn pubsub_peer_payloads_it_cannot_read_are_one_line_each() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let (logs, _guard) = Logs::capture(tracing::Level::INFO);
        let layer = pubsub(&[server.url()]).await;
        let mut conn = raw(&server.url()).await;
        let victim = layer.new_channel("specific").await.unwrap();
        let bystander = layer.new_channel("specific").await.unwrap();
        let bad: [&[u8]; 4] = [
            &[0x92, 0x01, 0x02],
            &[0x81, 0xa1, b'a', 0x01],
            b"{\"type\": \"chat.message\"}",
            &[
                0x82, 0xa4, b't', b'y', b'p', b'e', 0xa1, b't', 0xa1, b'x', 0xd4, 0x01, 0x00,
            ],
        ];
        for payload in bad {
            redis::cmd("PUBLISH")
                .arg(&victim)
                .arg(payload)
                .query_async::<()>(&mut conn)
                .await
                .unwrap();
        }
        layer.send(&bystander, numbered(1)).await.unwrap();
        layer.send(&victim, numbered(2)).await.unwrap();
        assert_eq!(recv(&layer, &bystander).await, numbered(1));
        assert_eq!(recv(&layer, &victim).await, numbered(2));
        assert_eq!(
            logs.count("cannot read"),
            4,
            "one line per unreadable payload"
        );
    }

    /// Pub/sub keeps nothing for a channel nobody listens on (a job's
    /// result for a client that has left): the send succeeds, and the loss
    /// is one debug line.
    #[tokio::test]
    async fn a_pubsub_send_nobody_hears_is_one_debug_line() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let (logs, _guard) = Logs::capture(tracing::Level::DEBUG);
        let layer = pubsub(&[server.url()]).await;
        let gone = layer.new_channel("specific").await.unwrap();
        layer.close_channel(&gone).await.unwrap();
        layer.send(&gone, numbered(1)).await.unwrap();
        assert_eq!(logs.count("nobody listens on this channel"), 1);
    }

    #[tokio::test]
    async fn a_foreign_process_specific_channel_is_refused() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let layer = queue(&[server.url()]).await;
        let other = queue(&[server.url()]).await;
        let theirs = other.new_channel("specific").await.unwrap();
        let err = layer.receive(&theirs).await.unwrap_err();
        assert!(err.to_string().contains("another layer instance"), "{err}");
        assert!(
            matches!(err, LayerError::ForeignChannel { .. }) && !err.is_outage(),
            "a caller's mistake, not an outage: {err:?}"
        );
        // Sending to it is fine: that is how processes talk.
        layer.send(&theirs, numbered(1)).await.unwrap();
        assert_eq!(recv(&other, &theirs).await, numbered(1));
    }

    /// Pub/sub memberships are local, so `group_add` takes only a channel
    /// this process holds, as Python's layer does. Taking another would
    /// make a buffer and a subscription that nothing reads and nothing
    /// frees.
    #[tokio::test]
    async fn pubsub_group_add_takes_only_channels_this_process_holds() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let layer = pubsub(&[server.url()]).await;
        let other = pubsub(&[server.url()]).await;
        let theirs = other.new_channel("specific").await.unwrap();
        let mut conn = raw(&server.url()).await;
        for channel in [theirs.as_str(), "worker.jobs"] {
            let err = layer.group_add("room", channel).await.unwrap_err();
            assert!(
                matches!(&err, LayerError::NotLocal { channel: c, group } if c == channel && group == "room"),
                "{err:?}"
            );
            assert!(!err.is_outage());
            let shown = err.to_string();
            assert!(
                shown.contains(&format!("{channel:?}")) && shown.contains("exist in this process"),
                "{shown}"
            );
        }
        assert_eq!(layer.local_channels(), 0, "no buffer for a refused join");
        let subscribed: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg("asgi__group__room")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(subscribed.is_empty(), "no subscription for a refused join");

        // A channel received on here is held here, made by new_channel or not.
        let receiving = layer.receive("worker.jobs");
        let joined = async {
            layer.group_add("room", "worker.jobs").await.unwrap();
            layer.group_send("room", numbered(1)).await.unwrap();
        };
        let (received, ()) = tokio::join!(timeout(GUARD, receiving), joined);
        assert_eq!(received.unwrap().unwrap(), numbered(1));
    }
}

mod redis_goes_away {
    //! Kill redis-server: calls fail within the bound, and the outage is
    //! one warning however many calls fail; a waiting receive does not
    //! fail; restart it on the same port: messages flow again within 5 s,
    //! with no restart of the layer.

    use super::*;

    /// How long a failing call may take: `command_timeout` (2 s) plus slack.
    const BOUND: Duration = Duration::from_secs(3);

    async fn survives_a_restart(
        server: &mut RedisServer,
        layer: Arc<dyn ChannelLayer>,
        logs: &Logs,
    ) {
        let member = layer.new_channel("specific").await.unwrap();
        layer.group_add("room", &member).await.unwrap();
        layer.group_send("room", numbered(0)).await.unwrap();
        assert_eq!(recv(&*layer, &member).await, numbered(0));
        // A consumer waits on its channel all through the outage.
        let waiting = {
            let layer = Arc::clone(&layer);
            let member = member.clone();
            tokio::spawn(async move { layer.receive(&member).await })
        };

        server.kill().await;
        let calls = [
            ("send", layer.send(&member, numbered(1)).await),
            ("group_send", layer.group_send("room", numbered(2)).await),
            ("group_add", layer.group_add("other", &member).await),
        ];
        for (call, result) in calls {
            assert!(
                matches!(result, Err(LayerError::Backend(_))),
                "{call} while Redis is down: {result:?}"
            );
        }
        let started = Instant::now();
        let result = layer.group_send("room", numbered(3)).await;
        assert!(matches!(result, Err(LayerError::Backend(_))), "{result:?}");
        assert!(
            started.elapsed() < BOUND,
            "failed after {:?}",
            started.elapsed()
        );
        assert_eq!(
            logs.count("is unreachable"),
            1,
            "one warning for the outage, not one per failed call"
        );
        assert_eq!(
            logs.count("channel layer call failed"),
            0,
            "those are debug lines"
        );
        assert!(!waiting.is_finished(), "a waiting receive must not fail");

        server.restart().await;
        let restarted = Instant::now();
        let mut n = 100;
        let got = loop {
            assert!(
                restarted.elapsed() < Duration::from_secs(5),
                "no message flowed within 5 s of the restart"
            );
            // Until the layer has reconnected (and resubscribed, or restored
            // the membership Redis lost), messages may fail or be lost.
            let _ = layer.group_send("room", numbered(n)).await;
            n += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            if waiting.is_finished() {
                break waiting.await.unwrap().unwrap();
            }
        };
        assert!(got["n"].as_u64().unwrap() >= 100, "{got:?}");
    }

    #[tokio::test]
    async fn the_queue_layer_survives_a_redis_restart() {
        let Some(mut server) = RedisServer::start().await else {
            return;
        };
        let (logs, _guard) = Logs::capture(tracing::Level::INFO);
        let layer = Arc::new(queue(&[server.url()]).await);
        survives_a_restart(&mut server, layer, &logs).await;
    }

    #[tokio::test]
    async fn the_pubsub_layer_survives_a_redis_restart() {
        let Some(mut server) = RedisServer::start().await else {
            return;
        };
        let (logs, _guard) = Logs::capture(tracing::Level::INFO);
        let layer = Arc::new(pubsub(&[server.url()]).await);
        survives_a_restart(&mut server, layer, &logs).await;
    }
}
