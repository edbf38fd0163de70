//! The poppers: the tasks that take messages out of Redis for this
//! process's receivers.
//!
//! Each Redis key read here (normally one, `{prefix}specific.{client}!`,
//! shared by every channel of the layer instance, and one per plain channel
//! received on) has one popper per host, on a blocking connection of its
//! own, doing `BZPOPMIN key block_timeout` only while a receiver of the key
//! waits on an empty buffer (see `state.rs`), and handing what it pops to
//! the buffers named in `__asgi_channel__`. A pop is never cancelled, and
//! `receive` only waits on its buffer, so a cancelled `receive` loses
//! nothing.
//!
//! Blocking connections are not cheap for Redis (each is a client), and a
//! popper may sit in `BZPOPMIN` for `block_timeout` after its channels have
//! gone. So poppers outlive their key's last channel by a grace period, and
//! a popper that stops hands its connection to the next one of its host
//! ([`Spare`]), rather than closing it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError};
use tokio::time::Instant;

use super::Inner;
use super::state::{GRACE, Raw, Step, Wanted};
use crate::layer::buffers::Locked;
use crate::layer::redis::codec;
use crate::layer::redis::link::{BACKOFF_MIN, Link, doubled};
use crate::layer::redis::wire::{inflight_key, now_secs, score_arg};

/// Idle blocking connections kept per host, at most: enough for a key's
/// poppers to hand theirs to the next key's, without hoarding.
const MAX_SPARE: usize = 2;

/// Members popped from a key, with their scores.
pub(crate) type Popped = Vec<(Vec<u8>, f64)>;

/// Blocking connections of stopped poppers, per host, for the next popper
/// of that host: a popper that starts takes one before opening a new one.
pub(super) struct Spare(Vec<Locked<Vec<MultiplexedConnection>>>);

impl Spare {
    pub(super) fn new(hosts: usize) -> Self {
        Spare((0..hosts).map(|_| Locked::default()).collect())
    }

    fn take(&self, shard: usize) -> Option<MultiplexedConnection> {
        self.0[shard].lock().pop()
    }

    /// Keeps `conn` for the next popper of `shard`, unless enough are kept.
    fn put(&self, shard: usize, conn: MultiplexedConnection) {
        let mut spare = self.0[shard].lock();
        if spare.len() < MAX_SPARE {
            spare.push(conn);
        }
    }

    /// Closes them all (the layer is dropped).
    pub(super) fn clear(&self) {
        for spare in &self.0 {
            spare.lock().clear();
        }
    }

    #[cfg(test)]
    fn len(&self, shard: usize) -> usize {
        self.0[shard].lock().len()
    }
}

impl Inner {
    /// Waits until receivers of `key` are hungry, or returns `None` when the
    /// popper should stop (its key gone, its grace period over, the layer
    /// dropped).
    async fn wait_for_demand(&self, key: &str, epoch: u64) -> Option<Wanted> {
        let demand = self.lock().demand(key, epoch)?;
        loop {
            // Listened for before looking, so a ring in between is heard.
            let rung = demand.bell().notified();
            let step = {
                let mut state = self.lock();
                if self.is_shut_down() {
                    return None;
                }
                state.step(key, epoch, Instant::now(), GRACE)
            };
            match step {
                Step::Pop(wanted) => return Some(wanted),
                Step::Stop => return None,
                Step::Wait(None) => rung.await,
                Step::Wait(Some(deadline)) => {
                    tokio::select! {
                        () = rung => {}
                        () = tokio::time::sleep_until(deadline) => {}
                    }
                }
            }
        }
    }

    /// When a message sent at `score` (UNIX seconds, the sender's clock)
    /// expires, on this process's clock: `expiry` after it was sent, and
    /// never later than `expiry` from now (a sender whose clock is ahead).
    fn expires(&self, score: f64, now: Instant) -> Option<Instant> {
        let expiry = self.config.expiry_secs() as f64;
        let left = (expiry - (now_secs() - score)).clamp(0.0, expiry);
        now.checked_add(Duration::try_from_secs_f64(left).ok()?)
    }

    /// Hands a popped member to the local buffers it is for.
    async fn deliver(
        &self,
        key: &str,
        plain: bool,
        shard: usize,
        member: Vec<u8>,
        score: f64,
        conn: &mut MultiplexedConnection,
    ) {
        let Some(decoded) = codec::read(&member, true, self.config.max_message_size, key) else {
            return;
        };
        let now = Instant::now();
        let expires = self.expires(score, now);
        // One copy, shared by every local channel it is routed to.
        let message = Arc::new(decoded.message);
        if plain {
            let name = &key[self.config.prefix.len()..];
            let raw = Raw {
                member,
                score,
                shard,
            };
            let unwanted = {
                let mut state = self.lock();
                if self.is_shut_down() {
                    Some(raw)
                } else {
                    state
                        .push(name, message, expires, Some(raw), now)
                        .err()
                        .flatten()
                }
            };
            if let Some(raw) = unwanted {
                // Nobody here takes it any more: back for another process.
                let restored = self.give_back(conn, key, &[raw]).await;
                if let Err(err) = restored {
                    tracing::warn!(key, %err, "could not give a popped message back to Redis");
                }
            }
            return;
        }
        let Some(route) = decoded.route else {
            tracing::warn!(
                key,
                "dropped a message without __asgi_channel__ from a process-specific key"
            );
            return;
        };
        let mut state = self.lock();
        for name in &route {
            let pushed = state.push(name, Arc::clone(&message), expires, None, now);
            if pushed.is_err() {
                tracing::debug!(channel = name, "dropped a message for a closed channel");
            }
        }
    }

    /// Puts popped members back into `key`, with their scores.
    pub(super) async fn give_back(
        &self,
        conn: &mut MultiplexedConnection,
        key: &str,
        raws: &[Raw],
    ) -> Result<(), RedisError> {
        let mut pipe = redis::pipe();
        for raw in raws {
            pipe.cmd("ZADD")
                .arg(key)
                .arg(score_arg(raw.score))
                .arg(&raw.member)
                .ignore();
        }
        pipe.cmd("EXPIRE")
            .arg(key)
            .arg(self.config.expiry_secs())
            .ignore();
        pipe.query_async(conn).await
    }

    /// Panics if a test asked for it (see
    /// [`RedisLayer::inject_popper_panic`](super::RedisLayer::inject_popper_panic)).
    fn injected_fault(&self) {
        if self.injected_panics.load(Ordering::Relaxed) > 0
            && self
                .injected_panics
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            panic!("injected fault (RedisLayer::inject_popper_panic)");
        }
    }
}

/// How many messages a popper of a process key takes at once, at most,
/// when that many have gathered. They would go to this process's buffers
/// one pop later anyway; taken together, they reach each receiver as a
/// run it writes in one go (the runner gathers up to 32), where one at a
/// time would cost a write each: with 100 receivers in one room, `cargo
/// xtask bench fanout` measured the queue layer at about half the bare
/// server's deliveries per second popping one message at a time.
pub(crate) const POP_BATCH: usize = 32;

/// One popper: pops `key` on host `shard` while a receiver is hungry, for
/// as long as the key has local channels and its grace period after. Its
/// failures to reach Redis are the host's outage, reported by the link.
pub(super) async fn popper(inner: Arc<Inner>, key: String, epoch: u64, shard: usize) {
    let link = Arc::clone(&inner.links[shard]);
    let block_secs = inner.config.block_secs();
    let mut conn: Option<MultiplexedConnection> = None;
    let mut delay = BACKOFF_MIN;
    loop {
        let Some(wanted) = inner.wait_for_demand(&key, epoch).await else {
            // Idle between pops: the next popper of this host may use it.
            if let Some(conn) = conn
                && !inner.is_shut_down()
            {
                inner.spare.put(shard, conn);
            }
            return;
        };
        inner.injected_fault();
        let Some(active) = conn.as_mut() else {
            match open_popper(&inner, &link, shard, &key, block_secs).await {
                Ok(opened) => {
                    link.worked();
                    delay = BACKOFF_MIN;
                    conn = Some(opened);
                }
                Err(err) => {
                    link.failed(&err);
                    link.suspect();
                    tokio::time::sleep(delay).await;
                    delay = doubled(delay);
                }
            }
            continue;
        };
        // A plain key's messages are each for one receiver, of any process:
        // pop no more than wait here. A process key's are all for this
        // process: take what has gathered, so that its receivers write a
        // run of messages at once instead of one each (see [`POP_BATCH`]).
        let count = if wanted.plain {
            wanted.hungry
        } else {
            wanted.hungry.max(POP_BATCH)
        };
        match pop(active, &key, count, block_secs, has_bzmpop(link.version())).await {
            Ok(popped) => {
                for (member, score) in popped {
                    inner
                        .deliver(&key, wanted.plain, shard, member, score, active)
                        .await;
                }
            }
            Err(err) => {
                conn = None;
                link.failed(&err);
                link.suspect();
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Whether a Redis of `version` has `BZMPOP` (7.0 and newer).
pub(crate) fn has_bzmpop(version: Option<super::super::wire::Version>) -> bool {
    version.is_some_and(|version| version >= super::super::wire::Version(7, 0))
}

/// Pops up to `count` members, oldest first, waiting up to the block
/// timeout for one if the key is empty.
///
/// With `bzmpop` (Redis 7.0 and newer), one `BZMPOP` does both in one
/// round trip. Without it, a `ZPOPMIN` takes a backlog and, when it finds
/// none, a `BZPOPMIN` waits for one member: a key that is drained as fast
/// as it fills, as a busy server's is, costs two commands per message.
pub(crate) async fn pop<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    key: &str,
    count: usize,
    block_secs: u64,
    bzmpop: bool,
) -> Result<Popped, RedisError> {
    if bzmpop {
        // `[key, [[member, score], ...]]`, or nil once the block timed out.
        let popped: Result<Option<(Vec<u8>, Popped)>, RedisError> = redis::cmd("BZMPOP")
            .arg(block_secs)
            .arg(1)
            .arg(key)
            .arg("MIN")
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(conn)
            .await;
        match popped {
            Ok(popped) => return Ok(popped.map(|(_, members)| members).unwrap_or_default()),
            // A server older than the one first met (a failover to an old
            // replica, say): pop as on Redis 5.
            Err(err) if err.to_string().contains("unknown command") => {}
            Err(err) => return Err(err),
        }
    }
    if count > 1 {
        let batch: Popped = redis::cmd("ZPOPMIN")
            .arg(key)
            .arg(count)
            .query_async(conn)
            .await?;
        if !batch.is_empty() {
            return Ok(batch);
        }
    }
    // A blocking pop whose timeout is expected: nothing popped is no error.
    let one: Option<(Vec<u8>, Vec<u8>, f64)> = redis::cmd("BZPOPMIN")
        .arg(key)
        .arg(block_secs)
        .query_async(conn)
        .await?;
    Ok(one
        .map(|(_, member, score)| vec![(member, score)])
        .unwrap_or_default())
}

/// A popper's connection: a spare one of its host if there is one, else a
/// new one with no response timeout at or below the block (the Python
/// layer's fault with redis-py 8); either way with the in-flight backups a
/// crashed Python receiver left in the key restored first.
async fn open_popper(
    inner: &Inner,
    link: &Link,
    shard: usize,
    key: &str,
    block_secs: u64,
) -> Result<MultiplexedConnection, RedisError> {
    while let Some(mut spare) = inner.spare.take(shard) {
        // A spare may have died since (Redis restarted): that is no outage,
        // just a connection to replace.
        if restore_inflight(inner, &mut spare, key).await.is_ok() {
            return Ok(spare);
        }
    }
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(
            Duration::from_secs(block_secs).saturating_add(inner.config.command_timeout),
        ));
    let mut conn = link
        .client()
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    restore_inflight(inner, &mut conn, key).await?;
    Ok(conn)
}

/// Python's `CLEANUP_LUA`: what a crashed Python receiver popped and
/// backed up goes back into `key`, with its score.
async fn restore_inflight(
    inner: &Inner,
    conn: &mut MultiplexedConnection,
    key: &str,
) -> Result<(), RedisError> {
    inner
        .cleanup
        .prepare_invoke()
        .arg(key)
        .arg(inflight_key(key))
        .invoke_async::<()>(conn)
        .await
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use channels_testkit::RedisServer;

    /// A connection that outwaits a blocking pop, as a popper's does.
    async fn conn(server: &RedisServer) -> MultiplexedConnection {
        let config =
            AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(5)));
        redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap()
    }

    /// Whether the Redis behind `conn` has `BZMPOP`.
    async fn serves_bzmpop(conn: &mut MultiplexedConnection) -> bool {
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(conn)
            .await
            .unwrap();
        has_bzmpop(super::super::super::wire::server_version(&info))
    }

    #[tokio::test]
    async fn a_backlog_is_popped_in_one_round_trip_and_an_empty_key_blocks() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let mut conn = conn(&server).await;
        // ZPOPMIN then BZPOPMIN on any Redis; BZMPOP where there is one.
        for bzmpop in [false, serves_bzmpop(&mut conn).await] {
            for (score, member) in [(2.0, "b"), (1.0, "a"), (3.0, "c")] {
                redis::cmd("ZADD")
                    .arg("k")
                    .arg(score)
                    .arg(member)
                    .query_async::<()>(&mut conn)
                    .await
                    .unwrap();
            }
            let popped = pop(&mut conn, "k", 2, 1, bzmpop).await.unwrap();
            assert_eq!(
                popped,
                vec![(b"a".to_vec(), 1.0), (b"b".to_vec(), 2.0)],
                "oldest first, as many as receivers wait (bzmpop: {bzmpop})"
            );
            let popped = pop(&mut conn, "k", 5, 1, bzmpop).await.unwrap();
            assert_eq!(popped, vec![(b"c".to_vec(), 3.0)]);
            let started = Instant::now();
            assert!(pop(&mut conn, "k", 1, 1, bzmpop).await.unwrap().is_empty());
            assert!(
                started.elapsed() >= Duration::from_millis(900),
                "an empty key blocks for the block timeout (bzmpop: {bzmpop})"
            );
        }
    }

    /// On Redis 7, a receiver whose key is drained as fast as it fills
    /// pops each message with one command, not a `ZPOPMIN` that finds
    /// nothing and then a `BZPOPMIN`.
    #[tokio::test]
    async fn on_redis_7_each_pop_is_one_command() {
        use crate::layer::ChannelLayer;
        use crate::layer::redis::{RedisConfig, RedisLayer};
        use serde_json::json;

        let Some(server) = RedisServer::start().await else {
            return;
        };
        let mut admin = conn(&server).await;
        if !serves_bzmpop(&mut admin).await {
            eprintln!("SKIPPED on_redis_7_each_pop_is_one_command: this Redis has no BZMPOP");
            return;
        }
        let layer = RedisLayer::connect(RedisConfig::new(server.url()))
            .await
            .unwrap();
        let channel = layer.new_channel("specific").await.unwrap();
        let message = |n: u64| json!({"type": "t", "n": n}).as_object().unwrap().clone();
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async::<()>(&mut admin)
            .await
            .unwrap();
        for n in 0..3 {
            let receiving = layer.receive(&channel);
            let sending = async {
                tokio::task::yield_now().await;
                layer.send(&channel, message(n)).await.unwrap();
            };
            let (received, ()) = tokio::join!(receiving, sending);
            assert_eq!(received.unwrap(), message(n));
        }
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut admin)
            .await
            .unwrap();
        assert!(stats.contains("cmdstat_bzmpop:"), "{stats}");
        assert!(!stats.contains("cmdstat_zpopmin:"), "{stats}");
        assert!(!stats.contains("cmdstat_bzpopmin:"), "{stats}");
    }

    /// A server without `BZMPOP` behind a link that expected one (a
    /// failover to an older replica) is popped from as Redis 5 is.
    #[tokio::test]
    async fn a_server_without_bzmpop_is_popped_from_the_old_way() {
        let Some(server) = RedisServer::start_with(&["--rename-command", "BZMPOP", ""]).await
        else {
            return;
        };
        let mut conn = conn(&server).await;
        redis::cmd("ZADD")
            .arg("k")
            .arg(1.0)
            .arg("a")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        let popped = pop(&mut conn, "k", 32, 1, true).await.unwrap();
        assert_eq!(popped, vec![(b"a".to_vec(), 1.0)]);
    }

    #[tokio::test]
    async fn spare_connections_are_bounded_per_host() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let spare = Spare::new(2);
        for _ in 0..3 {
            spare.put(1, conn(&server).await);
        }
        assert_eq!((spare.len(0), spare.len(1)), (0, MAX_SPARE));
        assert!(spare.take(0).is_none());
        assert!(spare.take(1).is_some());
        spare.clear();
        assert_eq!(spare.len(1), 0);
    }

    /// A process key's backlog comes out in one pop, whichever receiver
    /// asked: its receivers then write it as a run, not a frame at a time.
    #[tokio::test]
    async fn a_process_keys_backlog_is_taken_in_one_pop() {
        use crate::layer::ChannelLayer;
        use crate::layer::redis::{RedisConfig, RedisLayer};
        use serde_json::json;

        let Some(server) = RedisServer::start().await else {
            return;
        };
        let layer = RedisLayer::connect(RedisConfig {
            block_timeout: Duration::from_secs(1),
            ..RedisConfig::new(server.url())
        })
        .await
        .unwrap();
        let channel = layer.new_channel("specific").await.unwrap();
        let message = |n: u64| json!({"type": "t", "n": n}).as_object().unwrap().clone();
        for n in 0..10 {
            layer.send(&channel, message(n)).await.unwrap();
        }
        assert_eq!(layer.receive(&channel).await.unwrap(), message(0));
        let key = super::super::channel_key(&layer.config().prefix, &channel);
        let left: usize = redis::cmd("ZCARD")
            .arg(&key)
            .query_async(&mut conn(&server).await)
            .await
            .unwrap();
        assert_eq!(left, 0, "one receive took the whole backlog out of Redis");
        for n in 1..10 {
            assert_eq!(layer.receive(&channel).await.unwrap(), message(n));
        }
    }
}
