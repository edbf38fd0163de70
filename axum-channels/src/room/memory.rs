//! The in-memory stores: one process's rooms, behind a lock.
//!
//! Nothing here expires: the entries belong to the process that would have
//! to die for them to go stale, and then they go with it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use async_trait::async_trait;
use serde_json::{Map, Value};

use super::{Entry, HistoryStore, Joined, Position, PresenceStore, Recovery, random_id};
use crate::layer::{LayerError, Locked};

/// A ring of the last `size` messages per room.
///
/// One epoch for all its rooms, drawn when it is made: the history lives
/// exactly as long as this value (the process), so a new process is a new
/// epoch, and a room's offsets never start again under the same one. A room
/// gets a ring at its first message, not when somebody only asks, so
/// clients that join rooms and say nothing cost nothing here. Rings are
/// never dropped (that would restart a room's offsets within the epoch):
/// the memory is bounded per room, not in the number of rooms.
#[derive(Debug)]
pub struct MemoryHistory {
    size: usize,
    epoch: String,
    rooms: Locked<HashMap<String, Ring>>,
}

#[derive(Debug, Default)]
struct Ring {
    top: u64,
    entries: VecDeque<Entry>,
}

impl MemoryHistory {
    /// Keeps the last `size` messages of each room (at least one).
    pub fn new(size: usize) -> MemoryHistory {
        MemoryHistory {
            size: size.max(1),
            epoch: random_id(),
            rooms: Locked::default(),
        }
    }
}

#[async_trait]
impl HistoryStore for MemoryHistory {
    async fn append(&self, room: &str, data: Map<String, Value>) -> Result<Entry, LayerError> {
        let mut rooms = self.rooms.lock();
        let ring = rooms.entry(room.to_owned()).or_default();
        ring.top += 1;
        let entry = Entry {
            offset: ring.top,
            epoch: self.epoch.clone(),
            data,
        };
        if ring.entries.len() == self.size {
            ring.entries.pop_front();
        }
        ring.entries.push_back(entry.clone());
        Ok(entry)
    }

    async fn recover(&self, room: &str, since: Option<&Position>) -> Result<Recovery, LayerError> {
        let rooms = self.rooms.lock();
        let empty = Ring::default();
        let ring = rooms.get(room).unwrap_or(&empty);
        let first_kept = ring.entries.front().map_or(ring.top + 1, |e| e.offset);
        let recovered = since.is_some_and(|since| {
            since.epoch == self.epoch && since.offset <= ring.top && since.offset + 1 >= first_kept
        });
        let entries = match since {
            Some(since) if recovered => ring
                .entries
                .iter()
                .filter(|e| e.offset > since.offset)
                .cloned()
                .collect(),
            _ => ring.entries.iter().cloned().collect(),
        };
        Ok(Recovery {
            epoch: self.epoch.clone(),
            top: ring.top,
            recovered,
            entries,
        })
    }
}

/// Who is in which room, in this process.
#[derive(Debug, Default)]
pub struct MemoryPresence {
    rooms: Locked<HashMap<String, RoomPresence>>,
}

#[derive(Debug, Default)]
struct RoomPresence {
    version: u64,
    /// name → its connections. A `BTreeMap` so the members come sorted.
    names: BTreeMap<String, HashSet<String>>,
}

impl MemoryPresence {
    fn with_room<T>(&self, room: &str, f: impl FnOnce(&mut RoomPresence) -> T) -> T {
        let mut rooms = self.rooms.lock();
        let value = f(rooms.entry(room.to_owned()).or_default());
        // An empty room is forgotten (its version with it: a room that
        // comes back starts a new count, and its members' clients start
        // from its new `presence_state`).
        if rooms.get(room).is_some_and(|r| r.names.is_empty()) {
            rooms.remove(room);
        }
        value
    }
}

#[async_trait]
impl PresenceStore for MemoryPresence {
    async fn join(&self, room: &str, name: &str, conn: &str) -> Result<Joined, LayerError> {
        Ok(self.with_room(room, |presence| {
            let conns = presence.names.entry(name.to_owned()).or_default();
            let first = conns.is_empty();
            conns.insert(conn.to_owned());
            if first {
                presence.version += 1;
            }
            Joined {
                first,
                version: presence.version,
                members: presence.names.keys().cloned().collect(),
                expired: Vec::new(),
            }
        }))
    }

    async fn leave(
        &self,
        room: &str,
        name: &str,
        conn: &str,
    ) -> Result<(bool, Vec<String>), LayerError> {
        Ok(self.with_room(room, |presence| {
            let Some(conns) = presence.names.get_mut(name) else {
                return (false, Vec::new());
            };
            let last = conns.remove(conn) && conns.is_empty();
            if conns.is_empty() {
                presence.names.remove(name);
            }
            if last {
                presence.version += 1;
            }
            (last, Vec::new())
        }))
    }

    async fn heartbeat(
        &self,
        _room: &str,
        _conns: &[(String, String)],
    ) -> Result<(Vec<String>, Vec<String>), LayerError> {
        Ok((Vec::new(), Vec::new()))
    }

    async fn present(
        &self,
        room: &str,
        names: &[String],
    ) -> Result<(u64, Vec<bool>, Vec<String>), LayerError> {
        let rooms = self.rooms.lock();
        let Some(presence) = rooms.get(room) else {
            return Ok((0, vec![false; names.len()], Vec::new()));
        };
        let here = names
            .iter()
            .map(|name| presence.names.contains_key(name))
            .collect();
        Ok((presence.version, here, Vec::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said(text: &str) -> Map<String, Value> {
        let mut data = Map::new();
        data.insert("text".into(), Value::from(text));
        data
    }

    #[tokio::test]
    async fn recovery_is_exact_while_kept_and_says_so_when_not() {
        let history = MemoryHistory::new(3);
        let mut last = None;
        for n in 1..=5 {
            last = Some(history.append("r", said(&n.to_string())).await.unwrap());
        }
        let last = last.unwrap();
        // Kept: offsets 3, 4, 5.
        let since = Position {
            offset: 2,
            ..last.position()
        };
        let got = history.recover("r", Some(&since)).await.unwrap();
        assert!(got.recovered);
        assert_eq!(
            got.entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        let since = Position {
            offset: 1,
            ..last.position()
        };
        let got = history.recover("r", Some(&since)).await.unwrap();
        assert!(!got.recovered, "offset 2 is gone");
        assert_eq!(got.entries.len(), 3);
        let since = Position {
            offset: 5,
            ..last.position()
        };
        let got = history.recover("r", Some(&since)).await.unwrap();
        assert!(got.recovered && got.entries.is_empty());
        let since = Position {
            offset: 2,
            epoch: "old".into(),
        };
        assert!(!history.recover("r", Some(&since)).await.unwrap().recovered);
        let since = Position {
            offset: 9,
            ..last.position()
        };
        assert!(!history.recover("r", Some(&since)).await.unwrap().recovered);
    }

    #[tokio::test]
    async fn two_connections_of_one_name_are_one_member() {
        let presence = MemoryPresence::default();
        assert!(presence.join("r", "alice", "a1").await.unwrap().first);
        let second = presence.join("r", "alice", "a2").await.unwrap();
        assert!(!second.first);
        assert_eq!(second.members, ["alice"]);
        assert!(!presence.leave("r", "alice", "a1").await.unwrap().0);
        assert!(presence.leave("r", "alice", "a2").await.unwrap().0);
        let (_, here, _) = presence.present("r", &["alice".into()]).await.unwrap();
        assert_eq!(here, [false]);
    }
}
