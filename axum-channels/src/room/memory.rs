//! The in-memory stores: one process's rooms, behind a lock.
//!
//! Nothing here expires: the entries belong to the process that would have
//! to die for them to go stale, and then they go with it. The history is
//! bounded in the number of rooms it keeps, though (see [`MemoryHistory`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use async_trait::async_trait;
use serde_json::{Map, Value};

use super::{Entry, HistoryStore, Joined, Position, PresenceStore, Recovery, random_id};
use crate::layer::{LayerError, Locked};

/// A ring of the last `size` messages per room, for at most `max_rooms`
/// rooms.
///
/// A room gets a ring at its first message, not when somebody only asks,
/// so clients that join rooms and say nothing cost nothing here. Past
/// `max_rooms`, the ring of the room that has been quiet longest is
/// dropped: memory is bounded in the number of rooms as well as per room,
/// so a client that says one thing in each of a million rooms cannot grow
/// the process without end.
///
/// The epoch is drawn when the store is made (a restarted process is a new
/// epoch) and drawn again whenever a ring is dropped: a dropped room that
/// speaks again starts from offset 1, and its old positions must not be
/// taken for new ones. Every client then reconnecting with a position from
/// before is told it could not recover, and gets the latest messages; a
/// process that never holds more than `max_rooms` rooms never drops one.
#[derive(Debug)]
pub struct MemoryHistory {
    size: usize,
    max_rooms: usize,
    rings: Locked<Rings>,
}

#[derive(Debug)]
struct Rings {
    epoch: String,
    by_room: HashMap<String, Ring>,
    /// The rooms by their last message's turn, oldest first.
    by_turn: BTreeMap<u64, String>,
    turn: u64,
}

#[derive(Debug, Default)]
struct Ring {
    top: u64,
    /// Its key in `by_turn`.
    turn: u64,
    entries: VecDeque<Entry>,
}

/// How many rooms [`MemoryHistory::new`] keeps a history for.
pub const MAX_HISTORY_ROOMS: usize = 10_000;

impl MemoryHistory {
    /// Keeps the last `size` messages (at least one) of each of the last
    /// [`MAX_HISTORY_ROOMS`] rooms that spoke.
    pub fn new(size: usize) -> MemoryHistory {
        MemoryHistory::with_max_rooms(size, MAX_HISTORY_ROOMS)
    }

    /// Keeps the last `size` messages (at least one) of each of the last
    /// `max_rooms` rooms (at least one) that spoke.
    pub fn with_max_rooms(size: usize, max_rooms: usize) -> MemoryHistory {
        MemoryHistory {
            size: size.max(1),
            max_rooms: max_rooms.max(1),
            rings: Locked::new(Rings {
                epoch: random_id(),
                by_room: HashMap::new(),
                by_turn: BTreeMap::new(),
                turn: 0,
            }),
        }
    }
}

#[async_trait]
impl HistoryStore for MemoryHistory {
    async fn append(&self, room: &str, data: Map<String, Value>) -> Result<Entry, LayerError> {
        let mut rings = self.rings.lock();
        let Rings {
            epoch,
            by_room,
            by_turn,
            turn,
        } = &mut *rings;
        if !by_room.contains_key(room)
            && by_room.len() >= self.max_rooms
            && let Some((_, quietest)) = by_turn.pop_first()
        {
            by_room.remove(&quietest);
            *epoch = random_id();
        }
        *turn += 1;
        let ring = by_room.entry(room.to_owned()).or_default();
        by_turn.remove(&ring.turn);
        ring.turn = *turn;
        by_turn.insert(*turn, room.to_owned());
        ring.top += 1;
        let entry = Entry {
            offset: ring.top,
            epoch: epoch.clone(),
            data,
        };
        if ring.entries.len() == self.size {
            ring.entries.pop_front();
        }
        ring.entries.push_back(entry.clone());
        Ok(entry)
    }

    async fn recover(&self, room: &str, since: Option<&Position>) -> Result<Recovery, LayerError> {
        let rings = self.rings.lock();
        let empty = Ring::default();
        let ring = rings.by_room.get(room).unwrap_or(&empty);
        let first_kept = ring.entries.front().map_or(ring.top + 1, |e| e.offset);
        let recovered = since.is_some_and(|since| {
            since.epoch == rings.epoch && since.offset <= ring.top && since.offset + 1 >= first_kept
        });
        let after = match since {
            Some(since) if recovered => since.offset,
            _ => 0,
        };
        // A ring that was kept when another was dropped is still whole: its
        // entries are positions in the new epoch too.
        let entries = ring
            .entries
            .iter()
            .filter(|e| e.offset > after)
            .map(|e| Entry {
                epoch: rings.epoch.clone(),
                ..e.clone()
            })
            .collect();
        Ok(Recovery {
            epoch: rings.epoch.clone(),
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

    /// A client that speaks once in each of many rooms must not grow the
    /// process without end; a dropped room's old positions must never be
    /// taken for positions in its new ring.
    #[tokio::test]
    async fn past_its_room_limit_the_quietest_room_is_dropped_and_the_epoch_changes() {
        let history = MemoryHistory::with_max_rooms(3, 2);
        let offsets = |entries: &[Entry]| entries.iter().map(|e| e.offset).collect::<Vec<_>>();
        let old_b = history.append("b", said("b1")).await.unwrap();
        history.append("a", said("a1")).await.unwrap();
        let old_a = history.append("a", said("a2")).await.unwrap();
        history.append("c", said("c1")).await.unwrap();
        assert_eq!(history.rings.lock().by_room.len(), 2, "bounded in rooms");

        let b = history.recover("b", None).await.unwrap();
        assert_eq!((b.top, b.entries.len()), (0, 0), "b was the quietest");
        assert_ne!(b.epoch, old_b.epoch, "a new epoch");

        // A kept room is whole, in the new epoch; its old positions are not
        // recovered from, the new ones are.
        let a = history.recover("a", Some(&old_a.position())).await.unwrap();
        assert!(!a.recovered, "a position from before the drop");
        assert_eq!(offsets(&a.entries), [1, 2]);
        assert!(a.entries.iter().all(|e| e.epoch == a.epoch));
        let since = Position {
            offset: 1,
            epoch: a.epoch.clone(),
        };
        let a = history.recover("a", Some(&since)).await.unwrap();
        assert!(a.recovered);
        assert_eq!(offsets(&a.entries), [2]);

        // b speaks again: offsets start over, and its old position is not
        // taken for the new offset 1.
        let new_b = history.append("b", said("b again")).await.unwrap();
        assert_eq!(new_b.offset, 1);
        let b = history.recover("b", Some(&old_b.position())).await.unwrap();
        assert!(!b.recovered);
        assert_eq!(offsets(&b.entries), [1]);
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
