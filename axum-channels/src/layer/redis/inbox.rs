//! Local buffers: where messages that came from Redis wait for their
//! channel's `receive`, one bounded queue per local channel.
//!
//! Both Redis layers hand what they read from Redis to these buffers from a
//! task of their own (the queue layer's poppers, the pub/sub connection's
//! reader), and `receive` only ever waits on its buffer. That is what makes
//! `receive` cancel-safe: dropping its future drops a wait on a [`Notify`],
//! never a Redis command with a message in flight.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::Notify;

use crate::layer::LayerMessage;
use crate::layer::episode::Episode;

/// A message waiting in a local buffer.
pub(crate) struct Entry {
    pub message: LayerMessage,
    /// When it was sent (its score), to drop it once older than the expiry;
    /// `None` on the pub/sub layer, where nothing expires.
    pub sent_at: Option<f64>,
    /// For messages of a plain channel (a shared work queue): the member and
    /// score it had in Redis, so that it can be given back to Redis for
    /// another receiver if this process closes the channel unread.
    pub raw: Option<Raw>,
}

/// A message as it was in Redis.
pub(crate) struct Raw {
    pub member: Vec<u8>,
    pub score: f64,
    pub shard: usize,
}

/// One local channel's buffer.
pub(crate) struct Inbox {
    pub queue: VecDeque<Entry>,
    /// Wakes one waiting receiver when a message arrives.
    pub arrived: Arc<Notify>,
    /// Receivers waiting right now.
    pub waiting: usize,
    capacity: usize,
    /// Going on from an overflow until the buffer drains: one warning each.
    overflow: Episode,
    /// Messages dropped because the buffer was full, over its lifetime.
    pub dropped: u64,
}

impl Inbox {
    pub(crate) fn new(capacity: usize) -> Self {
        Inbox {
            queue: VecDeque::new(),
            arrived: Arc::new(Notify::new()),
            waiting: 0,
            capacity: capacity.max(1),
            overflow: Episode::default(),
            dropped: 0,
        }
    }

    /// True when a receiver waits and nothing is buffered for it: the queue
    /// layer pops from Redis only then, so messages nobody waits for stay
    /// in Redis, where capacity and expiry apply.
    pub(crate) fn hungry(&self) -> bool {
        self.waiting > 0 && self.queue.is_empty()
    }

    /// Buffers `entry` and wakes a receiver. A full buffer drops its oldest
    /// message, as Python's bounded receive buffer does, and says so once
    /// per episode (until the buffer drains).
    pub(crate) fn push(&mut self, channel: &str, entry: Entry) {
        if self.queue.len() >= self.capacity {
            self.queue.pop_front();
            self.dropped += 1;
            metrics::counter!("axum_channels_layer_buffer_dropped_total").increment(1);
            if self.overflow.start() {
                tracing::warn!(
                    channel,
                    capacity = self.capacity,
                    "a channel's local buffer is full: dropping its oldest messages \
                     (reported once until it catches up)"
                );
            }
        }
        self.queue.push_back(entry);
        self.arrived.notify_one();
    }

    /// Takes the next message younger than `expiry_secs` (all of them when
    /// `None`), dropping the expired ones in front of it.
    pub(crate) fn take(&mut self, now: f64, expiry_secs: Option<u64>) -> Option<Entry> {
        while let Some(entry) = self.queue.pop_front() {
            let expired = match (entry.sent_at, expiry_secs) {
                (Some(sent_at), Some(expiry)) => now - sent_at > expiry as f64,
                _ => false,
            };
            if !expired {
                if self.queue.is_empty() {
                    self.overflow.end();
                }
                return Some(entry);
            }
        }
        self.overflow.end();
        None
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn entry(n: u64, sent_at: Option<f64>) -> Entry {
        Entry {
            message: json!({"type": "t", "n": n}).as_object().unwrap().clone(),
            sent_at,
            raw: None,
        }
    }

    #[test]
    fn a_full_buffer_keeps_the_newest_and_counts_the_dropped() {
        let mut inbox = Inbox::new(2);
        for n in 0..5 {
            inbox.push("ch", entry(n, None));
        }
        assert_eq!(inbox.dropped, 3);
        assert_eq!(inbox.take(0.0, None).unwrap().message["n"], 3);
        assert_eq!(inbox.take(0.0, None).unwrap().message["n"], 4);
        assert!(inbox.take(0.0, None).is_none());
    }

    #[test]
    fn expired_messages_are_skipped() {
        let mut inbox = Inbox::new(10);
        inbox.push("ch", entry(1, Some(100.0)));
        inbox.push("ch", entry(2, Some(150.0)));
        assert_eq!(inbox.take(155.0, Some(60)).unwrap().message["n"], 1);
        assert!(
            inbox.take(300.0, Some(60)).is_none(),
            "150 is 150 s old at 300"
        );
        inbox.waiting = 1;
        assert!(inbox.hungry());
    }
}
