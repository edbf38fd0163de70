//! The in-memory channel layer: every channel and group lives in this process.
//!
//! It needs no service, so every step runs with it out of the box, and it is
//! the reference the other backends are tested against. Its limits keep
//! memory bounded whatever senders do:
//!
//! - **capacity**: a channel holds at most [`MemoryConfig::capacity`]
//!   messages (default 100, or per channel name pattern); one more is refused
//!   with [`LayerError::ChannelFull`];
//! - **expiry**: a message nobody receives within [`MemoryConfig::expiry`]
//!   (default 60 s) is dropped;
//! - **group expiry**: a membership not renewed within
//!   [`MemoryConfig::group_expiry`] (default one day) lapses, so a channel
//!   whose consumer died without leaving stops getting group messages.
//!
//! Expired messages, lapsed memberships and empty channels are swept at most
//! once a second, during sends, so the cost is spread out and no background
//! task is needed. Time is tokio's, so tests can pause it.
//!
//! Every limit has a range (durations above zero and at most
//! [`MAX_EXPIRY`], capacities at least 1): [`InMemoryLayer::try_new`]
//! refuses a configuration outside it, [`InMemoryLayer::new`] moves it
//! into it with one warning, so no configuration can make a call panic.
//!
//! # Why a `std::sync::Mutex` in async code
//!
//! All state sits behind one [`std::sync::Mutex`], not tokio's async mutex.
//! That is the right choice here, and the reason is the rule chapter 1 warns
//! about: a `std` guard must never be held across an `.await`, because the
//! task could be suspended while holding it and block every other task
//! that wants the lock (and a `std` guard is not `Send`, so the compiler
//! refuses such a future in `tokio::spawn` anyway). Every method below takes
//! the lock, does a few map operations, and drops the guard *before* it
//! awaits anything; the only await, in [`receive`](ChannelLayer::receive),
//! happens after the guard's block has ended. A lock held for microseconds
//! and never across an await is cheaper as a plain mutex: tokio's own
//! documentation recommends exactly this for shared data.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::episode::Episode;
use super::{
    ChannelLayer, LayerError, LayerMessage, MAX_EXPIRY, names, validate_channel_name,
    validate_group_name,
};

/// How often expired entries are swept out.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The shortest `expiry` or `group_expiry`: anything above zero (a zero
/// expiry would drop every message as it arrives).
const MIN_EXPIRY: Duration = Duration::from_millis(1);

/// The in-memory layer's limits.
///
/// Ranges: `expiry` and `group_expiry` from 1 ms to [`MAX_EXPIRY`] (10
/// years), capacities at least 1 (and as large as you like: nothing is
/// allocated up front).
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// Messages a channel may hold (default 100).
    pub capacity: usize,
    /// Capacity for channels whose name matches a pattern, first match wins.
    /// Patterns are Python's `fnmatch` globs, as on the Redis layers: `*`
    /// (any run of characters), `?` (one character) and `[...]` / `[!...]`
    /// (a character class), e.g. `("background-jobs*", 1000)` or
    /// `("*.jobs", 1000)`.
    pub channel_capacity: Vec<(String, usize)>,
    /// How long a message waits to be received before it is dropped
    /// (default 60 s).
    pub expiry: Duration,
    /// How long a group membership lasts unless renewed (default one day).
    pub group_expiry: Duration,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            capacity: 100,
            channel_capacity: Vec::new(),
            expiry: Duration::from_secs(60),
            group_expiry: Duration::from_secs(24 * 60 * 60),
        }
    }
}

impl MemoryConfig {
    /// Checks every limit against its range; the error names the first
    /// one outside it.
    pub fn validate(&self) -> Result<(), LayerError> {
        for (field, value) in [("expiry", self.expiry), ("group_expiry", self.group_expiry)] {
            if !(MIN_EXPIRY..=MAX_EXPIRY).contains(&value) {
                return Err(LayerError::invalid_config(
                    field,
                    format!("must be between 1 ms and 10 years, not {value:?}"),
                ));
            }
        }
        if self.capacity == 0 {
            return Err(LayerError::invalid_config(
                "capacity",
                "must be at least 1, not 0",
            ));
        }
        if let Some((pattern, _)) = self.channel_capacity.iter().find(|(_, c)| *c == 0) {
            return Err(LayerError::invalid_config(
                "channel_capacity",
                format!("of {pattern:?} must be at least 1, not 0"),
            ));
        }
        Ok(())
    }

    /// This configuration with every limit moved into its range, and the
    /// names of the limits that moved.
    fn clamped(mut self) -> (Self, Vec<&'static str>) {
        let mut moved = Vec::new();
        for (field, value) in [
            ("expiry", &mut self.expiry),
            ("group_expiry", &mut self.group_expiry),
        ] {
            let clamped = (*value).clamp(MIN_EXPIRY, MAX_EXPIRY);
            if clamped != *value {
                *value = clamped;
                moved.push(field);
            }
        }
        if self.capacity == 0 {
            self.capacity = 1;
            moved.push("capacity");
        }
        if self.channel_capacity.iter().any(|(_, c)| *c == 0) {
            for (_, capacity) in &mut self.channel_capacity {
                *capacity = (*capacity).max(1);
            }
            moved.push("channel_capacity");
        }
        (self, moved)
    }

    fn capacity_of(&self, channel: &str) -> usize {
        names::capacity_of(&self.channel_capacity, self.capacity, channel)
    }
}

/// Channels and groups inside this process.
pub struct InMemoryLayer {
    config: MemoryConfig,
    state: Mutex<State>,
    next_id: AtomicU64,
    /// What every channel name this layer makes contains, e.g.
    /// `.inmemory!5e0c71a2`: random per layer, as Django's names are.
    marker: String,
}

#[derive(Default)]
struct State {
    channels: HashMap<String, Channel>,
    /// Channels made by `new_channel` and not closed yet. A send to one of
    /// this layer's own names that is not here goes to a connection that has
    /// ended, so it is dropped rather than kept until it expires.
    open: HashSet<String>,
    /// Group name → member channel → when the membership lapses.
    groups: HashMap<String, HashMap<String, Instant>>,
    last_sweep: Option<Instant>,
}

#[derive(Default)]
struct Channel {
    /// Messages with the moment each one expires, oldest first.
    queue: VecDeque<(Instant, LayerMessage)>,
    /// Wakes the receiver when a message arrives.
    arrived: Arc<Notify>,
    /// Receivers waiting right now; a channel with one is never swept away,
    /// or its receiver would wait on a `Notify` nobody can reach.
    waiting: usize,
    /// Going on while the channel drops group messages, so a receiver that
    /// falls behind costs one log line rather than one per dropped message.
    /// It ends only once the receiver has caught up (its channel is empty
    /// again): a receiver that stays just behind, taking one message while
    /// the room sends ten, is still one episode.
    full: Episode,
}

impl Channel {
    fn drop_expired(&mut self, now: Instant) {
        while self
            .queue
            .front()
            .is_some_and(|(expires, _)| *expires <= now)
        {
            self.queue.pop_front();
        }
    }
}

impl Default for InMemoryLayer {
    fn default() -> Self {
        InMemoryLayer::new(MemoryConfig::default())
    }
}

impl InMemoryLayer {
    /// A layer with the given limits. A limit outside its range (see
    /// [`MemoryConfig`]) is moved to the nearest end of it, with one
    /// warning; use [`try_new`](Self::try_new) to refuse it instead.
    pub fn new(config: MemoryConfig) -> Self {
        let (config, moved) = config.clamped();
        if !moved.is_empty() {
            tracing::warn!(
                settings = moved.join(", "),
                "MemoryConfig out of range: moved into range \
                 (durations 1 ms to 10 years, capacities at least 1)"
            );
        }
        Self::build(config)
    }

    /// A layer with the given limits, or [`LayerError::InvalidConfig`]
    /// naming the first limit outside its range.
    pub fn try_new(config: MemoryConfig) -> Result<Self, LayerError> {
        config.validate()?;
        Ok(Self::build(config))
    }

    fn build(config: MemoryConfig) -> Self {
        InMemoryLayer {
            config,
            state: Mutex::default(),
            next_id: AtomicU64::new(0),
            marker: format!(".inmemory!{:08x}", RandomState::new().hash_one(0u8) as u32),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps inconsistent
        // (every update is a single insert or remove), so carry on.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Puts a message in a channel of a locked state.
    fn push(
        &self,
        state: &mut State,
        channel: &str,
        message: LayerMessage,
        now: Instant,
    ) -> Result<(), LayerError> {
        let entry = state.channels.entry(channel.to_owned()).or_default();
        entry.drop_expired(now);
        if entry.queue.len() >= self.config.capacity_of(channel) {
            metrics::counter!("axum_channels_layer_channel_full_total").increment(1);
            return Err(LayerError::ChannelFull {
                channel: channel.to_owned(),
            });
        }
        if entry.queue.is_empty() {
            entry.full.end();
        }
        entry
            .queue
            .push_back((deadline(now, self.config.expiry), message));
        entry.arrived.notify_one();
        Ok(())
    }

    fn sweep_if_due(state: &mut State, now: Instant) {
        if state
            .last_sweep
            .is_some_and(|last| now.saturating_duration_since(last) < SWEEP_INTERVAL)
        {
            return;
        }
        state.last_sweep = Some(now);
        state.channels.retain(|_, channel| {
            channel.drop_expired(now);
            !channel.queue.is_empty() || channel.waiting > 0
        });
        state.groups.retain(|_, members| {
            members.retain(|_, lapses| *lapses > now);
            !members.is_empty()
        });
    }

    /// How many channels and groups the layer holds right now (for tests and
    /// for watching memory).
    pub fn size(&self) -> (usize, usize) {
        let state = self.lock();
        (state.channels.len(), state.groups.len())
    }
}

/// `now + lifetime`, or the latest moment the clock can hold if that is
/// past it: a deadline is never a panic. (With lifetimes bounded by
/// [`MAX_EXPIRY`] the first try always fits; this is the belt to that
/// pair of braces.)
fn deadline(now: Instant, mut lifetime: Duration) -> Instant {
    loop {
        if let Some(deadline) = now.checked_add(lifetime) {
            return deadline;
        }
        lifetime /= 2;
    }
}

/// Counts a receiver as waiting on a channel for as long as it lives, also
/// when its future is dropped half-way (a `select!` picked another branch).
struct Waiting<'a> {
    layer: &'a InMemoryLayer,
    channel: &'a str,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(channel) = self.layer.lock().channels.get_mut(self.channel) {
            channel.waiting -= 1;
        }
    }
}

#[async_trait]
impl ChannelLayer for InMemoryLayer {
    async fn new_channel(&self, prefix: &str) -> Result<String, LayerError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}{}{id:x}", self.marker);
        // A prefix with its own '!' makes a name with two, which this refuses.
        validate_channel_name(&name)?;
        self.lock().open.insert(name.clone());
        Ok(name)
    }

    async fn send(&self, channel: &str, message: LayerMessage) -> Result<(), LayerError> {
        validate_channel_name(channel)?;
        let now = Instant::now();
        let mut state = self.lock();
        if channel.contains(&self.marker) && !state.open.contains(channel) {
            // E.g. a job's result for a client that left before it was done.
            tracing::debug!(channel, "dropped a message for a channel that is closed");
            return Ok(());
        }
        Self::sweep_if_due(&mut state, now);
        self.push(&mut state, channel, message, now)
    }

    async fn receive(&self, channel: &str) -> Result<LayerMessage, LayerError> {
        validate_channel_name(channel)?;
        let arrived = {
            let mut state = self.lock();
            let entry = state.channels.entry(channel.to_owned()).or_default();
            entry.waiting += 1;
            Arc::clone(&entry.arrived)
        };
        let _waiting = Waiting {
            layer: self,
            channel,
        };
        loop {
            // Register for a wake-up before looking, so a message that
            // arrives in between is not missed.
            let notified = arrived.notified();
            {
                let now = Instant::now();
                let mut state = self.lock();
                if let Some(entry) = state.channels.get_mut(channel) {
                    entry.drop_expired(now);
                    if let Some((_, message)) = entry.queue.pop_front() {
                        return Ok(message);
                    }
                }
            }
            notified.await;
        }
    }

    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        validate_group_name(group)?;
        validate_channel_name(channel)?;
        let lapses = deadline(Instant::now(), self.config.group_expiry);
        self.lock()
            .groups
            .entry(group.to_owned())
            .or_default()
            .insert(channel.to_owned(), lapses);
        Ok(())
    }

    async fn group_discard(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        validate_group_name(group)?;
        validate_channel_name(channel)?;
        let mut state = self.lock();
        if let Some(members) = state.groups.get_mut(group) {
            members.remove(channel);
            if members.is_empty() {
                state.groups.remove(group);
            }
        }
        Ok(())
    }

    async fn group_send(&self, group: &str, message: LayerMessage) -> Result<(), LayerError> {
        validate_group_name(group)?;
        let now = Instant::now();
        let mut state = self.lock();
        Self::sweep_if_due(&mut state, now);
        let members: Vec<String> = match state.groups.get_mut(group) {
            Some(members) => {
                members.retain(|_, lapses| *lapses > now);
                members.keys().cloned().collect()
            }
            None => return Ok(()),
        };
        for channel in members {
            if let Err(err) = self.push(&mut state, &channel, message.clone(), now)
                && let Some(entry) = state.channels.get_mut(&channel)
                && entry.full.start()
            {
                tracing::warn!(
                    group,
                    %err,
                    "dropping group messages for a member that does not keep up \
                     (reported once until it catches up)"
                );
            }
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), LayerError> {
        let mut state = self.lock();
        state.groups.clear();
        // Keep channels someone is waiting on (their receivers hold the
        // `Notify`), but empty them.
        state.channels.retain(|_, channel| {
            channel.queue.clear();
            channel.waiting > 0
        });
        Ok(())
    }

    fn group_expiry(&self) -> Option<Duration> {
        Some(self.config.group_expiry)
    }

    async fn close_channel(&self, channel: &str) -> Result<(), LayerError> {
        validate_channel_name(channel)?;
        let mut state = self.lock();
        if state
            .channels
            .get(channel)
            .is_some_and(|entry| entry.waiting > 0)
        {
            return Ok(()); // someone still receives on it
        }
        state.open.remove(channel);
        state.channels.remove(channel);
        // Left in a group, the channel would be recreated by the next group
        // message and fill up with messages nobody reads.
        state.groups.retain(|_, members| {
            members.remove(channel);
            !members.is_empty()
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use serde_json::json;

    use super::*;

    /// Collects what `tracing` writes, to count log lines.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> usize {
            String::from_utf8_lossy(&self.0.lock().unwrap())
                .lines()
                .count()
        }
    }

    #[tokio::test]
    async fn a_send_to_a_closed_channel_costs_nothing() {
        let layer = InMemoryLayer::default();
        let channel = layer.new_channel("specific").await.unwrap();
        let message = json!({"type": "job_result"}).as_object().unwrap().clone();
        layer.send(&channel, message.clone()).await.unwrap();
        assert_eq!(layer.size(), (1, 0));
        layer.close_channel(&channel).await.unwrap();
        assert_eq!(layer.size(), (0, 0));

        // The client left before its result: the send succeeds, and nothing
        // is kept for a receiver that will never come.
        layer.send(&channel, message.clone()).await.unwrap();
        assert_eq!(layer.size(), (0, 0));
        // Names the layer did not make are still created on demand, as in
        // Django (a worker's plain channel, say).
        layer.send("worker.jobs", message).await.unwrap();
        assert_eq!(layer.size(), (1, 0));
    }

    #[tokio::test]
    async fn limits_out_of_range_are_moved_into_it_with_one_warning() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let config = MemoryConfig {
            capacity: 0,
            expiry: Duration::MAX,
            group_expiry: Duration::ZERO,
            ..MemoryConfig::default()
        };
        let err = InMemoryLayer::try_new(config.clone()).err().unwrap();
        assert!(
            matches!(
                err,
                LayerError::InvalidConfig {
                    field: "expiry",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(captured.lines(), 0);

        let layer = InMemoryLayer::new(config);
        assert_eq!(captured.lines(), 1, "one warning for three settings");
        let logged = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
        assert!(
            logged.contains("expiry, group_expiry, capacity"),
            "{logged}"
        );
        assert_eq!(layer.config.expiry, MAX_EXPIRY);
        assert_eq!(layer.group_expiry(), Some(MIN_EXPIRY));
        let message = json!({"type": "t"}).as_object().unwrap().clone();
        layer.send("ch", message.clone()).await.unwrap();
        assert_eq!(layer.receive("ch").await.unwrap(), message);
    }

    #[tokio::test]
    async fn capacity_patterns_are_fnmatch_as_on_redis() {
        let layer = InMemoryLayer::new(MemoryConfig {
            capacity: 5,
            channel_capacity: vec![("*.jobs".into(), 1), ("room_[0-9]".into(), 2)],
            ..MemoryConfig::default()
        });
        let message = json!({"type": "t"}).as_object().unwrap().clone();
        for (channel, capacity) in [("worker.jobs", 1), ("room_7", 2), ("room_x", 5)] {
            for _ in 0..capacity {
                layer.send(channel, message.clone()).await.unwrap();
            }
            let refused = layer.send(channel, message.clone()).await;
            assert!(
                matches!(refused, Err(LayerError::ChannelFull { .. })),
                "{channel} holds {capacity}: {refused:?}"
            );
        }
    }

    #[test]
    fn a_deadline_past_the_clock_is_the_latest_it_can_hold() {
        let now = Instant::now();
        assert_eq!(
            deadline(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
        assert!(deadline(now, Duration::MAX) > now + MAX_EXPIRY);
    }

    #[tokio::test]
    async fn a_member_that_does_not_keep_up_is_reported_once_per_episode() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let layer = InMemoryLayer::new(MemoryConfig {
            capacity: 2,
            ..MemoryConfig::default()
        });
        layer.group_add("room", "slow").await.unwrap();
        let message = json!({"type": "chat"}).as_object().unwrap().clone();
        for _ in 0..5 {
            layer.group_send("room", message.clone()).await.unwrap();
        }
        assert_eq!(captured.lines(), 1, "three drops, one report");

        // It takes one message while the room keeps talking: still behind,
        // still the same episode, however many messages it misses.
        for _ in 0..10 {
            layer.receive("slow").await.unwrap();
            layer.group_send("room", message.clone()).await.unwrap();
            layer.group_send("room", message.clone()).await.unwrap();
        }
        assert_eq!(captured.lines(), 1, "staying behind is one episode");

        // It catches up: it takes the two messages its channel holds...
        layer.receive("slow").await.unwrap();
        layer.receive("slow").await.unwrap();
        for _ in 0..3 {
            layer.group_send("room", message.clone()).await.unwrap();
        }
        assert_eq!(
            captured.lines(),
            2,
            "...and falls behind again: one more report"
        );
    }
}
