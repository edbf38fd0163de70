//! Local buffers: where every layer's messages wait for their channel's
//! `receive`, one bounded queue per channel held in this process.
//!
//! The three layers differ in where messages come from (a `send` in this
//! process, a Redis subscription, a Redis pop) but not in how they wait
//! here, so this is written once:
//!
//! - [`LocalBuffers`], the map of channel name to [`Buffer`];
//! - [`Buffer`], a bounded queue with its bell, its count of waiting
//!   receivers, and its "falling behind" [`Episode`], reported once;
//! - [`Receiver`], the receive loop and the guard that counts a receiver
//!   as waiting for as long as it lives, also when its future is dropped
//!   half-way (a `select!` took another branch): dropping it drops a wait
//!   on a [`Notify`], never a message;
//! - [`Locked`], a mutex that stays usable after a panic elsewhere;
//! - [`Demand`], for a layer that fetches only for waiting receivers.
//!
//! Messages are held as `Arc<LayerMessage>`: a group message is one
//! allocation shared by every member's buffer, so a room of a thousand
//! members that do not read holds one copy of it, not a thousand.
//! `receive` clones it out only if other buffers still hold it.
//!
//! Each layer keeps its buffers in its own state, behind its one `std`
//! mutex, so that a buffer changes in the same step as what the layer
//! keeps about it (groups, subscriptions, demand). `memory.rs` explains
//! why a `std` mutex is right in async code: no guard is ever held across
//! an `.await`; [`Receiver::next`] awaits its bell only after the guard's
//! block has ended.

// The Redis layers use more of these buffers than the in-memory one does
// (demand, batches, per-message extras); without them those parts rest.
#![cfg_attr(not(feature = "redis"), allow(dead_code))]

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::LayerMessage;
use super::episode::Episode;

/// A `std` mutex whose lock carries on after a panic in another holder.
///
/// Sound for the layers' state because every update under it is a few map
/// operations that leave the maps consistent: a panic (a bug) can lose an
/// update, never corrupt one. Refusing the lock instead would turn one bug
/// into every later call failing.
#[derive(Debug, Default)]
pub(crate) struct Locked<T>(Mutex<T>);

impl<T> Locked<T> {
    pub(crate) fn new(value: T) -> Self {
        Locked(Mutex::new(value))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A message waiting in a buffer.
pub(crate) struct Entry<X = ()> {
    /// Shared with every other buffer the same message went to.
    pub message: Arc<LayerMessage>,
    /// When it is dropped unread; `None` for never (pub/sub).
    pub expires: Option<Instant>,
    /// What the layer keeps beside it (the queue layer: the member to give
    /// back to Redis if nobody takes it).
    pub extra: X,
}

impl Entry {
    pub(crate) fn new(message: Arc<LayerMessage>, expires: Option<Instant>) -> Self {
        Entry {
            message,
            expires,
            extra: (),
        }
    }
}

impl<X> Entry<X> {
    /// The message as the buffers share it, its other marks dropped.
    pub(crate) fn into_shared(self) -> Arc<LayerMessage> {
        self.message
    }

    /// The message itself, cloned only if another buffer still holds it.
    pub(crate) fn into_message(self) -> LayerMessage {
        Arc::unwrap_or_clone(self.message)
    }

    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|expires| expires <= now)
    }
}

/// What a full buffer does with one message more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WhenFull {
    /// Refuses it, so the sender gets `ChannelFull`: in memory, the sender
    /// is in this process and can be told.
    Refuse,
    /// Drops the oldest message to make room, with one warning per
    /// episode: a message from Redis has no sender here to tell, and
    /// Python's bounded receive buffer does the same.
    DropOldest,
}

/// A full buffer refused a message ([`WhenFull::Refuse`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Full;

/// How many receivers, over a set of buffers, wait on an empty one, and a
/// bell that rings when one more starts to: what lets the queue layer pop
/// from Redis only for receivers that want a message, so messages nobody
/// waits for stay in Redis, where capacity and expiry apply.
///
/// Buffers keep the count themselves (see [`Buffer::with_demand`]), under
/// their layer's lock; the atomic only lets the count be shared.
#[derive(Debug, Default)]
pub(crate) struct Demand {
    hungry: AtomicUsize,
    bell: Notify,
}

impl Demand {
    /// Receivers waiting on an empty buffer right now.
    pub(crate) fn hungry(&self) -> usize {
        self.hungry.load(Ordering::Relaxed)
    }

    /// Rung when a receiver starts to wait on an empty buffer, and by
    /// whoever wants the fetchers to look again (e.g. to stop).
    pub(crate) fn bell(&self) -> &Notify {
        &self.bell
    }

    fn changed(&self, was_hungry: bool, is_hungry: bool) {
        match (was_hungry, is_hungry) {
            (false, true) => {
                self.hungry.fetch_add(1, Ordering::Relaxed);
                self.bell.notify_waiters();
            }
            (true, false) => {
                // Never below zero, whatever a bug elsewhere did.
                let _ = self
                    .hungry
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            }
            _ => {}
        }
    }
}

/// One channel's messages, oldest first, and who waits for them.
pub(crate) struct Buffer<X = ()> {
    queue: VecDeque<Entry<X>>,
    /// Wakes one waiting receiver when a message arrives.
    arrived: Arc<Notify>,
    /// Receivers waiting right now. A buffer someone waits on is never
    /// removed, or its receiver would wait on a bell nobody can ring.
    waiting: usize,
    capacity: usize,
    when_full: WhenFull,
    /// Going on from the first message the buffer refused or dropped until
    /// its receiver has caught up (the buffer is empty again): a receiver
    /// that stays just behind, taking one message while the room sends
    /// ten, costs one log line, not one per message.
    behind: Episode,
    demand: Option<Arc<Demand>>,
}

impl<X> Buffer<X> {
    /// An empty buffer of at most `capacity` messages (at least 1).
    pub(crate) fn new(capacity: usize, when_full: WhenFull) -> Self {
        Buffer {
            queue: VecDeque::new(),
            arrived: Arc::new(Notify::new()),
            waiting: 0,
            capacity: capacity.max(1),
            when_full,
            behind: Episode::default(),
            demand: None,
        }
    }

    /// This buffer, counted in `demand` whenever a receiver waits on it
    /// while it is empty.
    pub(crate) fn with_demand(mut self, demand: Arc<Demand>) -> Self {
        self.demand = Some(demand);
        self
    }

    /// True while a receiver waits on it.
    pub(crate) fn is_waited_on(&self) -> bool {
        self.waiting > 0
    }

    /// True when a receiver waits and nothing is here for it.
    pub(crate) fn is_hungry(&self) -> bool {
        self.waiting > 0 && self.queue.is_empty()
    }

    /// Runs `change`, keeping the buffer's [`Demand`] right, and frees the
    /// queue's room once it is empty: most channels are idle most of the
    /// time, and a server of 15,000 members that each once held a message
    /// would otherwise keep room for four apiece (some 400 bytes each).
    fn tracked<R>(&mut self, change: impl FnOnce(&mut Self) -> R) -> R {
        let was_hungry = self.is_hungry();
        let result = change(self);
        if self.queue.is_empty() && self.queue.capacity() > 0 {
            self.queue = VecDeque::new();
        }
        if let Some(demand) = &self.demand {
            demand.changed(was_hungry, self.is_hungry());
        }
        result
    }

    fn drop_expired(&mut self, now: Instant) {
        while self.queue.front().is_some_and(|entry| entry.expired(now)) {
            self.queue.pop_front();
        }
        if self.queue.is_empty() {
            self.behind.end();
        }
    }

    /// Queues `entry` and wakes a receiver. When the buffer is full,
    /// refuses it or drops the oldest message, as [`WhenFull`] says;
    /// `channel` names the buffer in the warning.
    pub(crate) fn push(
        &mut self,
        channel: &str,
        entry: Entry<X>,
        now: Instant,
    ) -> Result<(), Full> {
        self.tracked(|buffer| {
            buffer.drop_expired(now);
            if buffer.queue.len() >= buffer.capacity {
                match buffer.when_full {
                    WhenFull::Refuse => {
                        metrics::counter!("axum_channels_layer_channel_full_total").increment(1);
                        return Err(Full);
                    }
                    WhenFull::DropOldest => {
                        buffer.queue.pop_front();
                        metrics::counter!("axum_channels_layer_buffer_dropped_total").increment(1);
                        tracing::debug!(
                            channel,
                            "dropped the oldest message of a full local buffer"
                        );
                        if buffer.behind.start() {
                            tracing::warn!(
                                channel,
                                capacity = buffer.capacity,
                                "a channel's local buffer is full: dropping its oldest \
                                 messages (reported once until it catches up)"
                            );
                        }
                    }
                }
            }
            buffer.queue.push_back(entry);
            buffer.arrived.notify_one();
            Ok(())
        })
    }

    /// Records that a message for this buffer was refused. True when that
    /// starts an episode of falling behind: the caller reports it then,
    /// and not again until the receiver has caught up.
    pub(crate) fn falling_behind(&mut self) -> bool {
        self.behind.start()
    }

    /// Counts one more receiver as waiting, and returns the bell that
    /// rings when a message arrives. Use it through [`Receiver::new`],
    /// whose guard undoes the count.
    fn wait(&mut self) -> Arc<Notify> {
        self.tracked(|buffer| buffer.waiting += 1);
        Arc::clone(&self.arrived)
    }

    fn stop_waiting(&mut self) {
        self.tracked(|buffer| buffer.waiting = buffer.waiting.saturating_sub(1));
    }

    /// Takes the next message that has not expired, for a caller that does
    /// not wait (see [`ChannelLayer::try_receive`]): no receiver is counted,
    /// so none stops waiting.
    ///
    /// [`ChannelLayer::try_receive`]: super::ChannelLayer::try_receive
    pub(crate) fn take_ready(&mut self, now: Instant) -> Option<Entry<X>> {
        self.tracked(|buffer| {
            buffer.drop_expired(now);
            let entry = buffer.queue.pop_front()?;
            if buffer.queue.is_empty() {
                buffer.behind.end();
            }
            Some(entry)
        })
    }

    /// Takes the next message that has not expired for a waiting receiver,
    /// which stops waiting in the same step (so that no one counts it as
    /// still wanting a message it has).
    fn hand_over(&mut self, now: Instant) -> Option<Entry<X>> {
        self.tracked(|buffer| {
            buffer.drop_expired(now);
            let entry = buffer.queue.pop_front()?;
            buffer.waiting = buffer.waiting.saturating_sub(1);
            if buffer.queue.is_empty() {
                buffer.behind.end();
            }
            Some(entry)
        })
    }

    /// Drops expired messages; true while the buffer is still worth
    /// keeping (it holds messages, or someone waits on it).
    pub(crate) fn sweep(&mut self, now: Instant) -> bool {
        self.tracked(|buffer| buffer.drop_expired(now));
        !self.queue.is_empty() || self.waiting > 0
    }

    /// Drops every message.
    pub(crate) fn clear(&mut self) {
        self.tracked(|buffer| {
            buffer.queue.clear();
            buffer.behind.end();
        });
    }

    /// Takes every message out, oldest first.
    pub(crate) fn take_all(&mut self) -> Vec<Entry<X>> {
        self.tracked(|buffer| {
            buffer.behind.end();
            buffer.queue.drain(..).collect()
        })
    }
}

impl<X> Drop for Buffer<X> {
    fn drop(&mut self) {
        // Only an idle buffer is removed, but a hungry one must not stay
        // counted after it is gone.
        if let Some(demand) = &self.demand {
            demand.changed(self.is_hungry(), false);
        }
    }
}

/// The map of channel names to buffers. Every message a layer hands over
/// looks its channel up here about four times (the sender's push, the
/// receive, the wait, the hand-over), so the hash is foldhash's, several
/// times quicker on names of this length than the standard library's
/// SipHash, and still seeded at random, so names cannot be picked in
/// advance to fall into one bucket.
type ByChannel<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// The buffers of one layer's local channels, by channel name.
pub(crate) struct LocalBuffers<X = ()> {
    buffers: ByChannel<Buffer<X>>,
    when_full: WhenFull,
}

impl<X> LocalBuffers<X> {
    pub(crate) fn new(when_full: WhenFull) -> Self {
        LocalBuffers {
            buffers: ByChannel::default(),
            when_full,
        }
    }

    /// Channels with a buffer.
    pub(crate) fn len(&self) -> usize {
        self.buffers.len()
    }

    pub(crate) fn contains(&self, channel: &str) -> bool {
        self.buffers.contains_key(channel)
    }

    pub(crate) fn get(&self, channel: &str) -> Option<&Buffer<X>> {
        self.buffers.get(channel)
    }

    pub(crate) fn get_mut(&mut self, channel: &str) -> Option<&mut Buffer<X>> {
        self.buffers.get_mut(channel)
    }

    /// The buffer of `channel`, made with `capacity` (called only then) if
    /// it has none yet.
    pub(crate) fn open(
        &mut self,
        channel: &str,
        capacity: impl FnOnce() -> usize,
    ) -> &mut Buffer<X> {
        let Ok(buffer) = self.try_open(channel, || Ok::<_, std::convert::Infallible>(capacity()));
        buffer
    }

    /// [`open`](Self::open), where making the buffer may fail: `make`, called
    /// only for a channel without one, checks the name and says its
    /// capacity. A receive on a channel that has a buffer, nearly every
    /// receive, thus checks nothing again.
    pub(crate) fn try_open<E>(
        &mut self,
        channel: &str,
        make: impl FnOnce() -> Result<usize, E>,
    ) -> Result<&mut Buffer<X>, E> {
        // Looked up first: `entry` would need an owned name, an allocation
        // on every receive and every group member's push, where the buffer
        // nearly always exists already.
        if !self.buffers.contains_key(channel) {
            let buffer = Buffer::new(make()?, self.when_full);
            self.buffers.insert(channel.to_owned(), buffer);
        }
        Ok(self
            .buffers
            .get_mut(channel)
            .expect("the buffer was just looked up or inserted"))
    }

    /// The buffer of `channel`, made with `capacity` and counted in
    /// `demand` (see [`Buffer::with_demand`]) if it has none yet.
    pub(crate) fn open_counted(
        &mut self,
        channel: &str,
        capacity: usize,
        demand: impl FnOnce() -> Arc<Demand>,
    ) -> &mut Buffer<X> {
        // Looked up first, as in `open`.
        if !self.buffers.contains_key(channel) {
            let buffer = Buffer::new(capacity, self.when_full).with_demand(demand());
            self.buffers.insert(channel.to_owned(), buffer);
        }
        self.buffers
            .get_mut(channel)
            .expect("the buffer was just looked up or inserted")
    }

    /// Removes the buffer of `channel`, returning it.
    pub(crate) fn remove(&mut self, channel: &str) -> Option<Buffer<X>> {
        let removed = self.buffers.remove(channel);
        shrink(&mut self.buffers);
        removed
    }

    /// Keeps the buffers for which `keep` says true.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&str, &mut Buffer<X>) -> bool) {
        self.buffers.retain(|channel, buffer| keep(channel, buffer));
        shrink(&mut self.buffers);
    }

    /// Room for this many buffers, used or not: for tests.
    #[cfg(test)]
    fn room(&self) -> usize {
        self.buffers.capacity()
    }

    /// Every buffer, with its channel's name.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Buffer<X>)> {
        self.buffers
            .iter_mut()
            .map(|(channel, buffer)| (channel.as_str(), buffer))
    }

    /// Every channel's name.
    pub(crate) fn channels(&self) -> impl Iterator<Item = &str> {
        self.buffers.keys().map(String::as_str)
    }
}

/// Below this many entries' room, a map is not worth shrinking.
const SHRINK_FROM: usize = 1_024;

/// Gives back most of `map`'s room once fewer than a quarter of it is in
/// use. A `HashMap` never shrinks by itself, so a server that once held
/// 15,000 channels would keep room for them all (some 100 bytes each, per
/// map) after they have gone, where the allocator cannot return it.
/// Shrinking to twice what is left, rather than to fit, leaves room to
/// grow back without reallocating at once; a map shrinks only after it
/// has lost three quarters of itself, so the work is paid for by the
/// removals, as growing is by the inserts.
pub(crate) fn shrink<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(
    map: &mut HashMap<K, V, S>,
) {
    let room = map.capacity();
    if room >= SHRINK_FROM && map.len() < room / 4 {
        map.shrink_to(map.len() * 2);
    }
}

/// A layer state that holds [`LocalBuffers`], for [`Receiver`] to find them.
pub(crate) trait HoldsBuffers {
    /// What the layer keeps beside each message (see [`Entry::extra`]).
    type Extra;

    fn buffers(&mut self) -> &mut LocalBuffers<Self::Extra>;
}

/// One `receive`: counted as waiting on its channel's buffer from [`new`]
/// until it has a message, or until it is dropped (cancelled), whichever
/// comes first.
///
/// [`new`]: Receiver::new
pub(crate) struct Receiver<'a, S: HoldsBuffers> {
    state: &'a Locked<S>,
    channel: &'a str,
    arrived: Arc<Notify>,
    waiting: bool,
}

impl<'a, S: HoldsBuffers> Receiver<'a, S> {
    /// Starts waiting on `buffer`, the buffer of `channel` in `state`,
    /// which the caller holds locked: looking it up and counting the
    /// receiver in one step, no `close_channel` can remove it in between.
    /// Drop the caller's guard before awaiting [`next`](Self::next).
    pub(crate) fn new(
        state: &'a Locked<S>,
        channel: &'a str,
        buffer: &mut Buffer<S::Extra>,
    ) -> Self {
        Receiver {
            state,
            channel,
            arrived: buffer.wait(),
            waiting: true,
        }
    }

    /// Waits for the next message of the channel that has not expired.
    /// Cancel-safe: a message is only taken out when it is returned.
    pub(crate) async fn next(mut self) -> Entry<S::Extra> {
        let arrived = Arc::clone(&self.arrived);
        loop {
            // Asked for before looking, so that a message arriving in
            // between rings a bell this task is already listening to.
            let notified = arrived.notified();
            {
                let mut state = self.state.lock();
                let taken = state
                    .buffers()
                    .get_mut(self.channel)
                    .and_then(|buffer| buffer.hand_over(Instant::now()));
                if let Some(entry) = taken {
                    self.waiting = false;
                    return entry;
                }
            }
            notified.await;
        }
    }
}

impl<S: HoldsBuffers> Drop for Receiver<'_, S> {
    fn drop(&mut self) {
        if self.waiting
            && let Some(buffer) = self.state.lock().buffers().get_mut(self.channel)
        {
            buffer.stop_waiting();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    fn entry(n: u64, expires: Option<Instant>) -> Entry {
        let message = json!({"type": "t", "n": n}).as_object().unwrap().clone();
        Entry::new(Arc::new(message), expires)
    }

    fn n(entry: Option<Entry>) -> Option<u64> {
        entry.and_then(|entry| entry.message["n"].as_u64())
    }

    #[test]
    fn an_emptied_buffer_keeps_no_room() {
        let now = Instant::now();
        let mut buffer: Buffer = Buffer::new(10, WhenFull::DropOldest);
        for i in 0..3 {
            buffer.push("c", entry(i, None), now).unwrap();
        }
        assert!(buffer.queue.capacity() >= 3);
        assert_eq!(n(buffer.take_ready(now)), Some(0));
        assert!(buffer.queue.capacity() >= 2, "not empty yet: kept");
        buffer.take_ready(now);
        buffer.take_ready(now);
        assert_eq!(buffer.queue.capacity(), 0, "taken empty");
        buffer.push("c", entry(4, Some(now)), now).unwrap();
        assert!(!buffer.sweep(now + Duration::from_secs(1)));
        assert_eq!(buffer.queue.capacity(), 0, "emptied by expiry");
        buffer.push("c", entry(5, None), now).unwrap();
        buffer.take_all();
        assert_eq!(buffer.queue.capacity(), 0, "emptied at once");
    }

    #[test]
    fn maps_give_back_their_room_when_mostly_empty() {
        let mut buffers: LocalBuffers = LocalBuffers::new(WhenFull::Refuse);
        let names: Vec<String> = (0..20_000).map(|i| format!("c{i}")).collect();
        for name in &names {
            buffers.open(name, || 1);
        }
        let full = buffers.room();
        assert!(full >= 20_000);
        for name in &names[..10_000] {
            buffers.remove(name);
        }
        assert!(
            buffers.room() > 20_000,
            "half empty: kept, to grow back into"
        );
        for name in &names[10_000..19_990] {
            buffers.remove(name);
        }
        let left = buffers.room();
        assert!(
            left <= 2 * SHRINK_FROM,
            "10 left: room for {left} of {full} kept"
        );
        buffers.retain(|_, _| false);
        assert!(buffers.room() <= left);
        assert_eq!(buffers.len(), 0);
    }

    #[derive(Default)]
    struct State {
        buffers: Option<LocalBuffers>,
    }

    impl HoldsBuffers for State {
        type Extra = ();
        fn buffers(&mut self) -> &mut LocalBuffers {
            self.buffers
                .get_or_insert_with(|| LocalBuffers::new(WhenFull::Refuse))
        }
    }

    #[test]
    fn a_buffer_that_refuses_keeps_the_oldest() {
        let now = Instant::now();
        let mut buffer = Buffer::new(2, WhenFull::Refuse);
        assert_eq!(buffer.push("ch", entry(0, None), now), Ok(()));
        assert_eq!(buffer.push("ch", entry(1, None), now), Ok(()));
        assert_eq!(buffer.push("ch", entry(2, None), now), Err(Full));
        buffer.waiting = 2;
        assert_eq!(n(buffer.hand_over(now)), Some(0));
        assert_eq!(n(buffer.hand_over(now)), Some(1));
        assert_eq!(
            buffer.waiting, 0,
            "each receiver stops waiting as it takes one"
        );
        assert!(buffer.hand_over(now).is_none());
    }

    #[test]
    fn a_buffer_that_drops_keeps_the_newest() {
        let now = Instant::now();
        let mut buffer = Buffer::new(2, WhenFull::DropOldest);
        for i in 0..5 {
            assert_eq!(buffer.push("ch", entry(i, None), now), Ok(()));
        }
        assert_eq!(n(buffer.hand_over(now)), Some(3));
        assert_eq!(n(buffer.hand_over(now)), Some(4));
        assert!(buffer.hand_over(now).is_none());
    }

    #[test]
    fn falling_behind_is_one_episode_until_the_buffer_drains() {
        let now = Instant::now();
        let mut buffer = Buffer::new(2, WhenFull::Refuse);
        buffer.push("ch", entry(0, None), now).unwrap();
        buffer.push("ch", entry(1, None), now).unwrap();
        assert!(buffer.falling_behind(), "the first refusal starts it");
        assert!(!buffer.falling_behind());
        buffer.hand_over(now);
        assert!(
            !buffer.falling_behind(),
            "one message behind is still behind"
        );
        buffer.hand_over(now);
        assert!(
            buffer.falling_behind(),
            "drained, then behind again: a new one"
        );
    }

    #[test]
    fn expired_messages_are_never_handed_over() {
        let now = Instant::now();
        let soon = now + Duration::from_secs(1);
        let mut buffer = Buffer::new(10, WhenFull::Refuse);
        buffer.push("ch", entry(1, Some(soon)), now).unwrap();
        buffer.push("ch", entry(2, None), now).unwrap();
        assert_eq!(n(buffer.hand_over(soon)), Some(2), "1 expired at `soon`");
        buffer.push("ch", entry(3, Some(soon)), now).unwrap();
        assert!(
            !buffer.sweep(soon),
            "empty and nobody waits: not worth keeping"
        );
    }

    #[test]
    fn demand_counts_receivers_waiting_on_empty_buffers() {
        let now = Instant::now();
        let demand = Arc::new(Demand::default());
        let mut a: Buffer = Buffer::new(5, WhenFull::DropOldest).with_demand(Arc::clone(&demand));
        let mut b: Buffer = Buffer::new(5, WhenFull::DropOldest).with_demand(Arc::clone(&demand));
        a.wait();
        b.wait();
        b.wait();
        assert_eq!(demand.hungry(), 2, "buffers, not receivers");
        b.push("b", entry(1, None), now).unwrap();
        assert_eq!(demand.hungry(), 1, "b has something for its receivers");
        assert_eq!(n(b.hand_over(now)), Some(1));
        assert_eq!(demand.hungry(), 2, "b's other receiver still waits");
        a.stop_waiting();
        assert_eq!(demand.hungry(), 1);
        drop(b);
        assert_eq!(demand.hungry(), 0, "a dropped buffer is no longer counted");
    }

    #[tokio::test]
    async fn a_receiver_waits_for_a_message_and_a_dropped_one_stops_waiting() {
        let state = Locked::<State>::default();
        let start = || {
            let mut locked = state.lock();
            let buffer = locked.buffers().open("ch", || 10);
            Receiver::new(&state, "ch", buffer)
        };
        let cancelled = tokio::time::timeout(Duration::from_millis(1), start().next());
        assert!(cancelled.await.is_err(), "nothing to receive yet");
        assert!(
            !state.lock().buffers().get("ch").unwrap().is_waited_on(),
            "the cancelled receive no longer counts as waiting"
        );

        let waiter = start().next();
        let sender = async {
            tokio::task::yield_now().await;
            let mut locked = state.lock();
            let buffer = locked.buffers().get_mut("ch").unwrap();
            buffer.push("ch", entry(7, None), Instant::now()).unwrap();
        };
        let (got, ()) = tokio::join!(waiter, sender);
        assert_eq!(got.message["n"], 7);
        assert!(!state.lock().buffers().get("ch").unwrap().is_waited_on());
    }

    #[test]
    fn a_shared_message_is_cloned_out_only_while_shared() {
        let message = Arc::new(json!({"type": "t"}).as_object().unwrap().clone());
        let first = Entry::new(Arc::clone(&message), None);
        let second = Entry::new(message, None);
        let copy = first.into_message();
        assert_eq!(Arc::strong_count(&second.message), 1);
        assert_eq!(second.into_message(), copy);
    }
}
