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
//! is lost, as on any pub/sub reconnection. A second later it subscribes
//! them once more ([`CONFIRM`]): redis-rs can drop, silently, a node
//! connection that had just confirmed one of them.
//!
//! Subscribing is one command per slot (Redis refuses an `SSUBSCRIBE`
//! whose channels are in different slots, and channel names are random,
//! so nearly every name has a slot of its own). Commands for one name are
//! kept in order by a lock striped by slot; different slots go out
//! concurrently, so a storm of joins is as many commands in flight.

use redis::{PushInfo, PushKind, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{Mutex, broadcast, mpsc};
use tokio::time::Instant;

use super::{Direct, Outage, Renewing, SETTLE, backend, retrying, routed, slot};
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
    /// Both renewed when a slot's calls keep failing towards a node (see
    /// `cluster::Renewing`); a renewed subscriber subscribes everything
    /// again.
    subscriber: Renewing,
    publisher: Renewing,
    /// Publishes go straight to the slot's owner when it is known.
    direct: Arc<Direct>,
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
    /// The subscriber on connections already made (publishing by `direct`
    /// where it knows the slot's owner), and its resubscribing task, which
    /// reads `lost` (fed by the push handler; it ends when the subscriber
    /// is dropped).
    pub(crate) fn start(
        subscriber: Renewing,
        publisher: Renewing,
        direct: Arc<Direct>,
        interest: Weak<dyn Interest>,
        reconnected: broadcast::Sender<Reconnected>,
        lost: (mpsc::UnboundedSender<Lost>, mpsc::UnboundedReceiver<Lost>),
        prefix: &str,
    ) -> Arc<Self> {
        let (sender, receiver) = lost;
        // Its subscriptions stay with the old connection, which closes
        // when its last clone is dropped.
        let renewed = sender.clone();
        let subscriber = subscriber.on_renewed(move || {
            let _ = renewed.send(Lost::Connection);
        });
        let this = Arc::new(ClusterSubscriber {
            subscriber,
            publisher,
            direct,
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
        let at = slot(name.as_bytes());
        routed(within, &self.direct, &self.publisher, at, |mut conn| {
            let command = &command;
            async move { command.query_async::<u64>(&mut conn).await }
        })
        .await
        .map_err(|err| backend("SPUBLISH failed", err))
    }

    /// A round trip to any node: what `flush` waits for. Pushes come
    /// through redis-rs's push task, not in order with replies, so this
    /// is weaker than the single-host barrier (see `pubsub.rs`'s flush).
    pub(crate) async fn ping(&self, within: std::time::Duration) -> Result<(), LayerError> {
        retrying(within, &self.subscriber, None, |mut conn| async move {
            redis::cmd("PING").query_async::<()>(&mut conn).await
        })
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
        let mut conn = self.subscriber.conn();
        let at = Some(slot(name.as_bytes()));
        if wants {
            let subscribed = conn.ssubscribe(name).await;
            self.subscriber.observe(at, &subscribed).await;
            if let Err(err) = subscribed {
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

    /// The names of `names` the layer still wants (every wanted name if
    /// `None`).
    fn still_wanted(&self, names: Option<HashSet<String>>) -> HashSet<String> {
        let Some(interest) = self.interest.upgrade() else {
            return HashSet::new();
        };
        match names {
            Some(mut names) => {
                names.retain(|name| interest.wants(name));
                names
            }
            None => interest.wanted_all().into_iter().collect(),
        }
    }

    /// One `SSUBSCRIBE` per slot of `pending`, concurrently; what failed is
    /// left in `pending`, with the first error.
    async fn subscribe_by_slot(&self, pending: &mut HashSet<String>) -> Option<redis::RedisError> {
        let mut by_slot: BTreeMap<u16, Vec<String>> = BTreeMap::new();
        for name in pending.drain() {
            by_slot.entry(slot(name.as_bytes())).or_default().push(name);
        }
        let attempts = by_slot.into_iter().map(|(at, names)| async move {
            let mut conn = self.subscriber.conn();
            let subscribed = conn.ssubscribe(&names).await;
            self.subscriber.observe(Some(at), &subscribed).await;
            match subscribed {
                Ok(()) => {
                    self.subscribed.lock().extend(names);
                    None
                }
                Err(err) => Some((names, err)),
            }
        });
        let mut first_error = None;
        for (names, err) in futures_util::future::join_all(attempts)
            .await
            .into_iter()
            .flatten()
        {
            pending.extend(names);
            first_error.get_or_insert(err);
        }
        first_error
    }

    /// Subscribes `names` again (every wanted name if `None`), by slot,
    /// until each is subscribed or no longer wanted.
    async fn resubscribe(&self, names: Option<HashSet<String>>, episode: &mut Episode) {
        let started = Instant::now();
        let mut backoff = BACKOFF_MIN;
        let mut pending = self.still_wanted(names);
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
            let Some(first_error) = self.subscribe_by_slot(&mut pending).await else {
                break;
            };
            if episode.start() {
                tracing::warn!(
                    error = %first_error,
                    "the Redis Cluster does not take the subscriptions back yet \
                     (a node failed or a slot moves); retrying until it does"
                );
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

    /// Subscribes `names` (every wanted name if `None`) once more, some
    /// time after they were subscribed again: see [`CONFIRM`]. A name that
    /// fails goes the way of a lost one.
    async fn confirm(&self, names: Option<HashSet<String>>) {
        let mut pending = self.still_wanted(names);
        if pending.is_empty() {
            return;
        }
        let count = pending.len();
        if self.subscribe_by_slot(&mut pending).await.is_some() {
            for name in pending {
                let _ = self.lost.send(Lost::Name(name));
            }
        }
        tracing::debug!(subscriptions = count, "confirmed the subscriptions");
    }
}

/// How long after subscribing names again the subscriber subscribes them
/// once more. While the cluster changes, redis-rs can confirm an
/// `SSUBSCRIBE` on a node connection that it then replaces (two calls
/// redirected to a new master at once each open a connection to it, and
/// the second replaces the first in its map): the dropped connection takes
/// the subscription with it, and nothing says so. Seen in about one run in
/// five of `pubsub_survives_a_killed_master`, whose room then stayed silent
/// with no node holding its subscription. `SSUBSCRIBE` of a name already
/// subscribed changes nothing on the server, so one more pass, once the
/// cluster has settled, costs a command per slot and restores what was
/// dropped.
pub(crate) const CONFIRM: Duration = Duration::from_secs(1);

/// Names to subscribe once more, and when: `None` names for every wanted
/// name.
type Confirmation = (Instant, Option<HashSet<String>>);

fn merged(pending: Option<Confirmation>, names: &Option<HashSet<String>>) -> Confirmation {
    let at = Instant::now() + CONFIRM;
    match (pending, names) {
        (Some((_, Some(mut earlier))), Some(names)) => {
            earlier.extend(names.iter().cloned());
            (at, Some(earlier))
        }
        (None, Some(names)) => (at, Some(names.clone())),
        _ => (at, None),
    }
}

/// The resubscribing task: waits for a lost subscription, lets the burst
/// settle, then subscribes again what the burst named, and once more
/// [`CONFIRM`] later.
async fn follow(this: Weak<ClusterSubscriber>, mut lost: mpsc::UnboundedReceiver<Lost>) {
    let mut episode = Episode::default();
    let mut confirmation: Option<Confirmation> = None;
    loop {
        let first = match &confirmation {
            Some((at, _)) => {
                let at = *at;
                tokio::select! {
                    first = lost.recv() => first,
                    () = tokio::time::sleep_until(at) => {
                        let names = confirmation.take().and_then(|(_, names)| names);
                        let Some(this) = this.upgrade() else {
                            return;
                        };
                        this.confirm(names).await;
                        continue;
                    }
                }
            }
            None => lost.recv().await,
        };
        let Some(first) = first else {
            return;
        };
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
        this.resubscribe(names.clone(), &mut episode).await;
        confirmation = Some(merged(confirmation.take(), &names));
    }
}
