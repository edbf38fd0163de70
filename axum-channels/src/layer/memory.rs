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
//! Messages wait in the local buffers every layer shares (`buffers.rs`); a
//! group message is one copy shared by its members.
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

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::buffers::{Entry, Full, HoldsBuffers, LocalBuffers, Locked, Receiver, WhenFull};
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
///
/// `#[non_exhaustive]`: build it from its `Default` and change what you
/// need, with the `with_*` methods or by assigning fields:
///
/// ```
/// # use std::time::Duration;
/// # use axum_channels::layer::{InMemoryLayer, MemoryConfig};
/// let jobs = InMemoryLayer::new(
///     MemoryConfig::default()
///         .with_capacity(1000)
///         .with_expiry(Duration::from_secs(900))
///         .with_channel_capacity("urgent.*", 10),
/// );
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
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

setters!(MemoryConfig {
    with_capacity(capacity: usize),
    with_expiry(expiry: Duration),
    with_group_expiry(group_expiry: Duration),
});

impl MemoryConfig {
    /// Adds a capacity for the channels whose names match `pattern`, after
    /// the patterns already there (see
    /// [`channel_capacity`](Self::channel_capacity)).
    #[must_use]
    pub fn with_channel_capacity(mut self, pattern: impl Into<String>, capacity: usize) -> Self {
        self.channel_capacity.push((pattern.into(), capacity));
        self
    }

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
    state: Locked<State>,
    next_id: AtomicU64,
    /// What every channel name this layer makes contains, e.g.
    /// `.inmemory!5e0c71a2`: random per layer, as Django's names are.
    marker: String,
}

struct State {
    /// A channel's buffer refuses a message past its capacity, so the
    /// sender gets `ChannelFull`.
    buffers: LocalBuffers,
    /// Channels made by `new_channel` and not closed yet. A send to one of
    /// this layer's own names that is not here goes to a connection that has
    /// ended, so it is dropped rather than kept until it expires.
    open: HashSet<String>,
    /// Group name → member channel → when the membership lapses.
    groups: HashMap<String, HashMap<String, Instant>>,
    last_sweep: Option<Instant>,
}

impl Default for State {
    fn default() -> Self {
        State {
            buffers: LocalBuffers::new(WhenFull::Refuse),
            open: HashSet::new(),
            groups: HashMap::new(),
            last_sweep: None,
        }
    }
}

impl HoldsBuffers for State {
    type Extra = ();

    fn buffers(&mut self) -> &mut LocalBuffers {
        &mut self.buffers
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
            state: Locked::default(),
            next_id: AtomicU64::new(0),
            marker: format!(".inmemory!{:08x}", RandomState::new().hash_one(0u8) as u32),
        }
    }

    /// Puts a message in a channel of a locked state, making the channel's
    /// buffer if it has none (a name the layer did not make, e.g. a
    /// worker's plain channel, is created on demand, as in Django).
    fn push(
        &self,
        buffers: &mut LocalBuffers,
        channel: &str,
        message: Arc<LayerMessage>,
        now: Instant,
    ) -> Result<(), LayerError> {
        let expires = deadline(now, self.config.expiry);
        buffers
            .open(channel, || self.config.capacity_of(channel))
            .push(channel, Entry::new(message, Some(expires)), now)
            .map_err(|Full| LayerError::ChannelFull {
                channel: channel.to_owned(),
            })
    }

    /// Starts one receive on `channel`: what `receive` and
    /// `receive_shared` wait on.
    fn next_entry<'a>(
        &'a self,
        channel: &'a str,
    ) -> Result<impl Future<Output = Entry> + 'a, LayerError> {
        let mut state = self.state.lock();
        let buffer = state.buffers.try_open(channel, || {
            validate_channel_name(channel)?;
            Ok::<_, LayerError>(self.config.capacity_of(channel))
        })?;
        Ok(Receiver::new(&self.state, channel, buffer).next())
    }

    fn sweep_if_due(state: &mut State, now: Instant) {
        if state
            .last_sweep
            .is_some_and(|last| now.saturating_duration_since(last) < SWEEP_INTERVAL)
        {
            return;
        }
        state.last_sweep = Some(now);
        state.buffers.retain(|_, buffer| buffer.sweep(now));
        state.groups.retain(|_, members| {
            members.retain(|_, lapses| *lapses > now);
            !members.is_empty()
        });
    }

    /// How many channels and groups the layer holds right now (for tests and
    /// for watching memory).
    pub fn size(&self) -> (usize, usize) {
        let state = self.state.lock();
        (state.buffers.len(), state.groups.len())
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

#[async_trait]
impl ChannelLayer for InMemoryLayer {
    async fn new_channel(&self, prefix: &str) -> Result<String, LayerError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}{}{id:x}", self.marker);
        // A prefix with its own '!' makes a name with two, which this refuses.
        validate_channel_name(&name)?;
        self.state.lock().open.insert(name.clone());
        Ok(name)
    }

    async fn send(&self, channel: &str, message: LayerMessage) -> Result<(), LayerError> {
        validate_channel_name(channel)?;
        let now = Instant::now();
        let mut state = self.state.lock();
        if channel.contains(&self.marker) && !state.open.contains(channel) {
            // E.g. a job's result for a client that left before it was done.
            tracing::debug!(channel, "dropped a message for a channel that is closed");
            return Ok(());
        }
        Self::sweep_if_due(&mut state, now);
        self.push(&mut state.buffers, channel, Arc::new(message), now)
    }

    async fn receive(&self, channel: &str) -> Result<LayerMessage, LayerError> {
        Ok(self.next_entry(channel)?.await.into_message())
    }

    async fn receive_shared(&self, channel: &str) -> Result<Arc<LayerMessage>, LayerError> {
        Ok(self.next_entry(channel)?.await.into_shared())
    }

    fn try_receive(&self, channel: &str) -> Option<Arc<LayerMessage>> {
        let mut state = self.state.lock();
        let buffer = state.buffers.get_mut(channel)?;
        Some(buffer.take_ready(Instant::now())?.into_shared())
    }

    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        validate_group_name(group)?;
        validate_channel_name(channel)?;
        let lapses = deadline(Instant::now(), self.config.group_expiry);
        self.state
            .lock()
            .groups
            .entry(group.to_owned())
            .or_default()
            .insert(channel.to_owned(), lapses);
        Ok(())
    }

    async fn group_discard(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        validate_group_name(group)?;
        validate_channel_name(channel)?;
        let mut state = self.state.lock();
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
        let mut state = self.state.lock();
        Self::sweep_if_due(&mut state, now);
        // Borrowed apart, so the members' names are read in place rather
        // than copied out of the group for every message.
        let State {
            groups, buffers, ..
        } = &mut *state;
        let Some(members) = groups.get_mut(group) else {
            return Ok(());
        };
        members.retain(|_, lapses| *lapses > now);
        // One copy, whatever the number of members.
        let message = Arc::new(message);
        for channel in members.keys() {
            if let Err(err) = self.push(buffers, channel, Arc::clone(&message), now)
                && let Some(buffer) = buffers.get_mut(channel)
                && buffer.falling_behind()
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
        let mut state = self.state.lock();
        state.groups.clear();
        // Keep channels someone is waiting on (their receivers wait on
        // their bells), but empty them.
        state.buffers.retain(|_, buffer| {
            buffer.clear();
            buffer.is_waited_on()
        });
        Ok(())
    }

    fn group_expiry(&self) -> Option<Duration> {
        Some(self.config.group_expiry)
    }

    async fn close_channel(&self, channel: &str) -> Result<(), LayerError> {
        validate_channel_name(channel)?;
        let mut state = self.state.lock();
        if state
            .buffers
            .get(channel)
            .is_some_and(|buffer| buffer.is_waited_on())
        {
            return Ok(()); // someone still receives on it
        }
        state.open.remove(channel);
        state.buffers.remove(channel);
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
    use std::sync::Mutex;

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
        /// Captures this thread's log lines until the guard is dropped.
        fn start() -> (Captured, tracing::subscriber::DefaultGuard) {
            let captured = Captured::default();
            let writer = captured.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish();
            (captured, tracing::subscriber::set_default(subscriber))
        }

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
        let (captured, _guard) = Captured::start();

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
        let (captured, _guard) = Captured::start();

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
