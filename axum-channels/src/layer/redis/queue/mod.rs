//! [`RedisLayer`]: the queue ("reliable") layer. Every channel is a Redis
//! sorted set of messages, so a message waits in Redis until someone
//! receives it or it expires, and groups are sorted sets of channel names.
//!
//! The keys, payloads and Lua scripts are the Python layer's
//! (`RedisChannelLayer` of channels_redis / fast-channels), so Python and
//! Rust processes share channels and groups. How it reads from Redis is its
//! own, to fix what goes wrong in Python (the wire specification, §7).
//! The modules: this one, the layer and its trait methods; `state`, what it
//! keeps in this process (buffers, demand, grace periods); `popper`, the
//! tasks that pop from Redis; `send`, `send` and `group_send`.
//!
//! - **Poppers** (`popper.rs`). Each Redis key this process reads has one
//!   popper task per host on a blocking connection, handing what it pops
//!   to the local buffers of the channels named in `__asgi_channel__`. A
//!   pop is never cancelled, and `receive` only waits on its buffer, so a
//!   cancelled `receive` loses nothing. Poppers outlive their key's last
//!   channel by a grace period and pass their connections on, so channels
//!   that come and go do not pile up Redis connections.
//! - **Demand.** A popper only starts a pop while a receiver of its key is
//!   waiting with an empty buffer, and pops at most one message per such
//!   receiver. Messages nobody is waiting for stay in Redis, where
//!   `capacity` and `expiry` apply. (A pop that was already waiting when
//!   its receiver gave up still brings in its message, at most one per
//!   host: it is never cancelled.)
//! - **What capacity bounds.** Capacity is counted per Redis key, by every
//!   sender (Python's too), and all the process-specific channels of one
//!   layer instance share one key (`{prefix}specific.{client_prefix}!`:
//!   the wire format). So their senders get `ChannelFull` when the
//!   channels of that process *together* hold the capacity in Redis. A
//!   channel alone in its process keeps its backlog in Redis, and its
//!   senders feel it. A channel whose neighbours keep the popper busy has
//!   its messages popped with theirs (they come in send order), into its
//!   local buffer, which holds at most its capacity and then drops its
//!   oldest: one warning per episode, a debug line and
//!   `axum_channels_queue_buffer_dropped_total{prefix}` per message,
//!   although their senders got `Ok`. Not popping past a slow channel's
//!   messages would make its backlog fill the shared key, and its
//!   neighbours' senders would get `ChannelFull` instead.
//! - **Bounded buffers.** `close_channel` frees a channel's buffer and
//!   leaves the groups it joined here. A message routed to several local
//!   channels is one copy shared by their buffers.
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

mod popper;
mod send;
mod state;

pub(crate) use popper::{POP_BATCH, has_bzmpop, pop};
pub(crate) use send::{KeyPayload, SEEN_MEMBERS_MAX, digest, payloads_by_key, remember};

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::{RedisError, Script};
use tokio::time::Instant;

use self::popper::{Spare, popper};
use self::state::{Extra, Raw, State, settle};
use super::bounded;
use super::config::RedisConfig;
use super::link::Link;
use super::task::spawn_supervised;
use super::wire::{
    CLEANUP_LUA, GROUP_SEND_CHECKED_LUA, GROUP_SEND_LUA, Version, channel_key, consistent_hash,
    escape_glob, flushable, group_key, longer_prefix_of, non_local_name, now_secs,
    queue_channel_name, score_arg, uuid4_hex,
};
use crate::layer::buffers::{Buffer, Entry, Locked, Receiver, shrink};
use crate::layer::{
    ChannelLayer, LayerError, LayerMessage, validate_channel_name, validate_group_name,
};

/// How many keys one `UNLINK` of `flush` deletes.
const UNLINK_BATCH: usize = 500;

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
    /// Blocking connections of stopped poppers, for the next ones.
    spare: Spare,
    round_robin: AtomicUsize,
    next_epoch: AtomicU64,
    shut_down: AtomicBool,
    group_send: Script,
    group_send_checked: Script,
    /// The members each group had when this process last sent to it (one
    /// host only: see `send::Inner::group_send_checked`).
    seen: Locked<HashMap<String, Arc<send::Seen>>>,
    cleanup: Script,
    /// Pops that are to panic (see [`RedisLayer::inject_popper_panic`]).
    injected_panics: AtomicU32,
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
            spare: Spare::new(links.len()),
            links,
            state: Locked::default(),
            round_robin: AtomicUsize::new(0),
            next_epoch: AtomicU64::new(1),
            shut_down: AtomicBool::new(false),
            group_send: Script::new(GROUP_SEND_LUA),
            group_send_checked: Script::new(GROUP_SEND_CHECKED_LUA),
            seen: Locked::default(),
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

    /// One receive on `channel`, its message marked as read: what
    /// `receive` and `receive_shared` wait on.
    async fn next_entry(&self, channel: &str) -> Result<Entry<Extra>, LayerError> {
        let inner = &self.inner;
        let receiver = {
            let mut state = inner.lock();
            // Nearly always there already: every receive comes here, and
            // a group message is one receive per member. Only a receive
            // makes a buffer, so a name that has one was checked then.
            let buffer = if state.buffers.contains(channel) {
                state.buffers.get_mut(channel).expect("just looked up")
            } else {
                validate_channel_name(channel)?;
                if inner.is_foreign(channel) {
                    // A caller's mistake, not an outage.
                    return Err(LayerError::ForeignChannel {
                        channel: channel.to_owned(),
                    });
                }
                // Not kept past the await: it would live as long as the
                // wait, an allocation per idle connection.
                let key = inner.key_of(channel);
                inner.register(&mut state, channel, &key)
            };
            Receiver::new(&inner.state, channel, buffer)
        };
        let mut entry = receiver.next().await;
        entry.extra.unread.clear();
        Ok(entry)
    }
}

impl Drop for RedisLayer {
    fn drop(&mut self) {
        self.inner.shut_down.store(true, Ordering::SeqCst);
        for link in &self.inner.links {
            link.close();
        }
        self.inner.lock().wake_all();
        self.inner.spare.clear();
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

    /// Takes `channel` out of `group`'s sorted set on Redis (`ZREM`).
    async fn leave_group(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        let key = group_key(&self.config.prefix, group);
        let shard = consistent_hash(group, self.shards());
        self.links[shard]
            .run(|mut conn| async move {
                redis::cmd("ZREM")
                    .arg(&key)
                    .arg(channel)
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await
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

    /// Makes `channel` local (a buffer, and poppers for its key unless it
    /// has them) in the locked `state`, unless it is already, and returns
    /// its buffer, so that a receiver can start waiting on it in the same
    /// step (no `close_channel` can come in between).
    fn register<'s>(
        self: &Arc<Self>,
        state: &'s mut State,
        channel: &str,
        key: &str,
    ) -> &'s mut Buffer<Extra> {
        let capacity = self.config.capacity_of(channel);
        let (buffer, epoch) = state.register(
            channel,
            key,
            capacity,
            &self.config.prefix,
            &self.next_epoch,
        );
        if let Some(epoch) = epoch {
            // Spawning does not run them: they wait for this lock.
            self.spawn_poppers(key, epoch);
        }
        buffer
    }

    /// Whether `channel` is a process-specific channel another layer
    /// instance made: its messages sit in that instance's key, which only
    /// that instance reads.
    fn is_foreign(&self, channel: &str) -> bool {
        channel.contains('!')
            && !non_local_name(channel).ends_with(&format!("{}!", self.client_prefix))
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
        self.inner.send(channel, message).await
    }

    async fn receive(&self, channel: &str) -> Result<LayerMessage, LayerError> {
        Ok(self.next_entry(channel).await?.into_message())
    }

    async fn receive_shared(&self, channel: &str) -> Result<Arc<LayerMessage>, LayerError> {
        Ok(self.next_entry(channel).await?.into_shared())
    }

    fn try_receive(&self, channel: &str) -> Option<Arc<LayerMessage>> {
        let mut state = self.inner.lock();
        let buffer = state.buffers.get_mut(channel)?;
        let mut entry = buffer.take_ready(Instant::now())?;
        entry.extra.unread.clear();
        Some(entry.into_shared())
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
            let groups = state.memberships.entry(channel.to_owned()).or_default();
            if !groups.iter().any(|joined| joined == group) {
                // Room for this one only (a first push makes room for four):
                // a server holds one such list per connection.
                groups.reserve_exact(1);
                groups.push(group.to_owned());
            }
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
                groups.retain(|joined| joined != group);
                if groups.is_empty() {
                    state.memberships.remove(channel);
                    shrink(&mut state.memberships);
                }
            }
        }
        bounded(
            "group_discard",
            inner.config.command_timeout,
            inner.leave_group(group, channel),
        )
        .await
    }

    async fn group_send(&self, group: &str, message: LayerMessage) -> Result<(), LayerError> {
        validate_group_name(group)?;
        self.inner.group_send(group, message).await
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
        inner.lock().clear();
        Ok(())
    }

    async fn close_channel(&self, channel: &str) -> Result<(), LayerError> {
        validate_channel_name(channel)?;
        let inner = &self.inner;
        let key = inner.key_of(channel);
        let (left, groups) = {
            let mut state = inner.lock();
            let Some(left) = state.unregister(channel, &key, Instant::now()) else {
                return Ok(()); // unknown, or someone still receives on it
            };
            let groups = state.memberships.remove(channel).unwrap_or_default();
            shrink(&mut state.memberships);
            (left, groups)
        };
        let raws = settle(left);
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
                inner.leave_group(&group, channel).await?;
            }
            Ok(())
        })
        .await
    }

    fn group_expiry(&self) -> Option<Duration> {
        Some(self.inner.config.group_expiry)
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
