//! The baseline of `cargo xtask bench fanout`: the plainest broadcast
//! server tokio-tungstenite and `tokio::sync::broadcast` allow, with no
//! framework and no channel layer. Every text a client sends goes to every
//! connected client, the sender included, as a room does.
//!
//! With `--batch true` a client's writer takes every message already
//! waiting for it (up to 32) and writes them in one go, as the
//! axum-channels runner does, rather than one write each: the bench runs
//! both, so the layers are compared with a bare server that writes the
//! same way as well as with the plainest one.
//!
//! With `--relay one` or `--relay cluster`, the room spans several of
//! these servers through Redis, with no channel layer: the floor of what a
//! queue layer's two-server room can cost on one Redis and on a Redis
//! Cluster. Each server reads its own key (`--key`), a sorted set, with
//! `BZMPOP` (up to 32 at a time, as the layers' poppers do), and a text a
//! client sends is added to every server's key (`--keys`, comma-separated)
//! before the next text of that client is read, as a consumer awaits its
//! `group_send`: on one Redis (`--redis URL`) in one pipelined round trip,
//! on a cluster (`--redis URL1,URL2,...`, its nodes) by one `ZADD` to each
//! key's master, concurrently. Nothing checks a membership, expires or caps
//! anything: whatever a layer does beyond this is what it costs.
//!
//! `--read-buffer BYTES` sets tungstenite's read buffer (default: its own,
//! 128 KiB allocated per connection). The `scale` bench gives it the 2 KiB
//! that axum-channels' servers use, so that 100,000 of its connections fit
//! in memory and cost what the step's do.

#[path = "../args.rs"]
mod args;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use tokio::net::TcpListener;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Messages a slow client may fall behind before it misses some: the same
/// as the channel layers' default per-channel capacity, so the baseline
/// buffers no more than the servers it is compared with.
const CAPACITY: usize = 100;

/// With `--batch true`: the most messages written in one go, and the bytes
/// gathered before a write, as in axum-channels (`LAYER_BATCH` and the
/// default `write_buffer_size`).
const BATCH: usize = 32;
const WRITE_BUFFER: usize = 16 * 1024;

fn main() {
    let port: u16 = args::arg("port", 9002);
    let batch: bool = args::arg("batch", false);
    let read_buffer: usize = args::arg("read-buffer", WebSocketConfig::default().read_buffer_size);
    let relay: String = args::arg("relay", "none".to_owned());
    let redis: String = args::arg("redis", String::new());
    let own_key: String = args::arg("key", String::new());
    let keys: String = args::arg("keys", String::new());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
        let (room, _) = broadcast::channel::<Utf8Bytes>(CAPACITY);
        let relay = match relay.as_str() {
            "none" => None,
            "one" | "cluster" => {
                let urls: Vec<&str> = redis.split(',').collect();
                let keys: Vec<&str> = keys.split(',').collect();
                let (relay, popper) = Relay::connect(relay == "one", &urls, &keys, &own_key, port)
                    .await
                    .expect("the Redis to relay through");
                tokio::spawn(pop(popper, own_key, room.clone()));
                Some(Arc::new(relay))
            }
            other => panic!("unknown --relay {other:?}: use none, one or cluster"),
        };
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            // The servers measured against this one set TCP_NODELAY (see
            // axum_channels::serve); without it, Nagle's algorithm would
            // hold back the small frames of a busy room.
            let _ = stream.set_nodelay(true);
            let room = room.clone();
            let relay = relay.clone();
            tokio::spawn(async move {
                let config = WebSocketConfig::default()
                    .read_buffer_size(read_buffer)
                    .write_buffer_size(if batch { WRITE_BUFFER } else { 0 });
                let Ok(ws) =
                    tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
                else {
                    return;
                };
                // Subscribed before reading, so a client hears its own first
                // message.
                let mut hears = room.subscribe();
                let (mut to_client, mut from_client) = ws.split();
                let writer = tokio::spawn(async move {
                    loop {
                        match hears.recv().await {
                            Ok(text) if batch => {
                                let mut written = to_client.feed(Message::Text(text)).await;
                                for _ in 1..BATCH {
                                    let Ok(text) = hears.try_recv() else { break };
                                    if written.is_err() {
                                        break;
                                    }
                                    written = to_client.feed(Message::Text(text)).await;
                                }
                                if written.is_err() || to_client.flush().await.is_err() {
                                    break;
                                }
                            }
                            Ok(text) => {
                                if to_client.send(Message::Text(text)).await.is_err() {
                                    break;
                                }
                            }
                            // A client that fell behind misses what it
                            // missed, as a full channel would.
                            Err(RecvError::Lagged(_)) => continue,
                            Err(RecvError::Closed) => break,
                        }
                    }
                });
                while let Some(Ok(message)) = from_client.next().await {
                    if let Message::Text(text) = message {
                        match &relay {
                            Some(relay) => {
                                if let Err(err) = relay.publish(&text).await {
                                    eprintln!("bare-broadcast: cannot relay a text: {err}");
                                    break;
                                }
                            }
                            None => {
                                let _ = room.send(text);
                            }
                        }
                    }
                }
                writer.abort();
            });
        }
    });
}

/// Where a relaying server adds what its clients send: each server's key,
/// with a connection to the Redis that holds it.
struct Relay {
    one_redis: bool,
    keys: Vec<(String, MultiplexedConnection)>,
    /// What makes each member unique: this server's port, then a count.
    port: u16,
    sent: AtomicU64,
}

/// The bytes before a member's text: the port (5 digits) and the count (16
/// hex digits).
const MEMBER_PREFIX: usize = 21;

impl Relay {
    /// Connects to the Redis or the cluster's nodes at `urls`, finding
    /// each key's master by asking each one; returns the relay and a
    /// connection of its own for popping `own` (a blocking pop would hold
    /// up a shared one).
    async fn connect(
        one_redis: bool,
        urls: &[&str],
        keys: &[&str],
        own: &str,
        port: u16,
    ) -> redis::RedisResult<(Relay, MultiplexedConnection)> {
        let mut clients = Vec::new();
        let mut nodes = Vec::new();
        for url in urls {
            let client = redis::Client::open(*url)?;
            nodes.push(client.get_multiplexed_async_connection().await?);
            clients.push(client);
        }
        let mut relayed = Vec::new();
        for key in keys {
            let at = holder(&nodes, key).await?;
            relayed.push(((*key).to_owned(), nodes[at].clone()));
        }
        let popper = clients[holder(&nodes, own).await?]
            .get_multiplexed_async_connection_with_config(
                &AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(5))),
            )
            .await?;
        let relay = Relay {
            one_redis,
            keys: relayed,
            port,
            sent: AtomicU64::new(0),
        };
        Ok((relay, popper))
    }

    /// Adds `text` to every server's key, and returns once all have it.
    async fn publish(&self, text: &str) -> redis::RedisResult<()> {
        let count = self.sent.fetch_add(1, Ordering::Relaxed);
        let member = format!("{:05}{count:016x}{text}", self.port);
        if self.one_redis {
            let mut pipe = redis::pipe();
            for (key, _) in &self.keys {
                pipe.cmd("ZADD").arg(key).arg(count).arg(&member).ignore();
            }
            let mut conn = self.keys[0].1.clone();
            pipe.query_async::<()>(&mut conn).await
        } else {
            let adds = self.keys.iter().map(|(key, conn)| {
                let (mut conn, member) = (conn.clone(), &member);
                async move {
                    redis::cmd("ZADD")
                        .arg(key)
                        .arg(count)
                        .arg(member)
                        .query_async::<()>(&mut conn)
                        .await
                }
            });
            futures_util::future::try_join_all(adds).await.map(drop)
        }
    }
}

/// Which of `nodes` holds `key`: a master answers for its own keys and
/// refuses the others (`MOVED`); one Redis holds every key.
async fn holder(nodes: &[MultiplexedConnection], key: &str) -> redis::RedisResult<usize> {
    for (at, node) in nodes.iter().enumerate() {
        let asked: redis::RedisResult<i64> = redis::cmd("ZCARD")
            .arg(key)
            .query_async(&mut node.clone())
            .await;
        if asked.is_ok() {
            return Ok(at);
        }
    }
    Err(redis::RedisError::from((
        redis::ErrorKind::Client,
        "no node holds the key",
    )))
}

/// Pops `key` for ever, up to 32 at a time, into the room.
async fn pop(mut conn: MultiplexedConnection, key: String, room: broadcast::Sender<Utf8Bytes>) {
    loop {
        let popped: Option<(String, Vec<(String, f64)>)> = redis::cmd("BZMPOP")
            .arg(1)
            .arg(1)
            .arg(&key)
            .arg("MIN")
            .arg("COUNT")
            .arg(BATCH)
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|err| {
                eprintln!("bare-broadcast: cannot pop {key}: {err}");
                std::process::exit(1);
            });
        for (member, _) in popped.map(|(_, members)| members).unwrap_or_default() {
            let text = member.get(MEMBER_PREFIX..).unwrap_or_default();
            let _ = room.send(Utf8Bytes::from(text.to_owned()));
        }
    }
}
