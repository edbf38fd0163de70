//! [`RedisClusterLayer`]: the queue layer on a Redis Cluster. Messages wait
//! in Redis sorted sets until received or expired, as with [`RedisLayer`]
//! (`super::super::RedisLayer`), with capacity, expiry and group expiry
//! meaning the same; only the key layout differs, so that every command and
//! script touches one slot:
//!
//! | what | one Redis (Python's layout) | cluster (ours) |
//! |---|---|---|
//! | a channel's messages | `{prefix}{non-local name}` | `{prefix}{{non-local name}}`: the hash tag keeps the key whole in one slot, and the channels of one process share it |
//! | a group's members | `{prefix}:group:{group}` | the same: one key, its own slot |
//! | a group's membership version for one channel key | none | `{channel key}:group:{group}`: a random token, new at every `group_add` and `group_discard` of one of the key's channels, in the key's slot |
//!
//! The first `group_send` to a group from this process reads the members
//! (one command on the group's slot), groups their channel keys by slot,
//! and runs Python's group-send script once per slot, concurrently. It
//! remembers what it read. The next one takes one round trip while the
//! members stay the same, as the single-Redis layer's checked script does
//! on one host: it sends to each key it remembers, in a script that adds
//! the message only if the key's membership version is still the one the
//! members were read with, and at the same time checks the digest of the
//! group's list on the group's slot. A key whose version changed, and a
//! key the group gained, get the message after a fresh read (two more
//! round trips); a key with a membership older than `group_expiry` is read
//! again before it is sent to. A `group_send` that fails may still have
//! reached some keys, as one over several slots always could.
//!
//! A Python process cannot share this layout: its scripts touch several
//! slots, and redis-py's cluster client refuses them.
//!
//! Receiving: one popper task per key this process reads, each on a
//! cluster connection of its own (a blocking pop would stall every
//! other command to that node on a shared connection), popping only while a
//! receiver waits on an empty buffer, so that messages nobody waits for stay
//! in Redis where capacity and expiry apply. The popper follows its slot
//! through moves and failovers as any cluster command does (`MOVED`, slot
//! map refresh, retries), and backs off while the cluster refuses; after a
//! failed pop it opens its connection again, so it cannot keep a stale slot
//! map. The other calls share one connection, renewed when a slot's calls
//! keep failing towards a node (`cluster::Renewing`); sends and group sends
//! go straight to their slot's owner when the layer knows it, and through
//! that connection when that fails (`cluster::routed`).
//!
//! Simpler than the single-Redis queue layer, and said so in the book: no
//! grace period or spare connections for poppers (a popper ends when its
//! key has no local channel left), a plain channel's message popped for a
//! receiver that went away meanwhile is lost rather than given back, and
//! memberships are not written again after a failover (the runner renews
//! them every half `group_expiry`, which restores them).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use tokio::time::Instant;

use super::{Direct, Outage, Renewing, backend, retrying, routed, slot};
use crate::layer::buffers::{
    Demand, Entry, HoldsBuffers, LocalBuffers, Locked, Receiver, WhenFull,
};
use crate::layer::episode::Episode;
use crate::layer::redis::bounded;
use crate::layer::redis::codec::{self, Route};
use crate::layer::redis::config::RedisConfig;
use crate::layer::redis::link::{BACKOFF_MIN, doubled};
use crate::layer::redis::queue::{
    KeyPayload, POP_BATCH, SEEN_MEMBERS_MAX, digest, has_bzmpop, payloads_by_key, pop, remember,
};
use crate::layer::redis::wire::{
    GROUP_SEND_LUA, Version, escape_glob, group_key, non_local_name, now_secs, purge_below,
    push_within_capacity, queue_channel_name, score_arg, uuid4_hex,
};
use crate::layer::{
    ChannelLayer, LayerError, LayerMessage, validate_channel_name, validate_group_name,
};

/// The queue layer on a Redis Cluster. See the module documentation, and
/// [`RedisLayer`](super::super::RedisLayer) for what a queue layer is.
pub struct RedisClusterLayer {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisConfig,
    client_prefix: String,
    /// Every call but the poppers': renewed when a slot's calls keep
    /// failing towards a node (see `cluster::Renewing`).
    conn: Renewing,
    /// Sends and group sends go straight to the slot's owner when it is
    /// known.
    direct: Arc<Direct>,
    /// For poppers' connections: no response timeout at or below the block.
    popper_client: ClusterClient,
    /// Every node has `BZMPOP` (Redis 7.0): a pop is one round trip.
    bzmpop: bool,
    group_send: Script,
    group_digest: Script,
    push_checked: Script,
    /// Per group, what its last `group_send` from here read of it.
    seen: Locked<HashMap<String, Arc<Seen>>>,
    state: Locked<State>,
    /// One warning while the cluster refuses calls, not one per call.
    outage: Outage,
}

struct State {
    buffers: LocalBuffers,
    /// Channel key → its local channels and the demand its popper reads.
    keys: HashMap<String, Key>,
    /// Local channel → the groups it joined here (left on close).
    memberships: HashMap<String, HashSet<String>>,
}

impl Default for State {
    fn default() -> Self {
        State {
            buffers: LocalBuffers::new(WhenFull::DropOldest),
            keys: HashMap::new(),
            memberships: HashMap::new(),
        }
    }
}

struct Key {
    channels: usize,
    demand: Arc<Demand>,
}

impl HoldsBuffers for State {
    type Extra = ();

    fn buffers(&mut self) -> &mut LocalBuffers {
        &mut self.buffers
    }
}

/// What a layer last read of a group, for its next `group_send`.
struct Seen {
    /// [`digest`] of the members as Redis listed them.
    digest: String,
    /// The members by channel key, in the order Redis listed them.
    keys: Vec<SeenKey>,
}

/// One channel key of a group's members, as last read.
struct SeenKey {
    key: String,
    names: Vec<String>,
    capacity: usize,
    /// When the longest-standing of `names` joined (its score).
    oldest: f64,
    /// The key's membership version for the group, read before `names`
    /// were ([`UNKNOWN`] if it was not).
    version: String,
}

/// A version no key has: a key seen with it is read again before it is
/// sent to in one step.
const UNKNOWN: &str = "?";

/// What [`PUSH_CHECKED_LUA`] did with one key's message.
enum Checked {
    /// Sent, or skipped for capacity (`true`).
    Sent(bool),
    /// Not sent: the key's membership changed; its version now.
    Changed(String),
}

/// The key of a group's membership version for one channel key: set to a
/// fresh random token by every `group_add` and `group_discard` of one of
/// its channels, in the channel key's slot.
fn version_key(channel_key: &str, group: &str) -> String {
    format!("{channel_key}:group:{group}")
}

// ANCHOR: cluster_group_scripts
/// Whether a group's members are still those with a digest. `KEYS`: the
/// group. `ARGV`: its purge cut-off, the digest. Returns 1 if they are.
const GROUP_DIGEST_LUA: &str = r#"
    redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[1])
    local members = redis.call('ZRANGE', KEYS[1], 0, -1)
    if redis.sha1hex(table.concat(members, '\n')) == ARGV[2] then
        return 1
    end
    return 0
"#;

/// A group message to one channel key, only if the key's membership
/// version for the group is still the one its members were read with.
/// `KEYS`: the version key, the channel key. `ARGV`: the version, the
/// capacity, the time, the expiry, then the payloads. Returns
/// `{status, version}`: status 0 sent, 1 at capacity, -1 changed (nothing
/// sent); `-` stands for no version.
const PUSH_CHECKED_LUA: &str = r#"
    local version = redis.call('GET', KEYS[1]) or '-'
    if version ~= ARGV[1] then
        return {-1, version}
    end
    local status = 0
    for i = 5, #ARGV do
        if redis.call('ZCOUNT', KEYS[2], '-inf', '+inf') < tonumber(ARGV[2]) then
            redis.call('ZADD', KEYS[2], ARGV[3], ARGV[i])
            redis.call('EXPIRE', KEYS[2], ARGV[4])
        else
            status = 1
        end
    end
    return {status, version}
"#;
// ANCHOR_END: cluster_group_scripts

/// The cluster layout's key for a channel: `{prefix}{{non-local name}}`.
pub(crate) fn cluster_channel_key(prefix: &str, channel: &str) -> String {
    format!("{prefix}{{{}}}", non_local_name(channel))
}

impl RedisClusterLayer {
    /// Connects to the Redis Cluster whose nodes (some or all) are
    /// `config.hosts`; needs Redis 5.0 or newer (`BZPOPMIN`).
    pub async fn connect(config: RedisConfig) -> Result<Self, LayerError> {
        config.validate()?;
        let because = "the queue layer pops with BZPOPMIN";
        let client = super::client(&config, None::<fn(redis::PushInfo) -> Result<(), ()>>)?;
        let within = config.command_timeout;
        let (conn, version) =
            super::connect(client, Version(5, 0), because, "queue layer", within).await?;
        let popper_config = RedisConfig {
            command_timeout: config.block_timeout + config.command_timeout,
            ..config.clone()
        };
        let popper_client = super::client(
            &popper_config,
            None::<fn(redis::PushInfo) -> Result<(), ()>>,
        )?;
        let direct = Direct::new(&config)?;
        direct.refresh().await;
        Ok(RedisClusterLayer {
            inner: Arc::new(Inner {
                outage: Outage::new("queue", &config.prefix),
                config,
                client_prefix: uuid4_hex(),
                conn,
                direct,
                popper_client,
                bzmpop: has_bzmpop(version),
                group_send: Script::new(GROUP_SEND_LUA),
                group_digest: Script::new(GROUP_DIGEST_LUA),
                push_checked: Script::new(PUSH_CHECKED_LUA),
                seen: Locked::default(),
                state: Locked::default(),
            }),
        })
    }

    /// The configuration this layer runs with.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// How many local channels have a buffer here right now.
    pub fn local_channels(&self) -> usize {
        self.inner.lock().buffers.len()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    fn key(&self, channel: &str) -> String {
        cluster_channel_key(&self.config.prefix, channel)
    }

    /// Gives `channel`'s key a new membership version for `group`, after
    /// its membership changed in the group's list (in that order: a
    /// `group_send` that sees the new version reads the list after it, so
    /// it reads the change). A sender that remembers the old one reads the
    /// group again before sending to that key.
    async fn new_version(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        let key = version_key(&self.key(channel), group);
        let within = self.config.command_timeout;
        let command = redis::cmd("SET")
            .arg(&key)
            .arg(uuid4_hex())
            .arg("EX")
            .arg(self.config.group_expiry_secs())
            .to_owned();
        retrying(
            within,
            &self.conn,
            Some(slot(key.as_bytes())),
            |mut conn| {
                let command = command.clone();
                async move { command.query_async::<()>(&mut conn).await }
            },
        )
        .await
        .map_err(|err| backend("changing a membership version failed", err))
    }

    /// Opens `channel`'s buffer if it has none, counted in its key's
    /// demand, and starts the key's popper if it has none. The name is
    /// checked then, not again while the buffer lives.
    fn open<'s>(
        self: &Arc<Self>,
        state: &'s mut State,
        channel: &str,
    ) -> Result<&'s mut crate::layer::buffers::Buffer, LayerError> {
        if !state.buffers.contains(channel) {
            validate_channel_name(channel)?;
            let key = self.key(channel);
            let entry = state.keys.entry(key.clone()).or_insert_with(|| {
                let demand = Arc::new(Demand::default());
                let plain = (!channel.contains('!')).then(|| channel.to_owned());
                tokio::spawn(popper(
                    Arc::downgrade(self),
                    key.clone(),
                    plain,
                    Arc::clone(&demand),
                ));
                Key {
                    channels: 0,
                    demand,
                }
            });
            entry.channels += 1;
            let demand = Arc::clone(&entry.demand);
            let capacity = self.config.capacity_of(channel);
            state.buffers.open_counted(channel, capacity, || demand);
        }
        Ok(state.buffers.get_mut(channel).expect("opened above"))
    }

    /// Removes `channel`'s buffer; its key's popper stops when it was the
    /// last.
    fn close(&self, state: &mut State, channel: &str) {
        if state.buffers.remove(channel).is_none() {
            return;
        }
        let key = self.key(channel);
        if let Some(entry) = state.keys.get_mut(&key) {
            entry.channels = entry.channels.saturating_sub(1);
            if entry.channels == 0 {
                entry.demand.bell().notify_waiters();
            }
        }
    }

    /// When a message sent at `score` expires on this process's clock.
    fn expires(&self, score: f64, now: Instant) -> Option<Instant> {
        let expiry = self.config.expiry_secs() as f64;
        let left = (expiry - (now_secs() - score)).clamp(0.0, expiry);
        now.checked_add(Duration::try_from_secs_f64(left).ok()?)
    }

    fn deliver(&self, key: &str, plain: Option<&str>, member: &[u8], score: f64) {
        let Some(decoded) = codec::read(member, true, self.config.max_message_size, key) else {
            return;
        };
        let now = Instant::now();
        let expires = self.expires(score, now);
        let message = Arc::new(decoded.message);
        let mut state = self.lock();
        let names: Vec<String> = match (plain, decoded.route) {
            (Some(name), _) => vec![name.to_owned()],
            (None, Some(route)) => route,
            (None, None) => {
                tracing::warn!(key, "dropped a message without __asgi_channel__");
                return;
            }
        };
        for name in &names {
            match state.buffers.get_mut(name) {
                Some(buffer) => {
                    let _ = buffer.push(name, Entry::new(Arc::clone(&message), expires), now);
                }
                None => tracing::debug!(channel = name, "dropped a message for a closed channel"),
            }
        }
    }

    async fn send(&self, channel: &str, message: LayerMessage) -> Result<(), LayerError> {
        let route = if channel.contains('!') {
            Route::One(channel)
        } else {
            Route::None
        };
        let payload = codec::encode(&message, route, true, self.config.max_message_size)?;
        let key = self.key(channel);
        let capacity = self.config.capacity_of(channel);
        let expiry = self.config.expiry_secs();
        let at = slot(key.as_bytes());
        let within = self.config.command_timeout;
        let added = routed(within, &self.direct, &self.conn, at, |mut conn| {
            let (key, payload) = (&key, &payload);
            async move { push_within_capacity(&mut conn, key, payload, capacity, expiry).await }
        })
        .await
        .map_err(|err| backend("send failed", err))?;
        if added {
            Ok(())
        } else {
            metrics::counter!("axum_channels_layer_channel_full_total").increment(1);
            Err(LayerError::ChannelFull {
                channel: channel.to_owned(),
            })
        }
    }

    async fn group_send(&self, group: &str, message: LayerMessage) -> Result<(), LayerError> {
        // Refuse a bad message before touching Redis.
        codec::encode(&message, Route::None, true, self.config.max_message_size)?;
        let seen = self.seen.lock().get(group).cloned();
        let sent = match seen {
            Some(seen) => self.group_send_seen(group, &message, &seen).await,
            None => {
                self.group_send_read(group, &message, HashMap::new(), &HashSet::new())
                    .await
            }
        };
        if sent.is_err() {
            // Whatever was seen may be out of date; read next time.
            self.seen.lock().remove(group);
        }
        let over = sent?;
        if over > 0 {
            metrics::counter!("axum_channels_layer_channel_full_total").increment(over as u64);
            tracing::debug!(group, over, "group_send skipped members at capacity");
        }
        Ok(())
    }

    /// `group_send` to a group seen before, in one round trip while its
    /// members stay as seen: the message goes to each key seen, checked
    /// there against the key's membership version, while the group's list
    /// is checked against its digest on the group's slot. Keys whose
    /// version changed, and keys the group has gained, are sent to after a
    /// fresh read. Returns how many keys were at capacity.
    async fn group_send_seen(
        &self,
        group: &str,
        message: &LayerMessage,
        seen: &Seen,
    ) -> Result<usize, LayerError> {
        // A key with a membership past `group_expiry` by now is read
        // again first, so that the lapsed member gets nothing more.
        let cutoff = purge_below(now_secs(), self.config.group_expiry_secs()) as f64;
        let (fresh, lapsing): (Vec<&SeenKey>, Vec<&SeenKey>) =
            seen.keys.iter().partition(|key| key.oldest > cutoff);
        let (unchanged, pushed) = tokio::join!(
            self.group_unchanged(group, &seen.digest),
            self.push_checked(group, message, &fresh)
        );
        let (unchanged, pushed) = (unchanged?, pushed?);
        let mut over = 0;
        let mut versions: HashMap<String, String> = lapsing
            .iter()
            .map(|key| (key.key.clone(), key.version.clone()))
            .collect();
        let mut done = HashSet::new();
        for (key, outcome) in fresh.into_iter().zip(pushed) {
            match outcome {
                Checked::Sent(at_capacity) => {
                    over += usize::from(at_capacity);
                    versions.insert(key.key.clone(), key.version.clone());
                    done.insert(key.key.clone());
                }
                Checked::Changed(now) => {
                    versions.insert(key.key.clone(), now);
                }
            }
        }
        if unchanged && done.len() == seen.keys.len() {
            return Ok(over);
        }
        Ok(over
            + self
                .group_send_read(group, message, versions, &done)
                .await?)
    }

    /// `group_send` in two steps: reads the group's members, sends to
    /// their keys except those in `done`, and remembers what it read, each
    /// key with its version in `versions` (read before the members were;
    /// unknown for the others). Returns how many keys were at capacity.
    async fn group_send_read(
        &self,
        group: &str,
        message: &LayerMessage,
        mut versions: HashMap<String, String>,
        done: &HashSet<String>,
    ) -> Result<usize, LayerError> {
        let listed = self.members(group).await?;
        // A group too large to remember is read at every send: it needs
        // neither its digest nor when each key's members joined.
        let remembered = listed.len() <= SEEN_MEMBERS_MAX;
        let mut oldest: HashMap<&str, f64> = HashMap::new();
        if remembered {
            for (name, score) in &listed {
                let tag = oldest.entry(non_local_name(name)).or_insert(*score);
                *tag = tag.min(*score);
            }
        }
        let oldest: HashMap<String, f64> = oldest
            .into_iter()
            .map(|(tag, score)| (self.key(tag), score))
            .collect();
        let members: Vec<String> = listed.into_iter().map(|(name, _)| name).collect();
        let digest = remembered.then(|| digest(&members));
        // Per channel key, as many payloads as keep each within
        // `max_message_size` (the single-Redis layer's code).
        let writes = payloads_by_key(
            message,
            members,
            |name| self.key(name),
            self.config.max_message_size,
        )?;
        let over = self
            .push(
                group,
                writes.iter().filter(|write| !done.contains(&write.0)),
            )
            .await?;
        match digest {
            Some(digest) => {
                let mut keys: Vec<SeenKey> = Vec::new();
                for (key, _, names) in writes {
                    match keys.last_mut() {
                        Some(last) if last.key == key => last.names.extend(names),
                        _ => keys.push(SeenKey {
                            capacity: self.config.capacity_of(&names[0]),
                            oldest: oldest.get(&key).copied().unwrap_or(0.0),
                            version: versions.remove(&key).unwrap_or_else(|| UNKNOWN.to_owned()),
                            key,
                            names,
                        }),
                    }
                }
                remember(
                    &mut self.seen.lock(),
                    group,
                    Arc::new(Seen { digest, keys }),
                );
            }
            None => {
                self.seen.lock().remove(group);
            }
        }
        Ok(over)
    }

    /// The group's members now, with the time each joined, after purging
    /// those older than `group_expiry`: one call, on the group's slot.
    async fn members(&self, group: &str) -> Result<Vec<(String, f64)>, LayerError> {
        let gkey = group_key(&self.config.prefix, group);
        let within = self.config.command_timeout;
        let at = slot(gkey.as_bytes());
        let (members,): (Vec<(String, f64)>,) =
            routed(within, &self.direct, &self.conn, at, |mut conn| {
                let pipe = redis::pipe()
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(&gkey)
                    .arg(0)
                    .arg(purge_below(now_secs(), self.config.group_expiry_secs()))
                    .ignore()
                    .cmd("ZRANGE")
                    .arg(&gkey)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .to_owned();
                async move { pipe.query_async(&mut conn).await }
            })
            .await
            .map_err(|err| backend("group_send failed", err))?;
        tracing::trace!(group, members = members.len(), "group_send read the group");
        Ok(members)
    }

    /// True while the group's members (purged as [`members`](Self::members)
    /// does) still have `digest`.
    async fn group_unchanged(&self, group: &str, digest: &str) -> Result<bool, LayerError> {
        let gkey = group_key(&self.config.prefix, group);
        let within = self.config.command_timeout;
        let cutoff = purge_below(now_secs(), self.config.group_expiry_secs());
        let mut invocation = self.group_digest.prepare_invoke();
        invocation.key(&gkey).arg(cutoff).arg(digest);
        let invocation = &invocation;
        routed(
            within,
            &self.direct,
            &self.conn,
            slot(gkey.as_bytes()),
            |mut conn| async move { invocation.invoke_async::<bool>(&mut conn).await },
        )
        .await
        .map_err(|err| backend("group_send failed", err))
    }

    /// The message to each of `keys`, by [`PUSH_CHECKED_LUA`], concurrently.
    async fn push_checked(
        &self,
        group: &str,
        message: &LayerMessage,
        keys: &[&SeenKey],
    ) -> Result<Vec<Checked>, LayerError> {
        let now = score_arg(now_secs());
        let expiry = self.config.expiry_secs();
        let within = self.config.command_timeout;
        let mut calls = Vec::with_capacity(keys.len());
        for key in keys {
            let mut invocation = self.push_checked.prepare_invoke();
            invocation
                .key(version_key(&key.key, group))
                .key(&key.key)
                .arg(&key.version)
                .arg(key.capacity)
                .arg(&now)
                .arg(expiry);
            for (payload, _) in
                codec::encode_many(message, &key.names, self.config.max_message_size)?
            {
                invocation.arg(payload);
            }
            let at = slot(key.key.as_bytes());
            let (conn, direct) = (&self.conn, &self.direct);
            calls.push(async move {
                let invocation = &invocation;
                routed(within, direct, conn, at, |mut conn| async move {
                    invocation.invoke_async::<(i64, String)>(&mut conn).await
                })
                .await
            });
        }
        let mut outcomes = Vec::with_capacity(calls.len());
        for result in futures_util::future::join_all(calls).await {
            let (status, version) = result.map_err(|err| backend("group_send failed", err))?;
            outcomes.push(match status {
                -1 => Checked::Changed(version),
                status => Checked::Sent(status > 0),
            });
        }
        Ok(outcomes)
    }

    /// Python's group-send script once per slot of `writes`, concurrently.
    /// Returns how many were at capacity.
    async fn push<'w>(
        &self,
        group: &str,
        writes: impl Iterator<Item = &'w KeyPayload>,
    ) -> Result<usize, LayerError> {
        let mut by_slot: BTreeMap<u16, Vec<&KeyPayload>> = BTreeMap::new();
        for write in writes {
            by_slot
                .entry(slot(write.0.as_bytes()))
                .or_default()
                .push(write);
        }
        let now = score_arg(now_secs());
        let expiry = self.config.expiry_secs();
        let within = self.config.command_timeout;
        let mut calls = Vec::with_capacity(by_slot.len());
        for (at, writes) in by_slot {
            let mut invocation = self.group_send.prepare_invoke();
            for (key, _, _) in &writes {
                invocation.key(key);
            }
            for (_, payload, _) in &writes {
                invocation.arg(payload);
            }
            for (_, _, channels) in &writes {
                invocation.arg(self.config.capacity_of(&channels[0]));
            }
            invocation.arg(&now).arg(expiry);
            let (conn, direct) = (&self.conn, &self.direct);
            calls.push(async move {
                let invocation = &invocation;
                routed(within, direct, conn, at, |mut conn| async move {
                    invocation.invoke_async::<usize>(&mut conn).await
                })
                .await
            });
        }
        let mut over = 0;
        for result in futures_util::future::join_all(calls).await {
            over += result.map_err(|err| backend("group_send failed", err))?;
        }
        tracing::trace!(group, over, "group_send pushed");
        Ok(over)
    }

    /// Deletes every key of this layer's prefix on every master (`SCAN`
    /// on each, by address), and empties the local buffers and groups.
    async fn flush(&self) -> Result<(), LayerError> {
        let within = self.config.command_timeout;
        let nodes: String = retrying(within, &self.conn, None, |mut conn| async move {
            redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut conn)
                .await
        })
        .await
        .map_err(|err| backend("CLUSTER NODES failed", err))?;
        let pattern = format!("{}*", escape_glob(&self.config.prefix));
        let prefix = &self.config.prefix;
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            // `fail` or `fail?` among the flags, not a promoted replica's
            // `nofailover`.
            let mut flags = fields.get(2).unwrap_or(&"").split(',');
            let live_master = flags.clone().any(|flag| flag == "master")
                && !flags.any(|flag| flag.starts_with("fail"));
            if fields.len() < 8 || !live_master {
                continue;
            }
            let address = fields[1].split('@').next().unwrap_or_default();
            let Some((host, port)) = address.rsplit_once(':') else {
                continue;
            };
            let Ok(port) = port.parse::<u16>() else {
                continue;
            };
            let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: host.to_owned(),
                port,
            });
            let mut cursor = 0u64;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(500);
                // A node's connection may be reconnecting just now (a fresh
                // cluster, a failover): that is a refusal to wait out.
                let reply = retrying(within, &self.conn, None, |mut conn| {
                    let (scan, route) = (scan.clone(), route.clone());
                    async move { conn.route_command(scan, route).await }
                })
                .await
                .map_err(|err| backend("SCAN failed", err))?;
                let (next, keys): (u64, Vec<String>) = redis::from_redis_value(reply)
                    .map_err(|err| backend("SCAN failed", err.into()))?;
                for key in keys {
                    let ours = key[prefix.len()..].starts_with('{')
                        || key[prefix.len()..].starts_with(":group:");
                    if ours {
                        let at = Some(slot(key.as_bytes()));
                        retrying(within, &self.conn, at, |mut conn| {
                            let key = &key;
                            async move {
                                redis::cmd("UNLINK")
                                    .arg(key)
                                    .query_async::<()>(&mut conn)
                                    .await
                            }
                        })
                        .await
                        .map_err(|err| backend("UNLINK failed", err))?;
                    }
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        let mut state = self.lock();
        for (_, buffer) in state.buffers.iter_mut() {
            buffer.clear();
        }
        state.memberships.clear();
        Ok(())
    }
}

/// One popper: pops `key` while a receiver of it waits on an empty buffer,
/// until the key has no local channel (or the layer is dropped).
async fn popper(inner: Weak<Inner>, key: String, plain: Option<String>, demand: Arc<Demand>) {
    let mut conn: Option<ClusterConnection> = None;
    let mut backoff = BACKOFF_MIN;
    let mut episode = Episode::default();
    loop {
        // Until a receiver is hungry; a look every second, to stop.
        loop {
            let rung = demand.bell().notified();
            let Some(layer) = inner.upgrade() else {
                return;
            };
            {
                let mut state = layer.lock();
                if state.keys.get(&key).is_none_or(|entry| entry.channels == 0) {
                    state.keys.remove(&key);
                    return;
                }
            }
            drop(layer);
            if demand.hungry() > 0 {
                break;
            }
            tokio::select! {
                () = rung => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        let Some(layer) = inner.upgrade() else {
            return;
        };
        let block_secs = layer.config.block_secs();
        let client = layer.popper_client.clone();
        let bzmpop = layer.bzmpop;
        drop(layer);
        let active = match conn.as_mut() {
            Some(active) => active,
            None => match client.get_async_connection().await {
                Ok(opened) => conn.insert(opened),
                Err(err) => {
                    if episode.start() {
                        tracing::warn!(key, %err, "cannot reach the Redis Cluster to receive; retrying");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = doubled(backoff);
                    continue;
                }
            },
        };
        let asked = Instant::now();
        // A process's own key: whatever has gathered, up to POP_BATCH, so its
        // receivers write runs (as the one-Redis layer's poppers do).
        let count = if plain.is_none() { POP_BATCH } else { 1 };
        let popped = pop(active, &key, count, block_secs, bzmpop).await;
        tracing::trace!(
            key,
            took = ?asked.elapsed(),
            popped = ?popped.as_ref().map(Vec::len),
            "popped"
        );
        match popped {
            Ok(members) => {
                backoff = BACKOFF_MIN;
                if let Some(lasted) = episode.end() {
                    tracing::info!(key, ?lasted, "receiving from the Redis Cluster again");
                }
                if !members.is_empty() {
                    let Some(layer) = inner.upgrade() else {
                        return;
                    };
                    for (member, score) in members {
                        layer.deliver(&key, plain.as_deref(), &member, score);
                    }
                }
            }
            Err(err) => {
                conn = None;
                if episode.start() {
                    tracing::warn!(key, %err, "receiving from the Redis Cluster failed; retrying");
                }
                tokio::time::sleep(backoff).await;
                backoff = doubled(backoff);
            }
        }
    }
}

impl RedisClusterLayer {
    /// One receive on `channel`: what `receive` and `receive_shared` wait
    /// on.
    async fn next_entry(&self, channel: &str) -> Result<Entry, LayerError> {
        let inner = &self.inner;
        let receiver = {
            let mut state = inner.lock();
            let buffer = inner.open(&mut state, channel)?;
            Receiver::new(&inner.state, channel, buffer)
        };
        Ok(receiver.next().await)
    }
}

#[async_trait]
impl ChannelLayer for RedisClusterLayer {
    async fn new_channel(&self, prefix: &str) -> Result<String, LayerError> {
        let name = queue_channel_name(prefix, &self.inner.client_prefix);
        let mut state = self.inner.lock();
        // A new name has no buffer yet: `open` checks it.
        self.inner.open(&mut state, &name)?;
        Ok(name)
    }

    async fn send(&self, channel: &str, message: LayerMessage) -> Result<(), LayerError> {
        validate_channel_name(channel)?;
        let inner = &self.inner;
        let result = bounded(
            "send",
            inner.config.command_timeout,
            inner.send(channel, message),
        )
        .await;
        inner.outage.observe(&result);
        result
    }

    async fn receive(&self, channel: &str) -> Result<LayerMessage, LayerError> {
        Ok(self.next_entry(channel).await?.into_message())
    }

    async fn receive_shared(&self, channel: &str) -> Result<Arc<LayerMessage>, LayerError> {
        Ok(self.next_entry(channel).await?.into_shared())
    }

    fn try_receive(&self, channel: &str) -> Option<Arc<LayerMessage>> {
        let mut state = self.inner.lock();
        let entry = state.buffers.get_mut(channel)?.take_ready(Instant::now())?;
        Some(entry.into_shared())
    }

    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        validate_group_name(group)?;
        validate_channel_name(channel)?;
        let inner = &self.inner;
        let gkey = group_key(&inner.config.prefix, group);
        let within = inner.config.command_timeout;
        let at = Some(slot(gkey.as_bytes()));
        let added = bounded("group_add", within, async {
            retrying(within, &inner.conn, at, |mut conn| {
                let pipe = redis::pipe()
                    .cmd("ZADD")
                    .arg(&gkey)
                    .arg(score_arg(now_secs()))
                    .arg(channel)
                    .ignore()
                    .cmd("EXPIRE")
                    .arg(&gkey)
                    .arg(inner.config.group_expiry_secs())
                    .ignore()
                    .to_owned();
                async move { pipe.query_async::<()>(&mut conn).await }
            })
            .await
            .map_err(|err| backend("group_add failed", err))?;
            inner.new_version(group, channel).await
        })
        .await;
        inner.outage.observe(&added);
        added?;
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
        if let Some(groups) = inner.lock().memberships.get_mut(channel) {
            groups.remove(group);
        }
        let gkey = group_key(&inner.config.prefix, group);
        let within = inner.config.command_timeout;
        let at = Some(slot(gkey.as_bytes()));
        let result = bounded("group_discard", within, async {
            retrying(within, &inner.conn, at, |mut conn| {
                let command = redis::cmd("ZREM").arg(&gkey).arg(channel).to_owned();
                async move { command.query_async::<()>(&mut conn).await }
            })
            .await
            .map_err(|err| backend("group_discard failed", err))?;
            inner.new_version(group, channel).await
        })
        .await;
        inner.outage.observe(&result);
        result
    }

    async fn group_send(&self, group: &str, message: LayerMessage) -> Result<(), LayerError> {
        validate_group_name(group)?;
        let inner = &self.inner;
        let result = bounded(
            "group_send",
            inner.config.command_timeout,
            inner.group_send(group, message),
        )
        .await;
        inner.outage.observe(&result);
        result
    }

    async fn flush(&self) -> Result<(), LayerError> {
        let inner = &self.inner;
        bounded("flush", inner.config.command_timeout, inner.flush()).await
    }

    async fn close_channel(&self, channel: &str) -> Result<(), LayerError> {
        validate_channel_name(channel)?;
        let inner = &self.inner;
        let groups = {
            let mut state = inner.lock();
            match state.buffers.get(channel) {
                None => return Ok(()),
                Some(buffer) if buffer.is_waited_on() => return Ok(()),
                Some(_) => {}
            }
            inner.close(&mut state, channel);
            state.memberships.remove(channel).unwrap_or_default()
        };
        for group in groups {
            self.group_discard(&group, channel).await?;
        }
        Ok(())
    }

    /// Memberships lapse after `group_expiry`: the runner renews them.
    fn group_expiry(&self) -> Option<Duration> {
        Some(self.inner.config.group_expiry)
    }
}
