//! [`SubscribedHost`]: everything the pub/sub layer has on one Redis host
//! in one object, as channels_redis's per-shard connection has it: the
//! supervised connection ([`Link`], whose reader hands pushes over), the
//! names subscribed on it, the lock that keeps them in step with Redis,
//! and the task that sends subscription changes in batches.
//!
//! Why batches: a reconnect storm is thousands of `new_channel` and
//! `group_add` calls at once. One `SUBSCRIBE` round trip per name, one at a
//! time per host, queued them behind each other until they timed out.
//! Here a caller enqueues its name and awaits a shared completion; one task
//! per host takes everything pending and sends it as one `SUBSCRIBE a b c
//! ...` (and one `UNSUBSCRIBE`), so 2,000 joins cost a few round trips.
//!
//! The layer's local state says what should be subscribed (a channel with
//! a buffer, a group with members: [`Interest`]); this object makes Redis
//! match it. The batch task decides each name afresh when it sends, and a
//! resubscription after a reconnection holds the same lock, so what Redis
//! has always ends up what the state says, whatever order calls come in.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};

use redis::RedisError;
use redis::aio::MultiplexedConnection;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::link::Link;
use super::task::spawn_supervised;
use crate::layer::buffers::Locked;
use crate::layer::{BackendError, LayerError};

/// How many names one `SUBSCRIBE` or `UNSUBSCRIBE` carries at most, so one
/// reply (a confirmation per name) stays well within the response timeout.
const BATCH_MAX: usize = 1000;

/// What the layer wants subscribed, asked by the batch task and by a
/// resubscription.
pub(crate) trait Interest: Send + Sync + 'static {
    /// Whether `name` should be subscribed now.
    fn wants(&self, name: &str) -> bool;
    /// Every name of host `shard` that should be subscribed now.
    fn wanted_on(&self, shard: usize) -> Vec<String>;
    /// Every name that should be subscribed now (on a cluster, where
    /// the slot map, not the layer, says which node has it).
    fn wanted_all(&self) -> Vec<String>;
}

/// One caller waiting for its name to be brought in step.
struct Request {
    name: String,
    done: Option<oneshot::Sender<Result<(), LayerError>>>,
}

/// The pub/sub layer's state on one Redis host (see the module doc).
pub(crate) struct SubscribedHost {
    link: Arc<Link>,
    shard: usize,
    interest: Weak<dyn Interest>,
    /// Names subscribed on the current connection (cleared and rebuilt by
    /// a resubscription).
    subscribed: Locked<HashSet<String>>,
    /// Held while a batch or a resubscription talks to Redis.
    exclusive: Mutex<()>,
    requests: mpsc::UnboundedSender<Request>,
}

impl SubscribedHost {
    /// The host object for `link`, with its batch task (supervised; it ends
    /// when the object is dropped).
    pub(crate) fn start(link: Arc<Link>, shard: usize, interest: Weak<dyn Interest>) -> Arc<Self> {
        let (requests, receiver) = mpsc::unbounded_channel();
        let host = Arc::new(SubscribedHost {
            link,
            shard,
            interest,
            subscribed: Locked::default(),
            exclusive: Mutex::new(()),
            requests,
        });
        // The receiver outlives a panicking run of the task, so requests
        // that came meanwhile are still served.
        let receiver = Arc::new(Mutex::new(receiver));
        let weak = Arc::downgrade(&host);
        spawn_supervised(
            format!("subscriber of Redis at {}", host.link.host()),
            move |_| {
                let weak = weak.clone();
                let receiver = Arc::clone(&receiver);
                async move { batches(weak, receiver).await }
            },
        );
        host
    }

    pub(crate) fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Whether `name` is subscribed on the current connection.
    pub(crate) fn is_subscribed(&self, name: &str) -> bool {
        self.subscribed.lock().contains(name)
    }

    /// Brings `name` in step: subscribes it if the layer wants it and it is
    /// not, unsubscribes it if the other way round, in the next batch.
    /// Returns once that batch is done, with its outcome. Nothing to wait
    /// for when the name is in step already. An unsubscribe while the host
    /// is down succeeds: a new connection subscribes only what is wanted.
    pub(crate) async fn sync(&self, name: &str) -> Result<(), LayerError> {
        let Some(interest) = self.interest.upgrade() else {
            return Ok(());
        };
        if interest.wants(name) == self.is_subscribed(name) {
            return Ok(());
        }
        let (done, outcome) = oneshot::channel();
        self.enqueue(name, Some(done))?;
        outcome.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// [`sync`](Self::sync) without waiting: for cleanups that cannot
    /// await (a `Drop`), so a name given up on is not left subscribed.
    pub(crate) fn nudge(&self, name: &str) {
        let _ = self.enqueue(name, None);
    }

    fn enqueue(
        &self,
        name: &str,
        done: Option<oneshot::Sender<Result<(), LayerError>>>,
    ) -> Result<(), LayerError> {
        self.requests
            .send(Request {
                name: name.to_owned(),
                done,
            })
            .map_err(|_| stopped())
    }

    /// After a reconnection, on the new connection: subscribes every name
    /// the layer wants on this host, in batches.
    pub(crate) async fn resubscribe(&self, conn: MultiplexedConnection) -> Result<(), RedisError> {
        let _exclusive = self.exclusive.lock().await;
        self.subscribed.lock().clear();
        let Some(interest) = self.interest.upgrade() else {
            return Ok(());
        };
        let names = interest.wanted_on(self.shard);
        subscribe_on(conn, &names).await?;
        let count = names.len();
        self.subscribed.lock().extend(names);
        tracing::debug!(
            host = self.link.host(),
            subscriptions = count,
            "subscribed again to every live channel and group"
        );
        Ok(())
    }

    /// Sends one batch: everything pending, each name decided now.
    async fn run_batch(&self, batch: Vec<Request>) {
        let _exclusive = self.exclusive.lock().await;
        let Some(interest) = self.interest.upgrade() else {
            return;
        };
        let names: HashSet<&str> = batch.iter().map(|request| request.name.as_str()).collect();
        let wanted: Vec<(&str, bool)> = names
            .into_iter()
            .map(|name| (name, interest.wants(name)))
            .collect();
        let (subscribe, unsubscribe): (Vec<String>, Vec<String>) = {
            let subscribed = self.subscribed.lock();
            let mut subscribe = Vec::new();
            let mut unsubscribe = Vec::new();
            for (name, wants) in wanted {
                match (wants, subscribed.contains(name)) {
                    (true, false) => subscribe.push(name.to_owned()),
                    (false, true) => unsubscribe.push(name.to_owned()),
                    _ => {}
                }
            }
            (subscribe, unsubscribe)
        };
        metrics::histogram!("axum_channels_redis_subscribe_batch_names")
            .record((subscribe.len() + unsubscribe.len()) as f64);

        let mut outcome: HashMap<&str, Result<(), LayerError>> = HashMap::new();
        if !subscribe.is_empty() {
            let names = &subscribe;
            let result = self
                .link
                .run(|conn| async move { subscribe_on(conn, names).await })
                .await;
            if result.is_ok() {
                self.subscribed.lock().extend(subscribe.iter().cloned());
            }
            for name in &subscribe {
                outcome.insert(name, result.clone());
            }
        }
        if !unsubscribe.is_empty() {
            let result = if self.link.is_up() {
                let names = &unsubscribe;
                self.link
                    .run(|mut conn| async move {
                        for chunk in names.chunks(BATCH_MAX) {
                            conn.unsubscribe(chunk).await?;
                        }
                        Ok(())
                    })
                    .await
            } else {
                Ok(())
            };
            if result.is_ok() {
                let mut subscribed = self.subscribed.lock();
                for name in &unsubscribe {
                    subscribed.remove(name);
                }
            }
            for name in &unsubscribe {
                outcome.insert(name, result.clone());
            }
        }
        for request in batch {
            if let Some(done) = request.done {
                let result = outcome.get(request.name.as_str()).cloned();
                // The caller may have given up (its timeout): fine.
                let _ = done.send(result.unwrap_or(Ok(())));
            }
        }
    }
}

/// The batch task of one host: waits for a request, takes every other one
/// pending, sends them as one batch; again, until the host is dropped.
async fn batches(
    host: Weak<SubscribedHost>,
    receiver: Arc<Mutex<mpsc::UnboundedReceiver<Request>>>,
) {
    let mut receiver = receiver.lock().await;
    // The host holds the sender, so this ends once the host is gone.
    while let Some(first) = receiver.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = receiver.try_recv() {
            batch.push(more);
        }
        let Some(host) = host.upgrade() else {
            return;
        };
        host.run_batch(batch).await;
    }
}

async fn subscribe_on(mut conn: MultiplexedConnection, names: &[String]) -> Result<(), RedisError> {
    for chunk in names.chunks(BATCH_MAX) {
        conn.subscribe(chunk).await?;
    }
    Ok(())
}

fn stopped() -> LayerError {
    BackendError::new("the layer was dropped").into()
}
