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
//! As in Python, `group_add` takes only a channel this process holds (made
//! by `new_channel`, or received on here): a membership is a local buffer's,
//! and a channel held elsewhere would get a buffer nobody reads or frees.
//!
//! Per host there is one RESP3 connection, which both publishes and
//! receives (push messages), in one object with its subscriptions
//! (`host.rs`). Its reader hands each message to the local buffers
//! (`buffers.rs`) as it reads it, in order with the replies, one copy
//! shared by every local member of a group; `receive` waits only on its
//! buffer, so a cancelled `receive` neither loses a message nor (unlike
//! Python's) drops the subscription. Subscription changes to one host go
//! out in batches, so a storm of joins costs a few round trips. When the
//! connection is lost, calls fail at once with [`LayerError::Backend`] and a
//! supervisor reconnects; then every live channel and group is subscribed
//! again, so messages flow again without a restart, and
//! [`RedisPubSubLayer::reconnected`] tells the application. What was
//! published meanwhile is lost: that is what pub/sub means. A slow reply
//! alone does not replace the connection (`link.rs`).
//!
//! On a Redis Cluster ([`RedisPubSubLayer::connect_cluster`]) the same
//! local state is kept in step with sharded subscriptions instead, by
//! `cluster/subscriber.rs`; only [`Transport`] tells the two apart.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, MutexGuard};

use async_trait::async_trait;
use redis::{Msg, PushInfo, PushKind};
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::bounded;
use super::cluster::{self, ClusterSubscriber};
use super::codec::{self, Route};
use super::config::RedisConfig;
use super::host::{Interest, SubscribedHost};
use super::link::{Link, RECONNECTED_BACKLOG, Reconnected};
use super::wire::{Version, consistent_hash, group_channel, pubsub_channel_name};
use crate::layer::buffers::{Entry, HoldsBuffers, LocalBuffers, Locked, Receiver, WhenFull};
use crate::layer::{
    ChannelLayer, LayerError, LayerMessage, NameKind, validate_channel_name, validate_group_name,
};

/// The publish/subscribe layer on Redis: fast, nothing stored, group
/// memberships local to this process. See [the module
/// documentation](super) for when to choose it.
pub struct RedisPubSubLayer {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    transport: Transport,
    reconnected: broadcast::Sender<Reconnected>,
}

/// Where the subscriptions live: independent hosts (one, or several picked
/// by consistent hash), or one Redis Cluster (sharded pub/sub).
enum Transport {
    Hosts(Vec<Arc<SubscribedHost>>),
    Cluster(Arc<ClusterSubscriber>),
}

/// What the connections' readers need too (they exist before the links).
struct Shared {
    config: RedisConfig,
    state: Locked<State>,
}

struct State {
    /// Local channels' buffers. Nothing can tell a publisher that one is
    /// full, so a full buffer drops its oldest message.
    buffers: LocalBuffers,
    /// Redis group channel (`{prefix}__group__{group}`) → its local members.
    groups: HashMap<String, Group>,
    /// Local channel → the Redis group channels it is a member of: the
    /// reverse of `groups`, so closing a channel touches its own groups
    /// only. (It used to scan every group, under the lock the reader needs
    /// for every push: 16,200 departures from 1,800 rooms were 29 million
    /// steps, which starved the connections and timed calls out.)
    memberships: HashMap<String, HashSet<String>>,
}

impl Default for State {
    fn default() -> Self {
        State {
            buffers: LocalBuffers::new(WhenFull::DropOldest),
            groups: HashMap::new(),
            memberships: HashMap::new(),
        }
    }
}

impl State {
    /// Makes `channel` a member of the group channel `group`; true if it
    /// was not one yet.
    fn join(&mut self, group: &str, channel: &str) -> bool {
        self.memberships
            .entry(channel.to_owned())
            .or_default()
            .insert(group.to_owned());
        self.groups
            .entry(group.to_owned())
            .or_default()
            .members
            .insert(channel.to_owned())
    }

    /// Takes `channel` out of the group channel `group`; true if that left
    /// the group empty (it is forgotten then).
    fn leave(&mut self, group: &str, channel: &str) -> bool {
        if let Some(groups) = self.memberships.get_mut(channel) {
            groups.remove(group);
            if groups.is_empty() {
                self.memberships.remove(channel);
            }
        }
        let Some(entry) = self.groups.get_mut(group) else {
            return false;
        };
        entry.members.remove(channel);
        let emptied = entry.members.is_empty();
        if emptied {
            self.groups.remove(group);
        }
        emptied
    }

    /// Takes `channel` out of every group it is in; returns the groups
    /// that left empty.
    fn leave_all(&mut self, channel: &str) -> Vec<String> {
        let groups = self.memberships.remove(channel).unwrap_or_default();
        groups
            .into_iter()
            .filter(|group| self.leave(group, channel))
            .collect()
    }
}

impl HoldsBuffers for State {
    type Extra = ();

    fn buffers(&mut self) -> &mut LocalBuffers {
        &mut self.buffers
    }
}

#[derive(Default)]
struct Group {
    members: HashSet<String>,
}

impl Shared {
    /// The names this process must be subscribed to (its channels, and the
    /// groups with a member here) that `keep` accepts.
    fn wanted_where(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let state = self.lock();
        state
            .buffers
            .channels()
            .chain(
                state
                    .groups
                    .iter()
                    .filter(|(_, group)| !group.members.is_empty())
                    .map(|(name, _)| name.as_str()),
            )
            .filter(|name| keep(name))
            .map(str::to_owned)
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    fn shard(&self, name: &str) -> usize {
        consistent_hash(name, self.config.hosts.len())
    }

    /// A push from a connection's reader: hands a published message to its
    /// channel, or to every local member of its group.
    fn on_push(&self, info: PushInfo) {
        // `SMessage`: a sharded message, on a cluster.
        if info.kind != PushKind::Message && info.kind != PushKind::SMessage {
            return;
        }
        let Some(msg) = Msg::from_push_info(info) else {
            return;
        };
        let name = msg.get_channel_name();
        let payload = msg.get_payload_bytes();
        let Some(decoded) = codec::read(payload, false, self.config.max_message_size, name) else {
            return;
        };
        // One copy, shared by every local member of a group.
        let message = Arc::new(decoded.message);
        let now = Instant::now();
        let mut state = self.lock();
        let state = &mut *state;
        // A full buffer makes room by dropping its oldest message, so a
        // push is never refused here.
        if let Some(buffer) = state.buffers.get_mut(name) {
            let _ = buffer.push(name, Entry::new(message, None), now);
        } else if let Some(group) = state.groups.get(name) {
            for member in &group.members {
                if let Some(buffer) = state.buffers.get_mut(member) {
                    let _ = buffer.push(member, Entry::new(Arc::clone(&message), None), now);
                }
            }
        }
    }
}

/// What should be subscribed: a local channel (it has a buffer), and a
/// group channel with local members.
impl Interest for Shared {
    fn wants(&self, name: &str) -> bool {
        let state = self.lock();
        state.buffers.contains(name)
            || state
                .groups
                .get(name)
                .is_some_and(|group| !group.members.is_empty())
    }

    fn wanted_on(&self, shard: usize) -> Vec<String> {
        self.wanted_where(|name| self.shard(name) == shard)
    }

    fn wanted_all(&self) -> Vec<String> {
        self.wanted_where(|_| true)
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
            config,
            state: Locked::default(),
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
        let interest: std::sync::Weak<dyn Interest> =
            Arc::downgrade(&shared) as std::sync::Weak<Shared>;
        let (reconnected, _) = broadcast::channel(RECONNECTED_BACKLOG);
        let mut hosts = Vec::with_capacity(links.len());
        for (shard, link) in links.into_iter().enumerate() {
            let host = SubscribedHost::start(Arc::clone(&link), shard, interest.clone());
            let weak = Arc::downgrade(&host);
            link.supervise_announcing(
                Arc::new(move |conn| {
                    let weak = weak.clone();
                    Box::pin(async move {
                        match weak.upgrade() {
                            Some(host) => host.resubscribe(conn).await,
                            None => Ok(()),
                        }
                    })
                }),
                reconnected.clone(),
            );
            hosts.push(host);
        }
        Ok(RedisPubSubLayer {
            inner: Arc::new(Inner {
                shared,
                transport: Transport::Hosts(hosts),
                reconnected,
            }),
        })
    }

    /// Connects to the Redis Cluster whose nodes (some or all of them) are
    /// `config.hosts`, and uses sharded pub/sub (`SSUBSCRIBE`,
    /// `SPUBLISH`): each channel and group lives on the master that owns
    /// its slot, and the layer follows it when the slot moves or the
    /// master fails over (what was published in between is lost, and
    /// [`reconnected`](Self::reconnected) says so). Needs Redis 7.0 or
    /// newer. The names on the wire are the same as on one Redis, but a
    /// Python peer cannot join: channels_redis has no sharded pub/sub.
    pub async fn connect_cluster(config: RedisConfig) -> Result<Self, LayerError> {
        config.validate()?;
        let shared = Arc::new(Shared {
            config,
            state: Locked::default(),
        });
        let (lost, lost_receiver) = tokio::sync::mpsc::unbounded_channel();
        let reader = Arc::downgrade(&shared);
        let control = lost.clone();
        // Called by redis-rs's push task for every push of every node.
        let pushes = move |info: PushInfo| -> Result<(), ()> {
            if !ClusterSubscriber::on_control_push(&info, &control)
                && let Some(shared) = reader.upgrade()
            {
                shared.on_push(info);
            }
            Ok(())
        };
        let because = "sharded pub/sub, SSUBSCRIBE and SPUBLISH, came with 7.0";
        let within = shared.config.command_timeout;
        let client = cluster::client(&shared.config, Some(pushes))?;
        let subscriber =
            cluster::connect(client, Version(7, 0), because, "pub/sub subscriber", within)
                .await?
                .0;
        let client = cluster::client(&shared.config, None::<fn(PushInfo) -> Result<(), ()>>)?;
        let publisher =
            cluster::connect(client, Version(7, 0), because, "pub/sub publisher", within)
                .await?
                .0;
        let direct = cluster::Direct::new(&shared.config)?;
        direct.refresh().await;
        let interest: std::sync::Weak<dyn Interest> =
            Arc::downgrade(&shared) as std::sync::Weak<Shared>;
        let (reconnected, _) = broadcast::channel(RECONNECTED_BACKLOG);
        let subscriber = ClusterSubscriber::start(
            subscriber,
            publisher,
            direct,
            interest,
            reconnected.clone(),
            (lost, lost_receiver),
            &shared.config.prefix,
        );
        Ok(RedisPubSubLayer {
            inner: Arc::new(Inner {
                shared,
                transport: Transport::Cluster(subscriber),
                reconnected,
            }),
        })
    }

    /// The configuration this layer runs with.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.shared.config
    }

    /// How many local channels have a buffer here right now: for tests and
    /// for watching memory.
    pub fn local_channels(&self) -> usize {
        self.inner.shared.lock().buffers.len()
    }

    /// Events for each time a lost Redis host came back and every live
    /// channel and group was subscribed again on it. Messages published
    /// to this process in between were lost, so an application may use
    /// this to fetch what it missed (a room's state, say).
    ///
    /// A `tokio::sync::broadcast` receiver: every receiver gets every event
    /// sent after it was made. One that falls more than 64 events behind
    /// gets `RecvError::Lagged` next, which still means "reconnected at
    /// least once"; events nobody listens to cost nothing. A broadcast
    /// rather than a `watch` of a counter, so that each event says which
    /// host and for how long.
    pub fn reconnected(&self) -> broadcast::Receiver<Reconnected> {
        self.inner.reconnected.subscribe()
    }

    /// A fault for tests, not part of the API: drops the connection to
    /// every host from the layer as a failed `PING` probe would, without
    /// closing it, so it lingers (as when clones of it are still in
    /// flight) while the supervisor reconnects and subscribes again.
    #[doc(hidden)]
    pub fn force_reconnect(&self) {
        let hosts = match &self.inner.transport {
            Transport::Hosts(hosts) => hosts,
            Transport::Cluster(cluster) => return cluster.force_resubscribe(),
        };
        for host in hosts {
            if let Some(lingering) = host.link().abandon("forced by a test") {
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    drop(lingering);
                });
            }
        }
    }

    /// One receive on `channel`, subscribing it first if it is new here:
    /// what `receive` and `receive_shared` wait on.
    async fn next_entry(&self, channel: &str) -> Result<Entry, LayerError> {
        let inner = &self.inner;
        let shared = inner.shared();
        let receiver = {
            let mut state = shared.lock();
            let buffer = state.buffers.try_open(channel, || {
                validate_channel_name(channel)?;
                Ok::<_, LayerError>(shared.config.capacity_of(channel))
            })?;
            Receiver::new(&shared.state, channel, buffer)
        };
        // A name first seen here is subscribed now. If that fails, the
        // supervisor subscribes it with everything else once it reconnects;
        // either way this receive waits, since a consumer must not lose its
        // channel over a passing outage.
        if inner.should_subscribe(channel) {
            let result = bounded("subscribe", inner.timeout(), inner.sync_one(channel));
            if let Err(err) = result.await {
                tracing::debug!(channel, %err, "subscribing failed; retried after reconnecting");
            }
        }
        Ok(receiver.next().await)
    }
}

impl Drop for RedisPubSubLayer {
    fn drop(&mut self) {
        // A cluster's connections close when the last clone is dropped.
        if let Transport::Hosts(hosts) = &self.inner.transport {
            for host in hosts {
                host.link().close();
            }
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

    fn host<'a>(&self, hosts: &'a [Arc<SubscribedHost>], name: &str) -> &'a SubscribedHost {
        &hosts[self.shared.shard(name)]
    }

    /// Brings one name's subscription in step, in its host's next batch.
    async fn sync_one(&self, name: &str) -> Result<(), LayerError> {
        match &self.transport {
            Transport::Hosts(hosts) => self.host(hosts, name).sync(name).await,
            Transport::Cluster(cluster) => cluster.sync(name).await,
        }
    }

    /// [`sync_one`](Self::sync_one) without waiting, for a `Drop`.
    fn nudge(&self, name: &str) {
        match &self.transport {
            Transport::Hosts(hosts) => self.host(hosts, name).nudge(name),
            Transport::Cluster(cluster) => cluster.nudge(name),
        }
    }

    /// Whether `receive` should subscribe `name` now: it is not, and its
    /// connection is up (else the reconnection will).
    fn should_subscribe(&self, name: &str) -> bool {
        match &self.transport {
            Transport::Hosts(hosts) => {
                let host = self.host(hosts, name);
                !host.is_subscribed(name) && host.link().is_up()
            }
            Transport::Cluster(cluster) => !cluster.is_subscribed(name),
        }
    }

    /// Publishes `message` on the Redis channel `name`, on the host its
    /// hash picks; returns how many subscribers got it (processes, not
    /// consumers).
    async fn publish(
        &self,
        call: &'static str,
        name: &str,
        message: &LayerMessage,
    ) -> Result<u64, LayerError> {
        let config = &self.shared.config;
        let payload = codec::encode(message, Route::None, false, config.max_message_size)?;
        let hosts = match &self.transport {
            Transport::Hosts(hosts) => hosts,
            Transport::Cluster(cluster) => {
                let within = self.timeout();
                let result = bounded(call, within, cluster.publish(name, payload, within)).await;
                cluster.outage.observe(&result);
                return result;
            }
        };
        let shard = self.shared.shard(name);
        bounded(call, self.timeout(), async {
            hosts[shard]
                .link()
                .run(|mut conn| async move {
                    redis::cmd("PUBLISH")
                        .arg(name)
                        .arg(payload)
                        .query_async::<u64>(&mut conn)
                        .await
                })
                .await
        })
        .await
    }

    /// Brings the subscriptions of `names` in step with the local state
    /// (see `host.rs`): all of them in the batches of their hosts.
    async fn sync(&self, names: &[&str]) -> Result<(), LayerError> {
        let synced =
            futures_util::future::join_all(names.iter().map(|name| self.sync_one(name))).await;
        synced.into_iter().collect()
    }
}

/// Forgets a channel `new_channel` could not finish making.
struct Unmade<'a> {
    inner: &'a Inner,
    channel: Option<&'a str>,
}

impl Drop for Unmade<'_> {
    fn drop(&mut self) {
        if let Some(channel) = self.channel {
            self.inner.shared.lock().buffers.remove(channel);
            // Its batch may still subscribe it; the next one undoes that.
            self.inner.nudge(channel);
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
        let shared = inner.shared();
        shared
            .lock()
            .buffers
            .open(&name, || shared.config.capacity_of(&name));
        // Removes the channel again unless the subscription succeeds, also
        // when this future is dropped half-way.
        let mut unmade = Unmade {
            inner,
            channel: Some(&name),
        };
        bounded("new_channel", inner.timeout(), inner.sync(&[&name])).await?;
        unmade.channel = None;
        drop(unmade);
        Ok(name)
    }

    async fn send(&self, channel: &str, message: LayerMessage) -> Result<(), LayerError> {
        validate_channel_name(channel)?;
        let receivers = self.inner.publish("send", channel, &message).await?;
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
        Ok(self.next_entry(channel).await?.into_message())
    }

    async fn receive_shared(&self, channel: &str) -> Result<Arc<LayerMessage>, LayerError> {
        Ok(self.next_entry(channel).await?.into_shared())
    }

    fn try_receive(&self, channel: &str) -> Option<Arc<LayerMessage>> {
        let shared = self.inner.shared();
        let mut state = shared.lock();
        let buffer = state.buffers.get_mut(channel)?;
        Some(buffer.take_ready(Instant::now())?.into_shared())
    }

    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        validate_group_name(group)?;
        validate_channel_name(channel)?;
        let inner = &self.inner;
        let shared = inner.shared();
        let name = group_channel(&shared.config.prefix, group);
        let new_member = {
            let mut state = shared.lock();
            if !state.buffers.contains(channel) {
                return Err(LayerError::NotLocal {
                    channel: channel.to_owned(),
                    group: group.to_owned(),
                });
            }
            state.join(&name, channel)
        };
        let joined = bounded("group_add", inner.timeout(), inner.sync(&[channel, &name])).await;
        if joined.is_err() {
            // Undo what this call added, so a failed join leaves nothing.
            let mut state = shared.lock();
            if new_member && state.leave(&name, channel) {
                drop(state);
                inner.nudge(&name);
            }
        }
        joined
    }

    async fn group_discard(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        validate_group_name(group)?;
        validate_channel_name(channel)?;
        let inner = &self.inner;
        let name = group_channel(&inner.shared().config.prefix, group);
        let emptied = inner.shared().lock().leave(&name, channel);
        if !emptied {
            return Ok(());
        }
        bounded("group_discard", inner.timeout(), inner.sync(&[&name])).await
    }

    async fn group_send(&self, group: &str, message: LayerMessage) -> Result<(), LayerError> {
        validate_group_name(group)?;
        let name = group_channel(&self.inner.shared().config.prefix, group);
        self.inner.publish("group_send", &name, &message).await?;
        Ok(())
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
            let barrier = match &inner.transport {
                Transport::Hosts(hosts) => {
                    let links = hosts.iter().map(|host| host.link());
                    let pings = links.filter(|link| link.is_up()).map(|link| {
                        link.run(|mut conn| async move {
                            redis::cmd("PING").query_async::<()>(&mut conn).await
                        })
                    });
                    futures_util::future::join_all(pings).await
                }
                Transport::Cluster(cluster) => vec![cluster.ping(inner.timeout()).await],
            };
            let groups: Vec<String> = {
                let mut state = inner.shared().lock();
                for (_, buffer) in state.buffers.iter_mut() {
                    buffer.clear();
                }
                state.memberships.clear();
                state.groups.drain().map(|(name, _)| name).collect()
            };
            let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
            inner.sync(&groups).await?;
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
            match state.buffers.get(channel) {
                None => return Ok(()),
                Some(buffer) if buffer.is_waited_on() => return Ok(()), // still received on
                Some(_) => {}
            }
            state.buffers.remove(channel);
            state.leave_all(channel)
        };
        let mut names = vec![channel];
        names.extend(emptied.iter().map(String::as_str));
        bounded("close_channel", inner.timeout(), inner.sync(&names)).await
    }
}
