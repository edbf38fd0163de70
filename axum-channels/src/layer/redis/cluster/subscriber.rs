//! [`ClusterSubscriber`]: the pub/sub layer's subscriptions on a Redis
//! Cluster, with sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`, Redis 7): each
//! channel and group is subscribed on the master that owns its slot, so a
//! message crosses one node, not the whole cluster bus as `PUBLISH` does.
//!
//! Two cluster connections: one RESP3 connection that subscribes and
//! receives the pushes, and one that publishes. Publishing on the
//! subscribing connection would share its per-node sockets with the
//! subscription confirmations, and a confirmation the server sends on its
//! own (below) could then be taken for a command's reply.
//!
//! Following slots. When a slot leaves a master (resharding, or a
//! `CLUSTER FAILOVER`), Redis 7 ends every sharded subscription of that
//! slot with an `sunsubscribe` push; when a master dies, its connection
//! drops. redis-rs resubscribes what it tracks after it refreshes its slot
//! map, but it refreshes only when a command meets `MOVED` or a dead node,
//! and it forgets a channel on the server's `sunsubscribe` as if the layer
//! had asked for it. So this object listens for both pushes itself: after
//! a short settling time it subscribes again every name the layer still
//! wants (each `SSUBSCRIBE` that reaches the old owner is redirected with
//! `MOVED`, which refreshes the slot map), retrying with backoff until the
//! cluster serves the slot again, one log line per episode, and announces
//! a [`Reconnected`] event. What was published to those names in between
//! is lost, as on any pub/sub reconnection.
//!
//! Subscribing is one command per slot (Redis refuses an `SSUBSCRIBE`
//! whose channels are in different slots, and channel names are random,
//! so nearly every name has a slot of its own). Commands for one name are
//! kept in order by a lock striped by slot; different slots go out
//! concurrently, so a storm of joins is as many commands in flight.

use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use tokio::sync::{Mutex, broadcast, mpsc};
use tokio::time::Instant;

use super::{Outage, SETTLE, backend, retrying, slot};
use crate::layer::LayerError;
use crate::layer::buffers::Locked;
use crate::layer::episode::Episode;
use crate::layer::redis::host::Interest;
use crate::layer::redis::link::{BACKOFF_MIN, Reconnected, doubled};

/// Locks that keep each name's subscribe and unsubscribe in order.
const STRIPES: usize = 256;

/// What the push handler tells the resubscribing task.
pub(crate) enum Lost {
    /// The server ended this sharded subscription (its slot moved).
    Name(String),
    /// A node's connection dropped: its subscriptions are gone.
    Connection,
}

/// The pub/sub layer's subscriptions on a cluster (see the module doc).
pub(crate) struct ClusterSubscriber {
    subscriber: ClusterConnection,
    publisher: ClusterConnection,
    interest: Weak<dyn Interest>,
    /// Names this layer has subscribed (and not unsubscribed).
    subscribed: Locked<HashSet<String>>,
    stripes: Vec<Mutex<()>>,
    reconnected: broadcast::Sender<Reconnected>,
    generation: AtomicU64,
    /// For a test's forced resubscription.
    lost: mpsc::UnboundedSender<Lost>,
    /// One warning while the cluster refuses publishes, not one per call.
    pub(crate) outage: Outage,
}

impl ClusterSubscriber {
    /// The subscriber on connections already made, and its resubscribing
    /// task, which reads `lost` (fed by the push handler; it ends when the
    /// subscriber is dropped).
    pub(crate) fn start(
        subscriber: ClusterConnection,
        publisher: ClusterConnection,
        interest: Weak<dyn Interest>,
        reconnected: broadcast::Sender<Reconnected>,
        lost: (mpsc::UnboundedSender<Lost>, mpsc::UnboundedReceiver<Lost>),
        prefix: &str,
    ) -> Arc<Self> {
        let (sender, receiver) = lost;
        let this = Arc::new(ClusterSubscriber {
            subscriber,
            publisher,
            interest,
            subscribed: Locked::default(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            reconnected,
            generation: AtomicU64::new(0),
            lost: sender,
            outage: Outage::new("pub/sub", prefix),
        });
        tokio::spawn(follow(Arc::downgrade(&this), receiver));
        this
    }

    /// What the push handler does with a push that is not a message:
    /// reports a lost subscription to `lost`. True if it was one.
    pub(crate) fn on_control_push(info: &PushInfo, lost: &mpsc::UnboundedSender<Lost>) -> bool {
        match info.kind {
            PushKind::SUnsubscribe => {
                if let Some(Value::BulkString(name)) = info.data.first()
                    && let Ok(name) = String::from_utf8(name.clone())
                {
                    let _ = lost.send(Lost::Name(name));
                }
                true
            }
            PushKind::Disconnection => {
                let _ = lost.send(Lost::Connection);
                true
            }
            _ => false,
        }
    }

    pub(crate) fn is_subscribed(&self, name: &str) -> bool {
        self.subscribed.lock().contains(name)
    }

    /// Publishes on the sharded channel `name`; returns how many
    /// subscribers (processes) got it.
    /// A refusing cluster is retried for up to `within` (see [`retrying`]).
    pub(crate) async fn publish(
        &self,
        name: &str,
        payload: Vec<u8>,
        within: std::time::Duration,
    ) -> Result<u64, LayerError> {
        let command = redis::cmd("SPUBLISH").arg(name).arg(payload).to_owned();
        retrying(within, || {
            let mut conn = self.publisher.clone();
            let command = &command;
            async move { command.query_async::<u64>(&mut conn).await }
        })
        .await
        .map_err(|err| backend("SPUBLISH failed", err))
    }

    /// A round trip to any node: what `flush` waits for. Pushes come
    /// through redis-rs's push task, not in order with replies, so this
    /// is weaker than the single-host barrier (see `pubsub.rs`'s flush).
    pub(crate) async fn ping(&self) -> Result<(), LayerError> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.subscriber.clone())
            .await
            .map_err(|err| backend("PING failed", err))
    }

    fn stripe(&self, name: &str) -> &Mutex<()> {
        &self.stripes[usize::from(slot(name.as_bytes())) % STRIPES]
    }

    /// Brings `name`'s subscription in step with what the layer wants.
    pub(crate) async fn sync(&self, name: &str) -> Result<(), LayerError> {
        let Some(interest) = self.interest.upgrade() else {
            return Ok(());
        };
        let _ordered = self.stripe(name).lock().await;
        let wants = interest.wants(name);
        if wants == self.is_subscribed(name) {
            return Ok(());
        }
        let mut conn = self.subscriber.clone();
        if wants {
            if let Err(err) = conn.ssubscribe(name).await {
                // Retried with backoff by the resubscribing task for as
                // long as the layer still wants it (a `receive` keeps
                // waiting; a failed `new_channel` or `group_add` has undone
                // itself, so its name is skipped there).
                let _ = self.lost.send(Lost::Name(name.to_owned()));
                return Err(backend("SSUBSCRIBE failed", err));
            }
            self.subscribed.lock().insert(name.to_owned());
        } else {
            // Forgotten first: if the command fails, the name is not
            // wanted anyway, and a message still arriving finds no buffer.
            self.subscribed.lock().remove(name);
            conn.sunsubscribe(name)
                .await
                .map_err(|err| backend("SUNSUBSCRIBE failed", err))?;
        }
        Ok(())
    }

    /// [`sync`](Self::sync) without waiting, for cleanups in a `Drop`.
    pub(crate) fn nudge(self: &Arc<Self>, name: &str) {
        let this = Arc::clone(self);
        let name = name.to_owned();
        tokio::spawn(async move {
            let _ = this.sync(&name).await;
        });
    }

    /// A fault for tests: subscribes everything again, as after a lost
    /// connection.
    pub(crate) fn force_resubscribe(&self) {
        let _ = self.lost.send(Lost::Connection);
    }

    /// Subscribes `names` again (every wanted name if `None`), by slot,
    /// until each is subscribed or no longer wanted.
    async fn resubscribe(&self, names: Option<HashSet<String>>, episode: &mut Episode) {
        let started = Instant::now();
        let mut backoff = BACKOFF_MIN;
        let mut pending: HashSet<String> = match names {
            Some(names) => names,
            None => match self.interest.upgrade() {
                Some(interest) => interest.wanted_all().into_iter().collect(),
                None => return,
            },
        };
        if let Some(interest) = self.interest.upgrade() {
            pending.retain(|name| interest.wants(name));
        }
        // Only the confirmations of the layer's own unsubscriptions: nothing lost.
        if pending.is_empty() {
            return;
        }
        let count = pending.len();
        loop {
            let Some(interest) = self.interest.upgrade() else {
                return;
            };
            pending.retain(|name| interest.wants(name));
            drop(interest);
            if pending.is_empty() {
                break;
            }
            let mut by_slot: BTreeMap<u16, Vec<String>> = BTreeMap::new();
            for name in pending.drain() {
                by_slot.entry(slot(name.as_bytes())).or_default().push(name);
            }
            let attempts = by_slot.into_values().map(|names| async move {
                let mut conn = self.subscriber.clone();
                match conn.ssubscribe(&names).await {
                    Ok(()) => {
                        self.subscribed.lock().extend(names);
                        None
                    }
                    Err(err) => Some((names, err)),
                }
            });
            let failed: Vec<_> = futures_util::future::join_all(attempts)
                .await
                .into_iter()
                .flatten()
                .collect();
            let Some((_, first_error)) = failed.first() else {
                break;
            };
            if episode.start() {
                tracing::warn!(
                    error = %first_error,
                    "the Redis Cluster does not take the subscriptions back yet \
                     (a node failed or a slot moves); retrying until it does"
                );
            }
            for (names, _) in failed {
                pending.extend(names);
            }
            tokio::time::sleep(backoff).await;
            backoff = doubled(backoff);
        }
        let down_for = started.elapsed();
        if let Some(lasted) = episode.end() {
            tracing::info!(
                ?lasted,
                "the Redis Cluster serves every subscription of this layer again"
            );
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(
            subscriptions = count,
            ?down_for,
            "subscribed again on the cluster"
        );
        let _ = self.reconnected.send(Reconnected {
            host: "cluster".to_owned(),
            down_for: down_for + SETTLE,
            generation,
        });
    }
}

/// The resubscribing task: waits for a lost subscription, lets the burst
/// settle, then subscribes again what the burst named.
async fn follow(this: Weak<ClusterSubscriber>, mut lost: mpsc::UnboundedReceiver<Lost>) {
    let mut episode = Episode::default();
    while let Some(first) = lost.recv().await {
        tokio::time::sleep(SETTLE).await;
        let mut everything = false;
        let mut names = HashSet::new();
        let mut take = |lost: Lost| match lost {
            Lost::Name(name) => {
                names.insert(name);
            }
            Lost::Connection => everything = true,
        };
        take(first);
        while let Ok(more) = lost.try_recv() {
            take(more);
        }
        let Some(this) = this.upgrade() else {
            return;
        };
        // A name the layer unsubscribed itself is not wanted any more and
        // is skipped there; anything else the server ended is lost.
        let names = if everything { None } else { Some(names) };
        this.resubscribe(names, &mut episode).await;
    }
}
