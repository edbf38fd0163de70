//! Presence and history for rooms: who is in a room across every server,
//! what was said before you came, and what you missed while you were away.
//!
//! Two stores, each with an in-memory backend (one process) and a Redis
//! backend (`layer::redis::{RedisPresence, RedisHistory}`, every process on
//! one Redis):
//!
//! - [`HistoryStore`]: the room's last N messages. Each message gets a
//!   [`Position`]: an `offset` (1, 2, 3, ... per room, never reused) and the
//!   `epoch` of the history that numbered it. A client that comes back with
//!   the position of the last message it saw gets exactly what it missed
//!   ([`HistoryStore::recover`]), or is told that it is gone (the history
//!   kept fewer, or the epoch changed because the history was lost), and
//!   then gets the latest N. This is Centrifugo's history and recovery.
//! - [`PresenceStore`]: the room's members by name. A name with two
//!   connections (two tabs) is one member; it leaves when its last
//!   connection goes. On Redis each connection's entry carries a deadline
//!   that its server renews (a heartbeat); a server that dies stops renewing,
//!   and the next sweep by any other server removes its entries. This is
//!   Phoenix Presence's promise, with entries in Redis instead of a CRDT.
//!
//! [`Presence`] is what a consumer uses: one per process, it registers a
//! connection ([`Presence::join`], which hands back a [`PresenceGuard`] whose
//! `Drop` leaves), renews the process's entries, and batches joins and leaves
//! into one `presence_diff` per room per flush interval, sent to the room's
//! group through the channel layer. A join storm of thousands is then a few
//! frames per member, not one per join.
//!
//! Live messages reach a member through the channel layer, which may lose
//! one (pub/sub) or deliver two servers' messages out of order. A
//! [`Cursor`] per connection puts that right: a message it has seen is
//! dropped, the next one is delivered, and after a gap the missing ones are
//! read from the history first ([`History::catch_up`]). So a member sees
//! every message once, in offset order, history and live alike.

mod memory;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

use crate::layer::{ChannelLayer, LayerError, Locked};
use crate::runtime::Runtime;

pub use memory::{MAX_HISTORY_ROOMS, MemoryHistory, MemoryPresence};

/// Where a message sits in its room's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// 1 for the room's first message, then 2, 3, ...
    pub offset: u64,
    /// Names the history that gave out this offset. A history that was lost
    /// (a Redis restarted without persistence, a process restarted with the
    /// in-memory store, a room the in-memory store dropped to keep a newer
    /// one) starts again at offset 1 under a new epoch, so an
    /// old offset is never mistaken for a new message.
    pub epoch: String,
}

/// One message of a room's history: its position and what was said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// As in [`Position`].
    pub offset: u64,
    /// As in [`Position`].
    pub epoch: String,
    /// The message's own fields, e.g. `{"name": "alice", "text": "hi"}`.
    #[serde(flatten)]
    pub data: Map<String, Value>,
}

impl Entry {
    /// This entry's position.
    pub fn position(&self) -> Position {
        Position {
            offset: self.offset,
            epoch: self.epoch.clone(),
        }
    }
}

/// What [`HistoryStore::recover`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    /// The history's current epoch.
    pub epoch: String,
    /// The offset of the room's newest message (0 before the first).
    pub top: u64,
    /// Whether `entries` are exactly the messages after the position asked
    /// for. `false` when no position was given, when its epoch is not the
    /// current one, or when some of what followed it is no longer kept:
    /// then `entries` are the latest N.
    pub recovered: bool,
    /// Oldest first.
    pub entries: Vec<Entry>,
}

/// A bounded history per room. Implemented by [`MemoryHistory`] and, with
/// the `redis` feature, `layer::redis::RedisHistory`.
///
/// `#[async_trait]` for the same reason as
/// [`ChannelLayer`]: apps hold it as
/// `Arc<dyn HistoryStore>`, chosen at start.
#[async_trait]
pub trait HistoryStore: Send + Sync + 'static {
    /// Appends a message to `room` and returns it with its position.
    async fn append(&self, room: &str, data: Map<String, Value>) -> Result<Entry, LayerError>;

    /// What followed `since` in `room` (see [`Recovery`]), or with no
    /// `since`, the latest N.
    async fn recover(&self, room: &str, since: Option<&Position>) -> Result<Recovery, LayerError>;
}

/// What a connection's [`Cursor`] makes of a live message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The message right after the last one delivered: deliver it.
    Next,
    /// Delivered already (from the history, or twice by the layer): drop it.
    Seen,
    /// Messages are missing before it (lost or late on the layer, or a new
    /// epoch): read them from the history first.
    Gap,
}

/// The position of the last message a connection has delivered to its
/// client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    position: Position,
}

impl Cursor {
    /// A cursor after `recovery`: its newest entry, or the room's top.
    pub fn after(recovery: &Recovery) -> Cursor {
        let offset = recovery.entries.last().map_or(recovery.top, |e| e.offset);
        Cursor {
            position: Position {
                offset: offset.max(recovery.top),
                epoch: recovery.epoch.clone(),
            },
        }
    }

    /// The last position delivered.
    pub fn position(&self) -> &Position {
        &self.position
    }

    /// What to do with `entry`; [`Admit::Next`] moves the cursor to it.
    pub fn admit(&mut self, entry: &Entry) -> Admit {
        if entry.epoch != self.position.epoch {
            return Admit::Gap;
        }
        if entry.offset <= self.position.offset {
            Admit::Seen
        } else if entry.offset == self.position.offset + 1 {
            self.position.offset = entry.offset;
            Admit::Next
        } else {
            Admit::Gap
        }
    }
}

/// The room history an app uses, with the catch-up logic of [`Cursor`].
/// Cheap to clone.
#[derive(Clone)]
pub struct History {
    store: Arc<dyn HistoryStore>,
}

impl History {
    /// Uses `store`.
    pub fn new(store: Arc<dyn HistoryStore>) -> History {
        History { store }
    }

    /// A history of the last `size` messages per room, in this process.
    pub fn in_memory(size: usize) -> History {
        History::new(Arc::new(MemoryHistory::new(size)))
    }

    /// As [`HistoryStore::append`].
    pub async fn append(&self, room: &str, data: Map<String, Value>) -> Result<Entry, LayerError> {
        self.store.append(room, data).await
    }

    /// As [`HistoryStore::recover`].
    pub async fn recover(
        &self,
        room: &str,
        since: Option<&Position>,
    ) -> Result<Recovery, LayerError> {
        self.store.recover(room, since).await
    }

    /// The messages to deliver, in order, now that `entry` arrived live:
    /// none if the cursor has seen it, `entry` if it is the next, and after
    /// a gap everything from the history since the cursor (which includes
    /// `entry`, appended before it was sent). Moves the cursor past what it
    /// returns.
    pub async fn catch_up(
        &self,
        room: &str,
        cursor: &mut Cursor,
        entry: Entry,
    ) -> Result<Vec<Entry>, LayerError> {
        match cursor.admit(&entry) {
            Admit::Next => Ok(vec![entry]),
            Admit::Seen => Ok(Vec::new()),
            Admit::Gap => {
                let recovery = self.store.recover(room, Some(cursor.position())).await?;
                if !recovery.recovered {
                    tracing::debug!(room, "a gap older than the history: the latest are sent");
                }
                *cursor = Cursor::after(&recovery);
                Ok(recovery.entries)
            }
        }
    }
}

/// What [`PresenceStore::join`] tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// Whether this was the name's first connection in the room (the name
    /// joined).
    pub first: bool,
    /// The room's presence version after the join (see
    /// [`PresenceStore::present`]).
    pub version: u64,
    /// Everyone in the room now, this name included, sorted.
    pub members: Vec<String>,
    /// Names whose last entry had expired (their server died), found and
    /// removed on the way: they must be announced as leaves.
    pub expired: Vec<String>,
}

/// Who is in which room, by name, with a connection count per name.
/// Implemented by [`MemoryPresence`] and, with the `redis` feature,
/// `layer::redis::RedisPresence`. `room` is the room's group name.
///
/// Every call also sweeps: entries past their deadline are removed, and
/// names left with no connection come back in `expired` (each one to
/// exactly one caller), so that somebody announces their leave.
#[async_trait]
pub trait PresenceStore: Send + Sync + 'static {
    /// Adds connection `conn` of `name`.
    async fn join(&self, room: &str, name: &str, conn: &str) -> Result<Joined, LayerError>;

    /// Removes connection `conn` of `name`. Returns whether it was the
    /// name's last (the name left), and the expired names.
    async fn leave(
        &self,
        room: &str,
        name: &str,
        conn: &str,
    ) -> Result<(bool, Vec<String>), LayerError>;

    /// Renews the deadlines of this process's connections in `room`
    /// (`(name, conn)` pairs), adding any that had expired meanwhile.
    /// Returns the names that came back with them, and the expired names.
    async fn heartbeat(
        &self,
        room: &str,
        conns: &[(String, String)],
    ) -> Result<(Vec<String>, Vec<String>), LayerError>;

    /// Which of `names` are in the room now, with the room's version: a
    /// number that grows with every join and leave, so that of two answers
    /// the one with the higher version is the newer. Also the expired names.
    async fn present(
        &self,
        room: &str,
        names: &[String],
    ) -> Result<(u64, Vec<bool>, Vec<String>), LayerError>;
}

/// How presence is kept: how often a process renews its entries, how long
/// an entry lives without renewal, and how often joins and leaves are sent.
///
/// A server that dies leaves its entries behind; another server removes
/// them at its first heartbeat after they expire, and announces the leaves
/// at its next flush. So a dead server's members are gone from every list
/// within `ttl + heartbeat + flush`: 20.25 s with the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceConfig {
    /// How often this process renews its entries and sweeps expired ones:
    /// 5 s.
    pub heartbeat: Duration,
    /// How long an entry lives without renewal: 15 s (three heartbeats, so
    /// one slow heartbeat is not a leave).
    pub ttl: Duration,
    /// How long joins and leaves are gathered before one `presence_diff`
    /// per room goes out: 250 ms.
    pub flush: Duration,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            heartbeat: Duration::from_secs(5),
            ttl: Duration::from_secs(15),
            flush: Duration::from_millis(250),
        }
    }
}

impl PresenceConfig {
    /// Refuses settings under which entries would expire while their
    /// server lives: `ttl` must exceed `heartbeat`, and none may be zero.
    pub fn validate(&self) -> Result<(), LayerError> {
        if self.heartbeat.is_zero() || self.flush.is_zero() {
            return Err(LayerError::invalid_config(
                "presence",
                "heartbeat and flush intervals must be above zero",
            ));
        }
        if self.ttl <= self.heartbeat {
            return Err(LayerError::invalid_config(
                "presence",
                format!(
                    "ttl ({:?}) must be longer than the heartbeat ({:?})",
                    self.ttl, self.heartbeat
                ),
            ));
        }
        Ok(())
    }

    /// The longest a dead server's member stays in the others' lists.
    pub fn bound(&self) -> Duration {
        self.ttl
            .saturating_add(self.heartbeat)
            .saturating_add(self.flush)
    }
}

/// What goes to a room's group: `{"type": "presence_diff", "version": 7,
/// "joins": ["carol"], "leaves": ["bob"]}`. A client applies a name's change
/// only if the diff's version is above the one it holds for that name (from
/// an earlier diff, or from its `presence_state`): diffs from two servers
/// may arrive out of order, versions put them right.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceDiff {
    /// The room's presence version when the diff was read.
    pub version: u64,
    /// Names now present.
    pub joins: Vec<String>,
    /// Names now gone.
    pub leaves: Vec<String>,
}

/// Commands for the process's presence task.
enum Command {
    Joined {
        room: String,
        name: String,
        conn: String,
        changed: Vec<String>,
    },
    Left {
        room: String,
        name: String,
        conn: String,
    },
}

/// The presence of this process's connections: one per process, cheap to
/// clone. Its task renews entries, sweeps, and sends the batched diffs; it
/// ends when the last clone and the last guard are dropped.
#[derive(Clone)]
pub struct Presence {
    store: Arc<dyn PresenceStore>,
    commands: mpsc::UnboundedSender<Command>,
}

/// What [`Presence::join`] gives a connection: the room's members, and the
/// guard whose drop removes the connection, however it ends.
pub struct PresenceGuard {
    room: String,
    name: String,
    conn: String,
    commands: mpsc::UnboundedSender<Command>,
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        // Sent to the task, which makes the call: `Drop` cannot await. If
        // the task is gone (the process is stopping), the entry expires.
        let _ = self.commands.send(Command::Left {
            room: std::mem::take(&mut self.room),
            name: std::mem::take(&mut self.name),
            conn: std::mem::take(&mut self.conn),
        });
    }
}

/// A connection's presence in a room: whom to show, and the guard.
pub struct Membership {
    /// The room's members when this connection joined, itself included.
    pub members: Vec<String>,
    /// The room's presence version then.
    pub version: u64,
    /// Leaves the room when dropped.
    pub guard: PresenceGuard,
}

impl Presence {
    /// Keeps presence in `store`, and sends diffs through `layer` to the
    /// room's group. Spawns the process's presence task, so it must be
    /// called within a Tokio runtime.
    pub fn new(
        store: Arc<dyn PresenceStore>,
        layer: Arc<dyn ChannelLayer>,
        config: PresenceConfig,
    ) -> Result<Presence, LayerError> {
        config.validate()?;
        let (commands, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(Arc::clone(&store), layer, config, receiver, None));
        Ok(Presence { store, commands })
    }

    /// As [`new`](Presence::new), with the task on `runtime`, so that a
    /// graceful shutdown waits for it: once the shutdown begins, the task
    /// records the leaves of the closing connections and sends them in one
    /// last diff, instead of leaving their entries to expire (a server that
    /// stops politely leaves no member behind, even for a moment).
    pub fn on_runtime(
        runtime: &Runtime,
        store: Arc<dyn PresenceStore>,
        layer: Arc<dyn ChannelLayer>,
        config: PresenceConfig,
    ) -> Result<Presence, LayerError> {
        config.validate()?;
        let (commands, receiver) = mpsc::unbounded_channel();
        let stopping = Box::pin(runtime.shutting_down());
        runtime.spawn_background(run(
            Arc::clone(&store),
            layer,
            config,
            receiver,
            Some(stopping),
        ));
        Ok(Presence { store, commands })
    }

    /// Presence in this process only: no entry ever expires, since the
    /// process that holds them is the one that would die.
    pub fn in_memory(
        layer: Arc<dyn ChannelLayer>,
        config: PresenceConfig,
    ) -> Result<Presence, LayerError> {
        Presence::new(Arc::new(MemoryPresence::default()), layer, config)
    }

    /// [`in_memory`](Presence::in_memory), on `runtime` (see
    /// [`on_runtime`](Presence::on_runtime)).
    pub fn in_memory_on(
        runtime: &Runtime,
        layer: Arc<dyn ChannelLayer>,
        config: PresenceConfig,
    ) -> Result<Presence, LayerError> {
        Presence::on_runtime(runtime, Arc::new(MemoryPresence::default()), layer, config)
    }

    /// Adds a connection of `name` to `room` (the room's group name). Its
    /// join is announced at the next flush if it is the name's first
    /// connection; its leave when the returned guard is dropped and it was
    /// the name's last.
    pub async fn join(&self, room: &str, name: &str) -> Result<Membership, LayerError> {
        let conn = random_id();
        let joined = self.store.join(room, name, &conn).await?;
        let mut changed = joined.expired;
        if joined.first {
            changed.push(name.to_owned());
        }
        let guard = PresenceGuard {
            room: room.to_owned(),
            name: name.to_owned(),
            conn: conn.clone(),
            commands: self.commands.clone(),
        };
        let _ = self.commands.send(Command::Joined {
            room: room.to_owned(),
            name: name.to_owned(),
            conn,
            changed,
        });
        Ok(Membership {
            members: joined.members,
            version: joined.version,
            guard,
        })
    }
}

/// This process's view of one room.
#[derive(Default)]
struct Local {
    /// conn id → name, for the heartbeat.
    conns: HashMap<String, String>,
    /// Names whose presence changed since the last flush.
    changed: BTreeSet<String>,
}

/// Resolves when the server starts shutting down.
type Stopping = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The presence task: applies commands, renews and sweeps on each
/// heartbeat, and on each flush sends one diff per room that changed. Once
/// `stopping` resolves, it ends as soon as this process has no connection
/// left in any room, after sending their leaves.
async fn run(
    store: Arc<dyn PresenceStore>,
    layer: Arc<dyn ChannelLayer>,
    config: PresenceConfig,
    mut commands: mpsc::UnboundedReceiver<Command>,
    stopping: Option<Stopping>,
) {
    let rooms: Locked<HashMap<String, Local>> = Locked::default();
    let mut heartbeat = tokio::time::interval(config.heartbeat);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut flush = tokio::time::interval(config.flush);
    flush.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stopping = stopping.unwrap_or_else(|| Box::pin(std::future::pending()));
    let mut draining = false;
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else { return };
                apply(&*store, &rooms, command).await;
            }
            _ = heartbeat.tick() => renew(&*store, &rooms).await,
            _ = flush.tick() => send_diffs(&*store, &*layer, &rooms).await,
            _ = &mut stopping, if !draining => draining = true,
        }
        let empty = || rooms.lock().values().all(|local| local.conns.is_empty());
        if draining && empty() {
            send_diffs(&*store, &*layer, &rooms).await;
            return;
        }
    }
}

async fn apply(
    store: &dyn PresenceStore,
    rooms: &Locked<HashMap<String, Local>>,
    command: Command,
) {
    match command {
        Command::Joined {
            room,
            name,
            conn,
            changed,
        } => {
            let mut rooms = rooms.lock();
            let local = rooms.entry(room).or_default();
            local.conns.insert(conn, name);
            local.changed.extend(changed);
        }
        Command::Left { room, name, conn } => {
            let removed = {
                let mut rooms = rooms.lock();
                let local = rooms.entry(room.clone()).or_default();
                local.conns.remove(&conn).is_some()
            };
            if !removed {
                return;
            }
            match store.leave(&room, &name, &conn).await {
                Ok((last, expired)) => {
                    let mut rooms = rooms.lock();
                    let local = rooms.entry(room).or_default();
                    if last {
                        local.changed.insert(name);
                    }
                    local.changed.extend(expired);
                }
                // The entry expires instead, and a sweep announces it.
                Err(err) => tracing::warn!(room, %err, "could not record a leave"),
            }
        }
    }
}

async fn renew(store: &dyn PresenceStore, rooms: &Locked<HashMap<String, Local>>) {
    let work: Vec<(String, Vec<(String, String)>)> = {
        let mut rooms = rooms.lock();
        // A room with no connection here and nothing to announce is
        // forgotten; its entries are others' to renew.
        rooms.retain(|_, local| !local.conns.is_empty() || !local.changed.is_empty());
        rooms
            .iter()
            .map(|(room, local)| {
                let conns = local
                    .conns
                    .iter()
                    .map(|(conn, name)| (name.clone(), conn.clone()))
                    .collect();
                (room.clone(), conns)
            })
            .collect()
    };
    for (room, conns) in work {
        match store.heartbeat(&room, &conns).await {
            Ok((back, expired)) => {
                let mut rooms = rooms.lock();
                let local = rooms.entry(room).or_default();
                local.changed.extend(back);
                local.changed.extend(expired);
            }
            Err(err) => tracing::debug!(room, %err, "presence heartbeat failed"),
        }
    }
}

async fn send_diffs(
    store: &dyn PresenceStore,
    layer: &dyn ChannelLayer,
    rooms: &Locked<HashMap<String, Local>>,
) {
    let work: Vec<(String, Vec<String>)> = {
        let mut rooms = rooms.lock();
        rooms
            .iter_mut()
            .filter(|(_, local)| !local.changed.is_empty())
            .map(|(room, local)| {
                let names = std::mem::take(&mut local.changed);
                (room.clone(), names.into_iter().collect())
            })
            .collect()
    };
    for (room, names) in work {
        // The store says what is true now, not what happened: a name that
        // joined and left within one flush goes out as a leave.
        let (version, present, expired) = match store.present(&room, &names).await {
            Ok(answer) => answer,
            Err(err) => {
                tracing::warn!(room, %err, "could not read presence; the diff waits");
                let mut rooms = rooms.lock();
                rooms.entry(room).or_default().changed.extend(names);
                continue;
            }
        };
        let mut diff = PresenceDiff {
            version,
            joins: Vec::new(),
            leaves: expired,
        };
        for (name, here) in names.into_iter().zip(present) {
            if here {
                diff.joins.push(name);
            } else if !diff.leaves.contains(&name) {
                diff.leaves.push(name);
            }
        }
        let Ok(Value::Object(mut message)) = serde_json::to_value(&diff) else {
            tracing::error!(room, "a presence diff did not serialize to an object");
            continue;
        };
        message.insert("type".into(), Value::from("presence_diff"));
        if let Err(err) = layer.group_send(&room, message).await {
            tracing::warn!(room, %err, "could not send a presence diff");
        }
    }
}

/// A random id of 16 hex digits, for a connection's presence entry or a
/// history's epoch.
pub(crate) fn random_id() -> String {
    // std's `RandomState` is seeded randomly per process and per call.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{:016x}", hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(offset: u64, epoch: &str) -> Entry {
        Entry {
            offset,
            epoch: epoch.into(),
            data: Map::new(),
        }
    }

    #[test]
    fn a_cursor_delivers_each_offset_once_in_order() {
        let mut cursor = Cursor::after(&Recovery {
            epoch: "e".into(),
            top: 3,
            recovered: false,
            entries: vec![entry(2, "e"), entry(3, "e")],
        });
        assert_eq!(cursor.admit(&entry(3, "e")), Admit::Seen);
        assert_eq!(cursor.admit(&entry(4, "e")), Admit::Next);
        assert_eq!(cursor.admit(&entry(4, "e")), Admit::Seen);
        assert_eq!(cursor.admit(&entry(6, "e")), Admit::Gap);
        assert_eq!(cursor.position().offset, 4);
        assert_eq!(cursor.admit(&entry(5, "other")), Admit::Gap);
    }

    #[test]
    fn the_bound_is_ttl_plus_heartbeat_plus_flush() {
        let config = PresenceConfig::default();
        assert_eq!(config.bound(), Duration::from_millis(20_250));
        assert!(config.validate().is_ok());
        let bad = PresenceConfig {
            ttl: Duration::from_secs(5),
            ..config
        };
        assert!(bad.validate().is_err());
    }
}
