//! What the queue layer keeps in this process, behind its one lock: the
//! local buffers, which Redis keys are read here and by whom, memberships,
//! and which keys were reported over capacity.
//!
//! Kept apart from the tasks that read Redis so that its rules (when a key
//! needs poppers, when they may stop, what a full buffer costs) are plain
//! functions of the state, tested without a Redis.
//!
//! - **Demand.** A key's poppers pop only while one of its buffers is
//!   hungry (a receiver waits on it empty); [`State::step`] says so.
//! - **Grace period.** A key whose last local channel closes keeps its
//!   poppers, and their connections, for [`GRACE`]: a server whose sockets
//!   come and go opens the next channel on the same key (all channels of a
//!   layer instance share one), and finds them still there, instead of
//!   starting new ones beside the old ones still blocked in `BZPOPMIN`.
//! - **Drops are counted.** All specific channels of a process share one
//!   Redis key, so a popper working for one channel also pops its
//!   neighbours' messages, into their buffers; a full buffer drops its
//!   oldest (`buffers.rs`, which logs each drop naming its channel). Each
//!   message carries an [`Unread`] marker that counts it if it is dropped
//!   so, unread and not expired.
//! - **Small per channel.** A server may hold tens of thousands of
//!   channels, so what each costs here counts: the layer's prefix, for the
//!   drop counter's label, is one allocation shared by every message of
//!   the layer, not a record per channel; a channel's groups are a short
//!   list, not a tree; and the maps give back their room when most of
//!   their entries are gone (`shrink`), since a hash map never shrinks by
//!   itself.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::layer::LayerMessage;
use crate::layer::buffers::{Buffer, Demand, Entry, HoldsBuffers, LocalBuffers, WhenFull};

/// How long a key's poppers outlive its last local channel.
pub(super) const GRACE: Duration = Duration::from_secs(30);

/// Keys whose over-capacity episode is remembered, at most (a bound on
/// memory; past it, the record starts afresh).
const MAX_REPORTED: usize = 10_000;

/// The counter of messages a full local buffer dropped, labelled by the
/// layer's `prefix`: one series per configured layer, never one per channel
/// (channel names are unbounded, and a label per name would grow the
/// metrics without end). The channel is named in the debug line of each
/// drop and in the buffer's warning, once per episode.
pub(super) const DROPPED_METRIC: &str = "axum_channels_queue_buffer_dropped_total";

/// A message popped from a plain channel, as it was in Redis, so that it
/// can be given back for another receiver if this process closes the
/// channel unread.
#[derive(Debug)]
pub(super) struct Raw {
    pub member: Vec<u8>,
    pub score: f64,
    pub shard: usize,
}

/// Marks a buffered message as not yet read. Dropped while still marked and
/// not expired, the message was dropped by its full buffer to make room:
/// counted under its layer's prefix (the buffer logs the drop, naming the
/// channel). Every other way out of a buffer (received, given back, freed
/// by `close_channel` or `flush`) clears the mark first.
pub(super) struct Unread {
    /// The layer's prefix, shared by all its messages.
    prefix: Option<Arc<str>>,
    expires: Option<Instant>,
}

impl Unread {
    /// Clears the mark: this message is accounted for.
    pub(super) fn clear(&mut self) {
        self.prefix = None;
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        let Some(prefix) = self.prefix.take() else {
            return;
        };
        if self.expires.is_some_and(|at| at <= Instant::now()) {
            return; // expired: its age dropped it, not its neighbours
        }
        metrics::counter!(DROPPED_METRIC, "prefix" => prefix.to_string()).increment(1);
    }
}

/// What the queue layer keeps beside each buffered message.
pub(super) struct Extra {
    /// The member as it was in Redis, for a plain channel's.
    pub raw: Option<Raw>,
    pub unread: Unread,
}

/// Takes the marks off `entries`, and returns what of them goes back to
/// Redis.
pub(super) fn settle(entries: Vec<Entry<Extra>>) -> Vec<Raw> {
    entries
        .into_iter()
        .filter_map(|mut entry| {
            entry.extra.unread.clear();
            entry.extra.raw.take()
        })
        .collect()
}

/// What a popper is asked for: how many receivers of a key wait on an
/// empty buffer, and what kind of key it is.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Wanted {
    pub plain: bool,
    pub hungry: usize,
}

/// What a popper does next.
#[derive(Debug)]
pub(super) enum Step {
    /// Pop for these receivers.
    Pop(Wanted),
    /// Nobody is hungry: wait for the key's bell, or until this deadline
    /// (the end of the grace period), whichever comes first.
    Wait(Option<Instant>),
    /// Stop: the key is gone, or belongs to a later generation of poppers.
    Stop,
}

/// The readers of one Redis key in this process.
struct KeyState {
    /// Identifies this generation of the key's poppers: a popper whose
    /// epoch is not the key's current one stops.
    epoch: u64,
    /// A plain channel (work queue), rather than a process's specific key.
    plain: bool,
    /// Local channels whose messages come from this key.
    channels: usize,
    /// Since when it has had none: its poppers stop [`GRACE`] after.
    idle_since: Option<Instant>,
    /// How many of those have a receiver waiting on an empty buffer, kept
    /// by the buffers themselves; its bell wakes the key's poppers when one
    /// more has, or when they should look again.
    demand: Arc<Demand>,
}

pub(super) struct State {
    /// Local channels' buffers. Nothing can tell a sender that one is full
    /// (its `send` succeeded in Redis), so a full buffer drops its oldest
    /// message, as Python's does.
    pub buffers: LocalBuffers<Extra>,
    /// Redis key → who reads it here.
    keys: HashMap<String, KeyState>,
    /// The layer's prefix, for [`Unread`]; set by the first `register`.
    prefix: Option<Arc<str>>,
    /// Local channel → groups it joined through this layer (each once), to
    /// leave them on `close_channel` and restore them after a Redis restart.
    pub memberships: HashMap<String, Vec<String>>,
    /// Keys a `group_send` found at capacity and reported, until a group
    /// message gets into them again.
    over_capacity: HashSet<String>,
}

impl Default for State {
    fn default() -> Self {
        State {
            buffers: LocalBuffers::new(WhenFull::DropOldest),
            keys: HashMap::new(),
            prefix: None,
            memberships: HashMap::new(),
            over_capacity: HashSet::new(),
        }
    }
}

impl HoldsBuffers for State {
    type Extra = Extra;

    fn buffers(&mut self) -> &mut LocalBuffers<Extra> {
        &mut self.buffers
    }
}

impl Drop for State {
    fn drop(&mut self) {
        // The layer is gone: what its buffers held was not dropped for room.
        for (_, buffer) in self.buffers.iter_mut() {
            settle(buffer.take_all());
        }
    }
}

impl State {
    /// Adds a local channel reading `key`, if it is new. Returns its buffer,
    /// and the epoch of the key's poppers when they have to be started (not
    /// while the key is in its grace period: its poppers are still there).
    pub(super) fn register(
        &mut self,
        name: &str,
        key: &str,
        capacity: usize,
        prefix: &str,
        next_epoch: &AtomicU64,
    ) -> (&mut Buffer<Extra>, Option<u64>) {
        let mut epoch = None;
        if !self.buffers.contains(name) {
            match self.keys.get_mut(key) {
                Some(readers) => {
                    readers.channels += 1;
                    readers.idle_since = None;
                }
                None => {
                    let started = next_epoch.fetch_add(1, Ordering::Relaxed);
                    epoch = Some(started);
                    self.keys.insert(
                        key.to_owned(),
                        KeyState {
                            epoch: started,
                            plain: !name.contains('!'),
                            channels: 1,
                            idle_since: None,
                            demand: Arc::default(),
                        },
                    );
                }
            }
            if self.prefix.is_none() {
                self.prefix = Some(Arc::from(prefix));
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
    /// `None` if it is unknown or someone still waits on it. A key left
    /// without channels starts its grace period.
    pub(super) fn unregister(
        &mut self,
        name: &str,
        key: &str,
        now: Instant,
    ) -> Option<Vec<Entry<Extra>>> {
        if self.buffers.get(name)?.is_waited_on() {
            return None;
        }
        let mut buffer = self.buffers.remove(name)?;
        if let Some(readers) = self.keys.get_mut(key) {
            readers.channels = readers.channels.saturating_sub(1);
            if readers.channels == 0 {
                readers.idle_since = Some(now);
                // Its poppers start counting down.
                readers.demand.bell().notify_waiters();
            }
        }
        Some(buffer.take_all())
    }

    /// The bell of `key`'s demand, for its poppers of generation `epoch`,
    /// or `None` if they should stop.
    pub(super) fn demand(&self, key: &str, epoch: u64) -> Option<Arc<Demand>> {
        let readers = self.keys.get(key).filter(|r| r.epoch == epoch)?;
        Some(Arc::clone(&readers.demand))
    }

    /// What a popper of `key` of generation `epoch` does next, at `now`.
    /// The first to find the grace period over removes the key.
    pub(super) fn step(&mut self, key: &str, epoch: u64, now: Instant, grace: Duration) -> Step {
        let Some(readers) = self.keys.get(key).filter(|r| r.epoch == epoch) else {
            return Step::Stop;
        };
        let hungry = readers.demand.hungry();
        if hungry > 0 {
            return Step::Pop(Wanted {
                plain: readers.plain,
                hungry,
            });
        }
        match readers.idle_since {
            Some(since) if now.saturating_duration_since(since) >= grace => {
                self.keys.remove(key);
                Step::Stop
            }
            Some(since) => Step::Wait(Some(since + grace)),
            None => Step::Wait(None),
        }
    }

    /// Rings every key's bell, so that their poppers look again (the layer
    /// is being dropped).
    pub(super) fn wake_all(&self) {
        for readers in self.keys.values() {
            readers.demand.bell().notify_waiters();
        }
    }

    /// Puts `message` in the buffer of local channel `name`. Returns `raw`
    /// back when there is no such buffer (closed, or never here).
    pub(super) fn push(
        &mut self,
        name: &str,
        message: Arc<LayerMessage>,
        expires: Option<Instant>,
        raw: Option<Raw>,
        now: Instant,
    ) -> Result<(), Option<Raw>> {
        let Some(buffer) = self.buffers.get_mut(name) else {
            return Err(raw);
        };
        let entry = Entry {
            message,
            expires,
            extra: Extra {
                raw,
                unread: Unread {
                    prefix: self.prefix.clone(),
                    expires,
                },
            },
        };
        // A full buffer drops its oldest (whose mark counts it): never
        // refused.
        let _ = buffer.push(name, entry, now);
        Ok(())
    }

    /// Empties every buffer (`flush`), and forgets memberships and reports.
    pub(super) fn clear(&mut self) {
        for (_, buffer) in self.buffers.iter_mut() {
            settle(buffer.take_all());
        }
        self.memberships.clear();
        self.over_capacity.clear();
    }

    /// Records which keys a `group_send` found at capacity (`full`) and
    /// which took its message (`fine`). Returns the full ones not reported
    /// yet: one warning per key and episode.
    pub(super) fn note_capacity<'k>(&mut self, full: &[&'k str], fine: &[&str]) -> Vec<&'k str> {
        for key in fine {
            self.over_capacity.remove(*key);
        }
        if self.over_capacity.len() > MAX_REPORTED {
            self.over_capacity.clear();
        }
        full.iter()
            .copied()
            .filter(|key| self.over_capacity.insert((*key).to_owned()))
            .collect()
    }

    /// Whether `key` has readers here (in use or in its grace period).
    #[cfg(test)]
    fn has_key(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::layer::buffers::{Locked, Receiver};

    const KEY: &str = "asgispecific.abc!";

    fn message(n: u64) -> Arc<LayerMessage> {
        Arc::new(json!({"type": "t", "n": n}).as_object().unwrap().clone())
    }

    fn open(state: &mut State, name: &str, epochs: &AtomicU64) -> Option<u64> {
        state.register(name, KEY, 2, "asgi", epochs).1
    }

    #[test]
    fn the_first_channel_of_a_key_starts_its_poppers_and_the_next_ones_do_not() {
        let epochs = AtomicU64::new(1);
        let mut state = State::default();
        assert_eq!(open(&mut state, "specific.abc!1", &epochs), Some(1));
        assert_eq!(open(&mut state, "specific.abc!2", &epochs), None);
        assert_eq!(open(&mut state, "specific.abc!1", &epochs), None, "known");
        let (_, plain) = state.register("worker.jobs", "asgiworker.jobs", 2, "asgi", &epochs);
        assert_eq!(plain, Some(2), "another key, other poppers");
    }

    #[test]
    fn poppers_wait_for_demand_and_pop_for_hungry_buffers_only() {
        let epochs = AtomicU64::new(1);
        let state = Locked::<State>::default();
        let epoch = open(&mut state.lock(), "specific.abc!a", &epochs).unwrap();
        open(&mut state.lock(), "specific.abc!b", &epochs);
        let now = Instant::now();
        assert!(matches!(
            state.lock().step(KEY, epoch, now, GRACE),
            Step::Wait(None)
        ));
        let waiting = {
            let mut locked = state.lock();
            let buffer = locked.buffers.get_mut("specific.abc!a").unwrap();
            Receiver::new(&state, "specific.abc!a", buffer)
        };
        let wanted = Wanted {
            plain: false,
            hungry: 1,
        };
        assert!(matches!(state.lock().step(KEY, epoch, now, GRACE), Step::Pop(w) if w == wanted));
        // A message for b does not feed a: a is still hungry.
        state
            .lock()
            .push("specific.abc!b", message(1), None, None, now)
            .unwrap();
        assert!(matches!(
            state.lock().step(KEY, epoch, now, GRACE),
            Step::Pop(_)
        ));
        state
            .lock()
            .push("specific.abc!a", message(2), None, None, now)
            .unwrap();
        assert!(matches!(
            state.lock().step(KEY, epoch, now, GRACE),
            Step::Wait(None)
        ));
        drop(waiting);
        assert!(matches!(
            state.lock().step(KEY, epoch + 1, now, GRACE),
            Step::Stop
        ));
    }

    #[test]
    fn a_key_keeps_its_poppers_for_the_grace_period() {
        let epochs = AtomicU64::new(1);
        let mut state = State::default();
        let epoch = open(&mut state, "specific.abc!a", &epochs).unwrap();
        let closed = Instant::now();
        assert!(state.unregister("specific.abc!a", KEY, closed).is_some());
        let Step::Wait(Some(deadline)) = state.step(KEY, epoch, closed, GRACE) else {
            panic!("idle poppers wait out the grace period");
        };
        assert_eq!(deadline, closed + GRACE);

        // A channel opened within it takes the same poppers.
        let later = closed + GRACE / 2;
        assert_eq!(open(&mut state, "specific.abc!b", &epochs), None);
        assert!(matches!(
            state.step(KEY, epoch, later, GRACE),
            Step::Wait(None)
        ));

        // Once it is over, the first popper to look removes the key...
        state.unregister("specific.abc!b", KEY, later);
        assert!(matches!(
            state.step(KEY, epoch, later + GRACE, GRACE),
            Step::Stop
        ));
        assert!(!state.has_key(KEY));
        // ...and the next channel starts a new generation.
        assert_eq!(open(&mut state, "specific.abc!c", &epochs), Some(2));
    }

    #[test]
    fn a_channel_someone_waits_on_is_not_unregistered() {
        let epochs = AtomicU64::new(1);
        let state = Locked::<State>::default();
        open(&mut state.lock(), "specific.abc!a", &epochs);
        let waiting = {
            let mut locked = state.lock();
            let buffer = locked.buffers.get_mut("specific.abc!a").unwrap();
            Receiver::new(&state, "specific.abc!a", buffer)
        };
        let now = Instant::now();
        assert!(
            state
                .lock()
                .unregister("specific.abc!a", KEY, now)
                .is_none()
        );
        drop(waiting);
        assert!(
            state
                .lock()
                .unregister("specific.abc!a", KEY, now)
                .is_some()
        );
        assert!(
            state
                .lock()
                .unregister("specific.abc!a", KEY, now)
                .is_none()
        );
    }

    #[test]
    fn a_message_for_a_channel_not_here_comes_back() {
        let mut state = State::default();
        let raw = Raw {
            member: b"m".to_vec(),
            score: 1.5,
            shard: 0,
        };
        let back = state.push("worker.jobs", message(1), None, Some(raw), Instant::now());
        assert!(matches!(back, Err(Some(raw)) if raw.member == b"m"));
    }

    #[test]
    fn closing_gives_back_what_a_plain_channel_held() {
        let epochs = AtomicU64::new(1);
        let mut state = State::default();
        state.register("worker.jobs", "asgiworker.jobs", 5, "asgi", &epochs);
        let now = Instant::now();
        for n in 0..2 {
            let raw = Raw {
                member: vec![n],
                score: f64::from(n),
                shard: 0,
            };
            assert!(
                state
                    .push("worker.jobs", message(n.into()), None, Some(raw), now)
                    .is_ok()
            );
        }
        let left = state
            .unregister("worker.jobs", "asgiworker.jobs", now)
            .unwrap();
        let raws = settle(left);
        let members: Vec<Vec<u8>> = raws.into_iter().map(|raw| raw.member).collect();
        assert_eq!(members, vec![vec![0], vec![1]], "oldest first");
    }

    #[test]
    fn over_capacity_is_reported_once_per_episode() {
        let mut state = State::default();
        assert_eq!(state.note_capacity(&["k1", "k2"], &[]), vec!["k1", "k2"]);
        assert!(state.note_capacity(&["k1"], &["k2"]).is_empty());
        assert_eq!(
            state.note_capacity(&["k2"], &["k1"]),
            vec!["k2"],
            "k2 took a message in between: a new episode"
        );
        assert_eq!(state.note_capacity(&["k1"], &[]), vec!["k1"]);
    }
}
