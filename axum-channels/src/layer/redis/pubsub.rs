//! [`RedisPubSubLayer`]: the publish/subscribe layer. A message goes straight
//! to whoever is subscribed at that moment and is never stored, so it is
//! fast and keeps no state in Redis, and what is sent while nobody listens
//! (or while Redis is away) is gone.
//!
//! The Redis channel names and payloads are the Python layer's
//! (`RedisPubSubChannelLayer`): a channel is the Redis channel of its name, a
//! group is the Redis channel `{prefix}__group__{group}`, and a payload is a
//! bare msgpack map. Group memberships live in this process only: it
//! subscribes once to each group one of its channels is in, and hands every
//! group message to each local member.
//!
//! Per host there is one RESP3 connection, which both publishes and
//! receives (push messages). Its reader hands each message to the local
//! buffers as it reads it, in order with the replies, and `receive` waits
//! only on its buffer, so a cancelled `receive` neither loses a message nor
//! (unlike Python's) drops the subscription. When the connection is lost,
//! calls fail at once with [`LayerError::Backend`] and a supervisor
//! reconnects; then every live channel and group is subscribed again, so
//! messages flow again without a restart. What was published meanwhile is
//! lost: that is what pub/sub means.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::{Msg, PushInfo, PushKind, RedisError};

use super::bounded;
use super::codec::{self, Route};
use super::config::RedisConfig;
use super::inbox::{Entry, Inbox};
use super::link::Link;
use super::wire::{Version, consistent_hash, group_channel, pubsub_channel_name};
use crate::layer::{
    ChannelLayer, LayerError, LayerMessage, NameKind, validate_channel_name, validate_group_name,
};

/// How many names one `SUBSCRIBE` carries when subscribing again after a
/// reconnection.
const SUBSCRIBE_BATCH: usize = 1000;

/// The publish/subscribe layer on Redis: fast, nothing stored, group
/// memberships local to this process. See [the module
/// documentation](super) for when to choose it.
pub struct RedisPubSubLayer {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    links: Vec<Arc<Link>>,
}

/// What the connections' readers need too (they exist before the links).
struct Shared {
    config: RedisConfig,
    state: Mutex<State>,
    /// One per host: subscription changes on a host happen one at a time,
    /// each after reading the local state afresh, so what Redis has always
    /// ends up matching what the state says.
    subscribing: Vec<tokio::sync::Mutex<()>>,
}

#[derive(Default)]
struct State {
    channels: HashMap<String, Local>,
    /// Redis group channel (`{prefix}__group__{group}`) → its local members.
    groups: HashMap<String, Group>,
}

struct Local {
    inbox: Inbox,
    /// Subscribed on the current connection (rechecked after reconnecting).
    subscribed: bool,
}

#[derive(Default)]
struct Group {
    members: HashSet<String>,
    subscribed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Updates leave the maps consistent, so a poisoned lock is usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn shard(&self, name: &str) -> usize {
        consistent_hash(name, self.subscribing.len())
    }

    fn local(&self, channel: &str) -> Local {
        Local {
            inbox: Inbox::new(self.config.capacity_of(channel)),
            subscribed: false,
        }
    }

    /// A push from a connection's reader: hands a published message to its
    /// channel, or to every local member of its group.
    fn on_push(&self, info: PushInfo) {
        if info.kind != PushKind::Message {
            return;
        }
        let Some(msg) = Msg::from_push_info(info) else {
            return;
        };
        let name = msg.get_channel_name();
        let payload = msg.get_payload_bytes();
        if payload.len() > self.config.max_message_size {
            metrics::counter!("axum_channels_layer_unreadable_total").increment(1);
            tracing::warn!(
                channel = name,
                size = payload.len(),
                limit = self.config.max_message_size,
                "dropped a message larger than max_message_size"
            );
            return;
        }
        let message = match codec::decode(payload, false) {
            Ok(decoded) => decoded.message,
            Err(why) => {
                metrics::counter!("axum_channels_layer_unreadable_total").increment(1);
                tracing::warn!(channel = name, %why, "dropped a message this layer cannot read");
                return;
            }
        };
        let mut state = self.lock();
        let state = &mut *state;
        if let Some(local) = state.channels.get_mut(name) {
            local.inbox.push(name, plain_entry(message));
        } else if let Some(group) = state.groups.get(name) {
            for member in &group.members {
                if let Some(local) = state.channels.get_mut(member) {
                    local.inbox.push(member, plain_entry(message.clone()));
                }
            }
        }
    }

    /// After a reconnection to host `shard`: subscribes again to every live
    /// channel and group that lives there.
    async fn resubscribe(
        &self,
        shard: usize,
        mut conn: MultiplexedConnection,
    ) -> Result<(), RedisError> {
        let _one_at_a_time = self.subscribing[shard].lock().await;
        let names: Vec<String> = {
            let state = self.lock();
            state
                .channels
                .keys()
                .chain(
                    state
                        .groups
                        .iter()
                        .filter(|(_, group)| !group.members.is_empty())
                        .map(|(name, _)| name),
                )
                .filter(|name| self.shard(name) == shard)
                .cloned()
                .collect()
        };
        for batch in names.chunks(SUBSCRIBE_BATCH) {
            conn.subscribe(batch).await?;
        }
        let mut state = self.lock();
        for name in &names {
            if let Some(local) = state.channels.get_mut(name) {
                local.subscribed = true;
            }
            if let Some(group) = state.groups.get_mut(name) {
                group.subscribed = true;
            }
        }
        tracing::debug!(
            subscriptions = names.len(),
            "subscribed again to every live channel and group"
        );
        Ok(())
    }
}

fn plain_entry(message: LayerMessage) -> Entry {
    Entry {
        message,
        sent_at: None,
        raw: None,
    }
}

impl RedisPubSubLayer {
    /// Connects to every host of `config` and checks that each runs Redis
    /// 6.0 or newer (RESP3, which lets one connection both publish and
    /// receive). Fails with [`LayerError::Backend`] and a one-line reason
    /// when a host is unreachable, too old, or the configuration is invalid.
    pub async fn connect(config: RedisConfig) -> Result<Self, LayerError> {
        config.validate()?;
        let shared = Arc::new(Shared {
            subscribing: config
                .hosts
                .iter()
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            config,
            state: Mutex::default(),
        });
        let mut links = Vec::with_capacity(shared.config.hosts.len());
        for url in &shared.config.hosts {
            let reader = Arc::downgrade(&shared);
            let link = Link::connect(
                url,
                Version(5, 0),
                "nothing older is supported",
                true,
                shared.config.command_timeout,
                Some(Arc::new(move |info| {
                    if let Some(shared) = reader.upgrade() {
                        shared.on_push(info);
                    }
                })),
            )
            .await?;
            links.push(link);
        }
        for (shard, link) in links.iter().enumerate() {
            let shared = Arc::downgrade(&shared);
            link.supervise(Arc::new(move |conn| {
                let shared = shared.clone();
                Box::pin(async move {
                    match shared.upgrade() {
                        Some(shared) => shared.resubscribe(shard, conn).await,
                        None => Ok(()),
                    }
                })
            }));
        }
        Ok(RedisPubSubLayer {
            inner: Arc::new(Inner { shared, links }),
        })
    }

    /// The configuration this layer runs with.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.shared.config
    }

    /// How many local channels have a buffer here right now: for tests and
    /// for watching memory.
    pub fn local_channels(&self) -> usize {
        self.inner.shared.lock().channels.len()
    }
}

impl Drop for RedisPubSubLayer {
    fn drop(&mut self) {
        for link in &self.inner.links {
            link.close();
        }
    }
}

impl Inner {
    fn shared(&self) -> &Shared {
        &self.shared
    }

    fn timeout(&self) -> std::time::Duration {
        self.shared.config.command_timeout
    }

    /// Subscribes to a local channel unless it is already, or gone.
    async fn subscribe_channel(&self, name: &str) -> Result<(), LayerError> {
        let shard = self.shared.shard(name);
        let _one_at_a_time = self.shared.subscribing[shard].lock().await;
        let needed = self
            .shared
            .lock()
            .channels
            .get(name)
            .is_some_and(|local| !local.subscribed);
        if !needed {
            return Ok(());
        }
        self.links[shard]
            .run(|mut conn| async move { conn.subscribe(name).await })
            .await?;
        if let Some(local) = self.shared.lock().channels.get_mut(name) {
            local.subscribed = true;
        }
        Ok(())
    }

    /// Subscribes to a group channel with local members, unless it is
    /// already.
    async fn subscribe_group(&self, name: &str) -> Result<(), LayerError> {
        let shard = self.shared.shard(name);
        let _one_at_a_time = self.shared.subscribing[shard].lock().await;
        let needed = self
            .shared
            .lock()
            .groups
            .get(name)
            .is_some_and(|group| !group.members.is_empty() && !group.subscribed);
        if !needed {
            return Ok(());
        }
        self.links[shard]
            .run(|mut conn| async move { conn.subscribe(name).await })
            .await?;
        if let Some(group) = self.shared.lock().groups.get_mut(name) {
            group.subscribed = true;
        }
        Ok(())
    }

    /// Unsubscribes from a channel or group channel that is no longer local.
    /// Nothing to do while the host is down: a new connection subscribes
    /// only to what is live.
    async fn unsubscribe(&self, name: &str) -> Result<(), LayerError> {
        let shard = self.shared.shard(name);
        let _one_at_a_time = self.shared.subscribing[shard].lock().await;
        {
            let state = self.shared.lock();
            if state.channels.contains_key(name) || state.groups.contains_key(name) {
                return Ok(()); // made local again meanwhile
            }
        }
        if !self.links[shard].is_up() {
            return Ok(());
        }
        self.links[shard]
            .run(|mut conn| async move { conn.unsubscribe(name).await })
            .await
    }
}

/// Forgets a channel `new_channel` could not finish making.
struct Unmade<'a> {
    shared: &'a Shared,
    channel: Option<&'a str>,
}

impl Drop for Unmade<'_> {
    fn drop(&mut self) {
        if let Some(channel) = self.channel {
            self.shared.lock().channels.remove(channel);
        }
    }
}

/// Counts a receiver as waiting for as long as it lives.
struct Waiting<'a> {
    shared: &'a Shared,
    channel: &'a str,
    armed: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.armed
            && let Some(local) = self.shared.lock().channels.get_mut(self.channel)
        {
            local.inbox.waiting = local.inbox.waiting.saturating_sub(1);
        }
    }
}

#[async_trait]
impl ChannelLayer for RedisPubSubLayer {
    async fn new_channel(&self, prefix: &str) -> Result<String, LayerError> {
        let inner = &self.inner;
        let name = pubsub_channel_name(&inner.shared().config.prefix, prefix);
        validate_channel_name(&name)?;
        if prefix.contains('!') {
            // Valid as a name, but the `!` would mean "process-specific" to
            // a reader that follows Django's rules; refused as elsewhere.
            return Err(LayerError::InvalidName {
                kind: NameKind::Channel,
                name,
            });
        }
        let local = inner.shared().local(&name);
        inner.shared().lock().channels.insert(name.clone(), local);
        // Removes the channel again unless the subscription succeeds, also
        // when this future is dropped half-way.
        let mut unmade = Unmade {
            shared: inner.shared(),
            channel: Some(&name),
        };
        bounded(
            "new_channel",
            inner.timeout(),
            inner.subscribe_channel(&name),
        )
        .await?;
        unmade.channel = None;
        drop(unmade);
        Ok(name)
    }

    async fn send(&self, channel: &str, message: LayerMessage) -> Result<(), LayerError> {
        validate_channel_name(channel)?;
        let inner = &self.inner;
        let payload = codec::encode(
            &message,
            Route::None,
            false,
            inner.shared().config.max_message_size,
        )?;
        let shard = inner.shared().shard(channel);
        let receivers = bounded("send", inner.timeout(), async {
            inner.links[shard]
                .run(|mut conn| async move {
                    redis::cmd("PUBLISH")
                        .arg(channel)
                        .arg(payload)
                        .query_async::<u64>(&mut conn)
                        .await
                })
                .await
        })
        .await?;
        if receivers == 0 {
            // Pub/sub keeps nothing: e.g. a job's result for a client that
            // left before it was done. Worth a line when debugging.
            tracing::debug!(
                channel,
                "nobody listens on this channel; the message is gone"
            );
        }
        Ok(())
    }

    async fn receive(&self, channel: &str) -> Result<LayerMessage, LayerError> {
        validate_channel_name(channel)?;
        let inner = &self.inner;
        let shared = inner.shared();
        let (arrived, subscribed) = {
            let mut state = shared.lock();
            let local = state
                .channels
                .entry(channel.to_owned())
                .or_insert_with(|| shared.local(channel));
            local.inbox.waiting += 1;
            (Arc::clone(&local.inbox.arrived), local.subscribed)
        };
        let mut waiting = Waiting {
            shared,
            channel,
            armed: true,
        };
        // A name first seen here is subscribed now. If that fails, the
        // supervisor subscribes it with everything else once it reconnects;
        // either way this receive waits, since a consumer must not lose its
        // channel over a passing outage.
        if !subscribed && inner.links[shared.shard(channel)].is_up() {
            let result = bounded(
                "subscribe",
                inner.timeout(),
                inner.subscribe_channel(channel),
            );
            if let Err(err) = result.await {
                tracing::debug!(channel, %err, "subscribing failed; retried after reconnecting");
            }
        }
        loop {
            let notified = arrived.notified();
            {
                let mut state = shared.lock();
                if let Some(local) = state.channels.get_mut(channel)
                    && let Some(entry) = local.inbox.take(0.0, None)
                {
                    local.inbox.waiting = local.inbox.waiting.saturating_sub(1);
                    waiting.armed = false;
                    return Ok(entry.message);
                }
            }
            notified.await;
        }
    }

    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        validate_group_name(group)?;
        validate_channel_name(channel)?;
        let inner = &self.inner;
        let shared = inner.shared();
        let name = group_channel(&shared.config.prefix, group);
        // A channel this process does not hold yet becomes local, so its
        // group messages have somewhere to wait (Python refuses instead).
        let (new_channel, new_member) = {
            let mut state = shared.lock();
            let new_channel = !state.channels.contains_key(channel);
            if new_channel {
                let local = shared.local(channel);
                state.channels.insert(channel.to_owned(), local);
            }
            let new_member = state
                .groups
                .entry(name.clone())
                .or_default()
                .members
                .insert(channel.to_owned());
            (new_channel, new_member)
        };
        let joined = bounded("group_add", inner.timeout(), async {
            inner.subscribe_channel(channel).await?;
            inner.subscribe_group(&name).await
        })
        .await;
        if joined.is_err() {
            // Undo what this call added, so a failed join leaves nothing.
            let mut state = shared.lock();
            if new_member && let Some(entry) = state.groups.get_mut(&name) {
                entry.members.remove(channel);
                if entry.members.is_empty() {
                    state.groups.remove(&name);
                }
            }
            if new_channel
                && state
                    .channels
                    .get(channel)
                    .is_some_and(|local| local.inbox.waiting == 0)
            {
                state.channels.remove(channel);
            }
        }
        joined
    }

    async fn group_discard(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        validate_group_name(group)?;
        validate_channel_name(channel)?;
        let inner = &self.inner;
        let name = group_channel(&inner.shared().config.prefix, group);
        let emptied = {
            let mut state = inner.shared().lock();
            match state.groups.get_mut(&name) {
                Some(entry) => {
                    entry.members.remove(channel);
                    let empty = entry.members.is_empty();
                    if empty {
                        state.groups.remove(&name);
                    }
                    empty
                }
                None => false,
            }
        };
        if !emptied {
            return Ok(());
        }
        bounded("group_discard", inner.timeout(), inner.unsubscribe(&name)).await
    }

    async fn group_send(&self, group: &str, message: LayerMessage) -> Result<(), LayerError> {
        validate_group_name(group)?;
        let inner = &self.inner;
        let payload = codec::encode(
            &message,
            Route::None,
            false,
            inner.shared().config.max_message_size,
        )?;
        let name = group_channel(&inner.shared().config.prefix, group);
        let shard = inner.shared().shard(&name);
        bounded("group_send", inner.timeout(), async {
            inner.links[shard]
                .run(|mut conn| async move {
                    redis::cmd("PUBLISH")
                        .arg(&name)
                        .arg(payload)
                        .query_async::<()>(&mut conn)
                        .await
                })
                .await
        })
        .await
    }

    /// Leaves every group and empties every local buffer; channels stay
    /// subscribed, so receivers waiting across a flush still get what is
    /// sent afterwards. Redis holds nothing to delete.
    async fn flush(&self) -> Result<(), LayerError> {
        let inner = &self.inner;
        bounded("flush", inner.timeout(), async {
            // A round trip on each connection first: the reader hands over
            // pushes in order with replies, so every message that reached
            // this process before the flush is in a buffer by now, and is
            // dropped below rather than delivered after the flush.
            let pings = inner.links.iter().filter(|link| link.is_up()).map(|link| {
                link.run(
                    |mut conn| async move { redis::cmd("PING").query_async::<()>(&mut conn).await },
                )
            });
            let barrier = futures_util::future::join_all(pings).await;
            let groups: Vec<String> = {
                let mut state = inner.shared().lock();
                for local in state.channels.values_mut() {
                    local.inbox.queue.clear();
                }
                state.groups.drain().map(|(name, _)| name).collect()
            };
            for name in groups {
                inner.unsubscribe(&name).await?;
            }
            barrier
                .into_iter()
                .collect::<Result<Vec<()>, _>>()
                .map(drop)
        })
        .await
    }

    async fn close_channel(&self, channel: &str) -> Result<(), LayerError> {
        validate_channel_name(channel)?;
        let inner = &self.inner;
        let emptied: Vec<String> = {
            let mut state = inner.shared().lock();
            match state.channels.get(channel) {
                None => return Ok(()),
                Some(local) if local.inbox.waiting > 0 => return Ok(()), // still received on
                Some(_) => {}
            }
            state.channels.remove(channel);
            let mut emptied = Vec::new();
            state.groups.retain(|name, group| {
                group.members.remove(channel);
                let keep = !group.members.is_empty();
                if !keep {
                    emptied.push(name.clone());
                }
                keep
            });
            emptied
        };
        bounded("close_channel", inner.timeout(), async {
            inner.unsubscribe(channel).await?;
            for name in emptied {
                inner.unsubscribe(&name).await?;
            }
            Ok(())
        })
        .await
    }
}
