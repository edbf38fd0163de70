//! [`RedisLayer`]: the queue ("reliable") layer. Every channel is a Redis
//! sorted set of messages, so a message waits in Redis until someone
//! receives it or it expires, and groups are sorted sets of channel names.
//!
//! The keys, payloads and Lua scripts are the Python layer's
//! (`RedisChannelLayer` of channels_redis / fast-channels), so Python and
//! Rust processes share channels and groups. How it reads from Redis is its
//! own, to fix what goes wrong in Python (the wire specification, §7):
//!
//! - **Poppers.** Each Redis key this process reads (normally one:
//!   `{prefix}specific.{client_prefix}!`, shared by all its consumers) has
//!   one popper task per host, each on a connection of its own, doing
//!   `BZPOPMIN key block_timeout` and handing what it pops to the local
//!   buffer of the channel named in `__asgi_channel__`. A popper is never
//!   cancelled in the middle of a pop, and `receive` only waits on its
//!   buffer, so a cancelled `receive` loses nothing.
//! - **Demand.** A popper only starts a pop while a receiver of its key is
//!   waiting with an empty buffer, and pops at most one message per such
//!   receiver. Messages nobody is waiting for stay in Redis, where
//!   `capacity` and `expiry` apply, so a busy consumer pushes back on its
//!   senders with `ChannelFull` instead of filling this process's memory.
//!   (A pop that was already waiting when its receiver gave up still brings
//!   in its message, at most one per host: it is never cancelled.)
//! - **Bounded buffers.** A local buffer (`buffers.rs`) holds at most the
//!   channel's capacity (dropping its oldest, with one warning per
//!   episode), and `close_channel` frees it and leaves the groups the
//!   channel joined here. A message routed to several local channels is
//!   one copy shared by their buffers.
//! - **Every host.** A send to a specific channel goes to the host of its
//!   non-local name, where its receiver reads; poppers read their key on
//!   every host, so the Python layer's sends (which hash the full name, a
//!   bug with several hosts) arrive too.
//! - **Plain channels** (no `!`, e.g. `worker.jobs`) are work queues shared
//!   by processes: each receiving process pops only while it has a receiver
//!   waiting, and gives back to Redis what it popped but could not hand over
//!   (the channel was closed first).
//! - **Expiry on receive.** Messages older than `expiry` are dropped when
//!   taken, not only when a sender purges the key.
//! - **Redis going away.** Calls fail within `command_timeout`; poppers retry
//!   with backoff and resume by themselves; the outage is one warning and
//!   one line when it ends, per host (see `link.rs`); after a reconnection,
//!   the memberships of live local channels are written again (a Redis
//!   restarted without persistence has lost them).
//! - **A popper that panics** (a bug) is logged as an error and started
//!   again (see `task.rs`), so its key's deliveries do not silently stop.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError, Script};
use tokio::time::Instant;

use super::bounded;
use super::codec::{self, Route};
use super::config::RedisConfig;
use super::link::{BACKOFF_MAX, BACKOFF_MIN, Link};
use super::task::spawn_supervised;
use super::wire::{
    CLEANUP_LUA, GROUP_SEND_LUA, Version, channel_key, consistent_hash, escape_glob, flushable,
    group_key, inflight_key, longer_prefix_of, non_local_name, now_secs, purge_below,
    queue_channel_name, score_arg, uuid4_hex,
};
use crate::layer::buffers::{
    Buffer, Demand, Entry, HoldsBuffers, LocalBuffers, Locked, Receiver, WhenFull,
};
use crate::layer::{
    BackendError, ChannelLayer, LayerError, LayerMessage, validate_channel_name,
    validate_group_name,
};

/// How many keys one `UNLINK` of `flush` deletes.
const UNLINK_BATCH: usize = 500;

/// Keys whose over-capacity episode is remembered, at most (a bound on
/// memory; past it, the record starts afresh).
const MAX_REPORTED: usize = 10_000;

/// The queue layer on Redis: messages wait in Redis until received or
/// expired. See [the module documentation](super) for when to choose it.
pub struct RedisLayer {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisConfig,
    /// This instance's 32 hex digits in its channel names (Python makes one
    /// per layer instance too).
    client_prefix: String,
    links: Vec<Arc<Link>>,
    state: Locked<State>,
    round_robin: AtomicUsize,
    next_epoch: AtomicU64,
    shut_down: AtomicBool,
    group_send: Script,
    cleanup: Script,
    /// Pops that are to panic (see [`RedisLayer::inject_popper_panic`]).
    injected_panics: AtomicU32,
}

struct State {
    /// Local channels' buffers, each with what its messages were in Redis
    /// when they came from a plain channel. Nothing can tell a sender that
    /// one is full, so a full buffer drops its oldest message.
    buffers: LocalBuffers<Option<Raw>>,
    /// Redis key → who reads it here.
    keys: HashMap<String, KeyState>,
    /// Local channel → groups it joined through this layer, to leave them
    /// on `close_channel` and restore them after a Redis restart.
    memberships: HashMap<String, BTreeSet<String>>,
    /// Keys a `group_send` found at capacity and reported, until a group
    /// message gets into them again.
    over_capacity: HashSet<String>,
}

impl Default for State {
    fn default() -> Self {
        State {
            buffers: LocalBuffers::new(WhenFull::DropOldest),
            keys: HashMap::new(),
            memberships: HashMap::new(),
            over_capacity: HashSet::new(),
        }
    }
}

impl HoldsBuffers for State {
    type Extra = Option<Raw>;

    fn buffers(&mut self) -> &mut LocalBuffers<Option<Raw>> {
        &mut self.buffers
    }
}

/// A message popped from a plain channel, as it was in Redis, so that it
/// can be given back for another receiver if this process closes the
/// channel unread.
struct Raw {
    member: Vec<u8>,
    score: f64,
    shard: usize,
}

/// What a popper is asked for: how many receivers of a key wait on an
/// empty buffer, and what kind of key it is.
struct Wanted {
    plain: bool,
    hungry: usize,
}

/// Members popped from a key, with their scores.
type Popped = Vec<(Vec<u8>, f64)>;

/// The readers of one Redis key in this process.
struct KeyState {
    /// Identifies this generation of the key's poppers: a popper whose
    /// epoch is not the key's current one stops.
    epoch: u64,
    /// A plain channel (work queue), rather than a process's specific key.
    plain: bool,
    /// Local channels whose messages come from this key.
    channels: usize,
    /// How many of those have a receiver waiting on an empty buffer, kept
    /// by the buffers themselves; its bell wakes the key's poppers when one
    /// more has, or when they should stop.
    demand: Arc<Demand>,
}

impl State {
    /// Adds a local channel reading `key`, if it is new. Returns its buffer,
    /// and the epoch of the key's poppers when they have to be started.
    fn register(
        &mut self,
        name: &str,
        key: &str,
        plain: bool,
        capacity: usize,
        next_epoch: &AtomicU64,
    ) -> (&mut Buffer<Option<Raw>>, Option<u64>) {
        let mut epoch = None;
        if !self.buffers.contains(name) {
            match self.keys.get_mut(key) {
                Some(readers) => readers.channels += 1,
                None => {
                    let started = next_epoch.fetch_add(1, Ordering::Relaxed);
                    epoch = Some(started);
                    self.keys.insert(
                        key.to_owned(),
                        KeyState {
                            epoch: started,
                            plain,
                            channels: 1,
                            demand: Arc::default(),
                        },
                    );
                }
            }
        }
        let keys = &self.keys;
        let buffer = self.buffers.open_counted(name, capacity, || {
            keys.get(key)
                .map(|readers| Arc::clone(&readers.demand))
                .unwrap_or_default()
        });
        (buffer, epoch)
    }

    /// Removes an idle local channel, returning what it still buffered, or
    /// `None` if it is unknown or someone still waits on it.
    fn unregister(&mut self, name: &str, key: &str) -> Option<Vec<Entry<Option<Raw>>>> {
        if self.buffers.get(name)?.is_waited_on() {
            return None;
        }
        let mut buffer = self.buffers.remove(name)?;
        if let Some(readers) = self.keys.get_mut(key) {
            readers.channels = readers.channels.saturating_sub(1);
            if readers.channels == 0
                && let Some(gone) = self.keys.remove(key)
            {
                gone.demand.bell().notify_waiters(); // its poppers stop
            }
        }
        Some(buffer.take_all())
    }
}

impl RedisLayer {
    /// Connects to every host of `config` and checks that each runs Redis
    /// 5.0 or newer (`BZPOPMIN`). Fails with [`LayerError::Backend`] and a
    /// one-line reason when a host is unreachable, too old, or the
    /// configuration is invalid.
    pub async fn connect(config: RedisConfig) -> Result<Self, LayerError> {
        config.validate()?;
        let mut links = Vec::with_capacity(config.hosts.len());
        for url in &config.hosts {
            links.push(
                Link::connect(
                    url,
                    Version(5, 0),
                    "the queue layer pops with BZPOPMIN",
                    false,
                    config.command_timeout,
                    None,
                )
                .await?,
            );
        }
        let inner = Arc::new(Inner {
            config,
            client_prefix: uuid4_hex(),
            links,
            state: Locked::default(),
            round_robin: AtomicUsize::new(0),
            next_epoch: AtomicU64::new(1),
            shut_down: AtomicBool::new(false),
            group_send: Script::new(GROUP_SEND_LUA),
            cleanup: Script::new(CLEANUP_LUA),
            injected_panics: AtomicU32::new(0),
        });
        for (shard, link) in inner.links.iter().enumerate() {
            let weak: Weak<Inner> = Arc::downgrade(&inner);
            link.supervise(Arc::new(move |conn| {
                let weak = weak.clone();
                Box::pin(async move {
                    match weak.upgrade() {
                        Some(inner) => inner.restore_memberships(shard, conn).await,
                        None => Ok(()),
                    }
                })
            }));
        }
        Ok(RedisLayer { inner })
    }

    /// The configuration this layer runs with.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// How many local channels have a buffer here right now (channels made
    /// by `new_channel` or received on, and not closed yet): for tests and
    /// for watching memory.
    pub fn local_channels(&self) -> usize {
        self.inner.lock().buffers.len()
    }

    /// A fault for tests, not part of the API: the next time one of this
    /// layer's poppers is about to pop, it panics, once, as a bug in it
    /// would. Tests use it to check that the popper is restarted and that
    /// the panic is logged. Costs the poppers one atomic read per pop.
    #[doc(hidden)]
    pub fn inject_popper_panic(&self) {
        self.inner.injected_panics.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for RedisLayer {
    fn drop(&mut self) {
        self.inner.shut_down.store(true, Ordering::SeqCst);
        for link in &self.inner.links {
            link.close();
        }
        for readers in self.inner.lock().keys.values() {
            readers.demand.bell().notify_waiters();
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    fn shards(&self) -> usize {
        self.links.len()
    }

    fn key_of(&self, channel: &str) -> String {
        channel_key(&self.config.prefix, channel)
    }

    fn is_shut_down(&self) -> bool {
        self.shut_down.load(Ordering::SeqCst)
    }

    /// Starts one popper per host for `key`, each supervised.
    fn spawn_poppers(self: &Arc<Self>, key: &str, epoch: u64) {
        for shard in 0..self.shards() {
            let name = format!("popper of {key} on Redis at {}", self.links[shard].host());
            let inner = Arc::clone(self);
            let key = key.to_owned();
            spawn_supervised(name, move |_| {
                popper(Arc::clone(&inner), key.clone(), epoch, shard)
            });
        }
    }

    /// Panics if a test asked for it (see
    /// [`RedisLayer::inject_popper_panic`]).
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

    /// Makes `channel` local (a buffer, and poppers for its key) in the
    /// locked `state`, unless it is already, and returns its buffer, so
    /// that a receiver can start waiting on it in the same step (no
    /// `close_channel` can come in between).
    fn register<'s>(
        self: &Arc<Self>,
        state: &'s mut State,
        channel: &str,
        key: &str,
    ) -> &'s mut Buffer<Option<Raw>> {
        let plain = !channel.contains('!');
        let capacity = self.config.capacity_of(channel);
        let (buffer, epoch) = state.register(channel, key, plain, capacity, &self.next_epoch);
        if let Some(epoch) = epoch {
            // Spawning does not run them: they wait for this lock.
            self.spawn_poppers(key, epoch);
        }
        buffer
    }

    /// Waits until receivers of `key` are hungry, or returns `None` when the
    /// popper should stop.
    async fn wait_for_demand(&self, key: &str, epoch: u64) -> Option<Wanted> {
        let demand = {
            let state = self.lock();
            let readers = state.keys.get(key).filter(|r| r.epoch == epoch)?;
            Arc::clone(&readers.demand)
        };
        loop {
            // Listened for before looking, so a ring in between is heard.
            let rung = demand.bell().notified();
            {
                let state = self.lock();
                let readers = state.keys.get(key).filter(|r| r.epoch == epoch)?;
                if self.is_shut_down() {
                    return None;
                }
                let hungry = readers.demand.hungry();
                if hungry > 0 {
                    return Some(Wanted {
                        plain: readers.plain,
                        hungry,
                    });
                }
            }
            rung.await;
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
            let entry = Entry {
                message,
                expires,
                extra: Some(Raw {
                    member,
                    score,
                    shard,
                }),
            };
            let unwanted = {
                let mut state = self.lock();
                match state.buffers.get_mut(name) {
                    Some(buffer) if !self.is_shut_down() => {
                        // A full buffer drops its oldest: never refused.
                        let _ = buffer.push(name, entry, now);
                        None
                    }
                    _ => Some(entry),
                }
            };
            if let Some(Entry {
                extra: Some(raw), ..
            }) = unwanted
            {
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
            let entry = Entry {
                message: Arc::clone(&message),
                expires,
                extra: None,
            };
            match state.buffers.get_mut(name) {
                // A full buffer drops its oldest: never refused.
                Some(buffer) => drop(buffer.push(name, entry, now)),
                None => tracing::debug!(channel = name, "dropped a message for a closed channel"),
            }
        }
    }

    /// Puts popped members back into `key`, with their scores.
    async fn give_back(
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

    /// Writes again the memberships of live local channels whose group
    /// lives on `shard` (after a reconnection: a Redis restarted without
    /// persistence has lost them; one that kept them just gets them renewed).
    async fn restore_memberships(
        &self,
        shard: usize,
        mut conn: MultiplexedConnection,
    ) -> Result<(), RedisError> {
        let mut by_group: HashMap<String, Vec<String>> = HashMap::new();
        {
            let state = self.lock();
            for (channel, groups) in &state.memberships {
                for group in groups {
                    if consistent_hash(group, self.shards()) == shard {
                        by_group
                            .entry(group.clone())
                            .or_default()
                            .push(channel.clone());
                    }
                }
            }
        }
        if by_group.is_empty() {
            return Ok(());
        }
        let now = score_arg(now_secs());
        let mut pipe = redis::pipe();
        for (group, channels) in &by_group {
            let key = group_key(&self.config.prefix, group);
            for channel in channels {
                pipe.cmd("ZADD").arg(&key).arg(&now).arg(channel).ignore();
            }
            pipe.cmd("EXPIRE")
                .arg(&key)
                .arg(self.config.group_expiry_secs())
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
        tracing::debug!(
            groups = by_group.len(),
            "restored the group memberships of live channels"
        );
        Ok(())
    }

    /// Remembers which keys are over capacity, and warns once per episode.
    fn report_over_capacity(&self, group: &str, full: &[(&str, &[String], usize)], fine: &[&str]) {
        let mut state = self.lock();
        for key in fine {
            state.over_capacity.remove(*key);
        }
        if state.over_capacity.len() > MAX_REPORTED {
            state.over_capacity.clear();
        }
        for (key, names, capacity) in full {
            metrics::counter!("axum_channels_layer_channel_full_total").increment(1);
            if state.over_capacity.insert((*key).to_owned()) {
                tracing::warn!(
                    group,
                    channels = names.join(","),
                    capacity,
                    "group_send skipped member channels that are at capacity \
                     (reported once until they take a group message again)"
                );
            }
        }
    }
}

/// One popper: pops `key` on host `shard` while a receiver is hungry, for
/// as long as the key has local channels. Its failures to reach Redis are
/// the host's outage, reported by the link.
async fn popper(inner: Arc<Inner>, key: String, epoch: u64, shard: usize) {
    let link = Arc::clone(&inner.links[shard]);
    let block_secs = inner.config.block_secs();
    let mut conn: Option<MultiplexedConnection> = None;
    let mut delay = BACKOFF_MIN;
    loop {
        let Some(wanted) = inner.wait_for_demand(&key, epoch).await else {
            return;
        };
        inner.injected_fault();
        let Some(active) = conn.as_mut() else {
            match open_popper(&inner, &link, &key, block_secs).await {
                Ok(opened) => {
                    link.worked();
                    delay = BACKOFF_MIN;
                    conn = Some(opened);
                }
                Err(err) => {
                    link.failed(&err);
                    link.suspect();
                    tokio::time::sleep(delay).await;
                    delay = delay.saturating_mul(2).min(BACKOFF_MAX);
                }
            }
            continue;
        };
        match pop(active, &key, wanted.hungry, block_secs).await {
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

/// Pops for `hungry` waiting receivers: as many members as there are
/// receivers if the key has them (one round trip for a backlog), else one
/// blocking pop that waits up to the block timeout.
async fn pop(
    conn: &mut MultiplexedConnection,
    key: &str,
    hungry: usize,
    block_secs: u64,
) -> Result<Popped, RedisError> {
    if hungry > 1 {
        let batch: Popped = redis::cmd("ZPOPMIN")
            .arg(key)
            .arg(hungry)
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

/// A popper's own connection: no response timeout at or below the block
/// (the Python layer's fault with redis-py 8), and the in-flight backups a
/// crashed Python receiver left in the key restored first.
async fn open_popper(
    inner: &Inner,
    link: &Link,
    key: &str,
    block_secs: u64,
) -> Result<MultiplexedConnection, RedisError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(
            Duration::from_secs(block_secs).saturating_add(inner.config.command_timeout),
        ));
    let mut conn = link
        .client()
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    inner
        .cleanup
        .prepare_invoke()
        .arg(key)
        .arg(inflight_key(key))
        .invoke_async::<()>(&mut conn)
        .await?;
    Ok(conn)
}

#[async_trait]
impl ChannelLayer for RedisLayer {
    async fn new_channel(&self, prefix: &str) -> Result<String, LayerError> {
        let inner = &self.inner;
        let name = queue_channel_name(prefix, &inner.client_prefix);
        validate_channel_name(&name)?;
        inner.register(&mut inner.lock(), &name, &inner.key_of(&name));
        Ok(name)
    }

    async fn send(&self, channel: &str, message: LayerMessage) -> Result<(), LayerError> {
        validate_channel_name(channel)?;
        let inner = &self.inner;
        let specific = channel.contains('!');
        let route = if specific {
            Route::One(channel)
        } else {
            Route::None
        };
        let payload = codec::encode(&message, route, true, inner.config.max_message_size)?;
        let key = inner.key_of(channel);
        let shard = if specific {
            // Where the receiver reads (Python hashes the full name here,
            // which loses the message when there are several hosts).
            consistent_hash(non_local_name(channel), inner.shards())
        } else {
            inner.round_robin.fetch_add(1, Ordering::Relaxed) % inner.shards()
        };
        let capacity = inner.config.capacity_of(channel);
        let expiry = inner.config.expiry_secs();
        let added = bounded("send", inner.config.command_timeout, async {
            inner.links[shard]
                .run(|mut conn| async move {
                    let now = now_secs();
                    let (count,): (usize,) = redis::pipe()
                        .cmd("ZREMRANGEBYSCORE")
                        .arg(&key)
                        .arg(0)
                        .arg(purge_below(now, expiry))
                        .ignore()
                        .cmd("ZCOUNT")
                        .arg(&key)
                        .arg("-inf")
                        .arg("+inf")
                        .query_async(&mut conn)
                        .await?;
                    if count >= capacity {
                        return Ok(false);
                    }
                    redis::pipe()
                        .cmd("ZADD")
                        .arg(&key)
                        .arg(score_arg(now))
                        .arg(payload)
                        .ignore()
                        .cmd("EXPIRE")
                        .arg(&key)
                        .arg(expiry)
                        .ignore()
                        .query_async::<()>(&mut conn)
                        .await?;
                    Ok(true)
                })
                .await
        })
        .await?;
        if added {
            Ok(())
        } else {
            metrics::counter!("axum_channels_layer_channel_full_total").increment(1);
            Err(LayerError::ChannelFull {
                channel: channel.to_owned(),
            })
        }
    }

    async fn receive(&self, channel: &str) -> Result<LayerMessage, LayerError> {
        validate_channel_name(channel)?;
        let inner = &self.inner;
        if channel.contains('!')
            && !non_local_name(channel).ends_with(&format!("{}!", inner.client_prefix))
        {
            return Err(BackendError::new(format!(
                "cannot receive on {channel:?}: it is a process-specific channel of another \
                 layer instance (receive on names this layer's new_channel made)"
            ))
            .into());
        }
        let key = inner.key_of(channel);
        let receiver = {
            let mut state = inner.lock();
            let buffer = inner.register(&mut state, channel, &key);
            Receiver::new(&inner.state, channel, buffer)
        };
        Ok(receiver.next().await.into_message())
    }

    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        validate_group_name(group)?;
        validate_channel_name(channel)?;
        let inner = &self.inner;
        let key = group_key(&inner.config.prefix, group);
        let shard = consistent_hash(group, inner.shards());
        let group_expiry = inner.config.group_expiry_secs();
        bounded("group_add", inner.config.command_timeout, async {
            inner.links[shard]
                .run(|mut conn| async move {
                    redis::pipe()
                        .cmd("ZADD")
                        .arg(&key)
                        .arg(score_arg(now_secs()))
                        .arg(channel)
                        .ignore()
                        .cmd("EXPIRE")
                        .arg(&key)
                        .arg(group_expiry)
                        .ignore()
                        .query_async::<()>(&mut conn)
                        .await
                })
                .await
        })
        .await?;
        let mut state = inner.lock();
        if state.buffers.contains(channel) {
            state
                .memberships
                .entry(channel.to_owned())
                .or_default()
                .insert(group.to_owned());
        }
        Ok(())
    }

    async fn group_discard(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        validate_group_name(group)?;
        validate_channel_name(channel)?;
        let inner = &self.inner;
        {
            let mut state = inner.lock();
            if let Some(groups) = state.memberships.get_mut(channel) {
                groups.remove(group);
                if groups.is_empty() {
                    state.memberships.remove(channel);
                }
            }
        }
        let key = group_key(&inner.config.prefix, group);
        let shard = consistent_hash(group, inner.shards());
        bounded("group_discard", inner.config.command_timeout, async {
            inner.links[shard]
                .run(|mut conn| async move {
                    redis::cmd("ZREM")
                        .arg(&key)
                        .arg(channel)
                        .query_async::<()>(&mut conn)
                        .await
                })
                .await
        })
        .await
    }

    async fn group_send(&self, group: &str, message: LayerMessage) -> Result<(), LayerError> {
        validate_group_name(group)?;
        let inner = &self.inner;
        // Refuse a bad message before touching Redis.
        codec::encode(&message, Route::None, true, inner.config.max_message_size)?;
        bounded("group_send", inner.config.command_timeout, async {
            let gkey = group_key(&inner.config.prefix, group);
            let gshard = consistent_hash(group, inner.shards());
            let group_expiry = inner.config.group_expiry_secs();
            let members: Vec<Vec<u8>> = inner.links[gshard]
                .run(|mut conn| async move {
                    let (members,): (Vec<Vec<u8>>,) = redis::pipe()
                        .cmd("ZREMRANGEBYSCORE")
                        .arg(&gkey)
                        .arg(0)
                        .arg(purge_below(now_secs(), group_expiry))
                        .ignore()
                        .cmd("ZRANGE")
                        .arg(&gkey)
                        .arg(0)
                        .arg(-1)
                        .query_async(&mut conn)
                        .await?;
                    Ok(members)
                })
                .await?;

            // One message per channel key, routed to all its members, in
            // the order Redis listed them (as Python does).
            let mut buckets: Vec<(String, Vec<String>)> = Vec::new();
            let mut index: HashMap<String, usize> = HashMap::new();
            for member in members {
                let Ok(name) = String::from_utf8(member) else {
                    tracing::warn!(group, "skipped a group member whose name is not UTF-8");
                    continue;
                };
                let key = inner.key_of(&name);
                match index.get(&key) {
                    Some(&i) => buckets[i].1.push(name),
                    None => {
                        index.insert(key.clone(), buckets.len());
                        buckets.push((key, vec![name]));
                    }
                }
            }
            let mut per_shard: Vec<Vec<(String, Vec<u8>, usize, Vec<String>)>> =
                vec![Vec::new(); inner.shards()];
            for (key, names) in buckets {
                let payload = codec::encode(
                    &message,
                    Route::Many(&names),
                    true,
                    inner.config.max_message_size,
                )?;
                let capacity = inner.config.capacity_of(&names[0]);
                let shard = consistent_hash(non_local_name(&names[0]), inner.shards());
                per_shard[shard].push((key, payload, capacity, names));
            }
            let sends = per_shard
                .into_iter()
                .enumerate()
                .filter(|(_, batch)| !batch.is_empty())
                .map(|(shard, batch)| inner.group_send_on(shard, group, batch));
            for outcome in futures_util::future::join_all(sends).await {
                outcome?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> Result<(), LayerError> {
        let inner = &self.inner;
        bounded("flush", inner.config.command_timeout, async {
            let flushes = inner.links.iter().map(|link| {
                let prefix = inner.config.prefix.clone();
                link.run(|conn| flush_shard(conn, prefix))
            });
            for outcome in futures_util::future::join_all(flushes).await {
                outcome?;
            }
            Ok(())
        })
        .await?;
        let mut state = inner.lock();
        for (_, buffer) in state.buffers.iter_mut() {
            buffer.clear();
        }
        state.memberships.clear();
        state.over_capacity.clear();
        Ok(())
    }

    async fn close_channel(&self, channel: &str) -> Result<(), LayerError> {
        validate_channel_name(channel)?;
        let inner = &self.inner;
        let key = inner.key_of(channel);
        let (left, groups) = {
            let mut state = inner.lock();
            let Some(left) = state.unregister(channel, &key) else {
                return Ok(()); // unknown, or someone still receives on it
            };
            (left, state.memberships.remove(channel).unwrap_or_default())
        };
        let raws: Vec<Raw> = left.into_iter().filter_map(|entry| entry.extra).collect();
        bounded("close_channel", inner.config.command_timeout, async {
            // What a plain channel popped but nobody took goes back to
            // Redis for another receiver.
            let mut by_shard: HashMap<usize, Vec<Raw>> = HashMap::new();
            for raw in raws {
                by_shard.entry(raw.shard).or_default().push(raw);
            }
            for (shard, raws) in by_shard {
                let key = &key;
                inner.links[shard]
                    .run(|mut conn| async move { inner.give_back(&mut conn, key, &raws).await })
                    .await?;
            }
            // Left in a group, the channel would keep getting group
            // messages nobody reads until its membership expires.
            for group in groups {
                let gkey = group_key(&inner.config.prefix, &group);
                let shard = consistent_hash(&group, inner.shards());
                inner.links[shard]
                    .run(|mut conn| async move {
                        redis::cmd("ZREM")
                            .arg(&gkey)
                            .arg(channel)
                            .query_async::<()>(&mut conn)
                            .await
                    })
                    .await?;
            }
            Ok(())
        })
        .await
    }

    fn group_expiry(&self) -> Option<Duration> {
        Some(self.inner.config.group_expiry)
    }
}

impl Inner {
    /// The per-host half of `group_send`: purge, then the Lua script, then
    /// (only if something was over capacity) find out which keys were.
    async fn group_send_on(
        &self,
        shard: usize,
        group: &str,
        batch: Vec<(String, Vec<u8>, usize, Vec<String>)>,
    ) -> Result<(), LayerError> {
        let expiry = self.config.expiry_secs();
        let script = &self.group_send;
        let batch = &batch;
        let counts: Option<Vec<usize>> = self.links[shard]
            .run(|mut conn| async move {
                let now = now_secs();
                let mut purge = redis::pipe();
                purge.atomic();
                for (key, ..) in batch {
                    purge
                        .cmd("ZREMRANGEBYSCORE")
                        .arg(key)
                        .arg(0)
                        .arg(purge_below(now, expiry))
                        .ignore();
                }
                purge.query_async::<()>(&mut conn).await?;
                let mut invocation = script.prepare_invoke();
                for (key, ..) in batch {
                    invocation.key(key);
                }
                for (_, payload, ..) in batch {
                    invocation.arg(payload);
                }
                for (_, _, capacity, _) in batch {
                    invocation.arg(*capacity);
                }
                invocation.arg(score_arg(now)).arg(expiry);
                let over: usize = invocation.invoke_async(&mut conn).await?;
                if over == 0 {
                    return Ok(None);
                }
                let mut count = redis::pipe();
                for (key, ..) in batch {
                    count.cmd("ZCOUNT").arg(key).arg("-inf").arg("+inf");
                }
                Ok(Some(count.query_async(&mut conn).await?))
            })
            .await?;
        let mut full = Vec::new();
        let mut fine = Vec::new();
        for (i, (key, _, capacity, names)) in batch.iter().enumerate() {
            let at_capacity = counts
                .as_ref()
                .and_then(|counts| counts.get(i))
                .is_some_and(|count| count >= capacity);
            if at_capacity {
                full.push((key.as_str(), names.as_slice(), *capacity));
            } else {
                fine.push(key.as_str());
            }
        }
        self.report_over_capacity(group, &full, &fine);
        Ok(())
    }
}

/// `flush` on one host: `SCAN` (never `KEYS`, which blocks Redis and is
/// often denied by ACLs) for `{prefix}*`, keep the keys that are
/// structurally ours, `UNLINK` them in batches.
async fn flush_shard(mut conn: MultiplexedConnection, prefix: String) -> Result<(), RedisError> {
    let pattern = format!("{}*", escape_glob(&prefix));
    let mut found: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        found.extend(keys);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let longer: Vec<String> = found
        .iter()
        .filter_map(|key| longer_prefix_of(key, &prefix))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let doomed: Vec<&Vec<u8>> = found
        .iter()
        .filter(|key| flushable(key, &prefix, &longer))
        .collect();
    for batch in doomed.chunks(UNLINK_BATCH) {
        redis::cmd("UNLINK")
            .arg(batch)
            .query_async::<()>(&mut conn)
            .await?;
    }
    tracing::debug!(
        prefix,
        deleted = doomed.len(),
        kept = found.len() - doomed.len(),
        "flushed one host"
    );
    Ok(())
}
