//! The queue layer's sends: `send` and `group_send`, exactly as Python's
//! layer writes them (the wire specification, §1.4), with three fixes that
//! a Python reader cannot tell from its own layer's writes: a specific
//! channel is written on the host its receiver reads (Python hashes the
//! full name there); a member over capacity is one warning per episode;
//! and a key whose members' names would make its group message larger than
//! `max_message_size` gets several messages, each routed to some of them
//! (one message would fail the whole `group_send`: at about 13,000 members
//! of one group in one process, with the default 1 MiB). Several entries
//! in one key, each with its list in `__asgi_channel__`, are what a Python
//! receiver already fans out, each on its own.
//!
//! Capacity is counted per Redis key, as Python counts it: the key of a
//! process-specific channel is shared by every channel of its layer
//! instance, so they share that capacity (see the module documentation of
//! `queue`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::Inner;
use crate::layer::redis::bounded;
use crate::layer::redis::codec::{self, Route};
use crate::layer::redis::wire::{
    channel_key, consistent_hash, group_key, non_local_name, now_secs, purge_below,
    push_within_capacity, score_arg,
};
use crate::layer::{LayerError, LayerMessage};

/// One `group_send` write: a key, its payload routed to its member
/// channels, the key's capacity, and those channels.
type Write = (String, Vec<u8>, usize, Vec<String>);

/// One payload of a group message: its channel key, the payload, and the
/// member channels it routes to.
pub(crate) type KeyPayload = (String, Vec<u8>, Vec<String>);

/// `group_send`'s payloads to a group's `members`: one per channel key
/// (`key_of` a member's name: Python's layout, or the cluster's), routed
/// to all its members, or several where one would be over `limit`
/// ([`codec::encode_many`]), each with the members it routes to; keys in
/// the order Redis listed their first member. Both queue layers write
/// these, so a large group splits the same way on one Redis and on a
/// cluster.
pub(crate) fn payloads_by_key(
    message: &LayerMessage,
    members: Vec<String>,
    key_of: impl Fn(&str) -> String,
    limit: usize,
) -> Result<Vec<KeyPayload>, LayerError> {
    let mut writes = Vec::new();
    for (key, mut names) in by_key(members, key_of) {
        let payloads = codec::encode_many(message, &names, limit)?;
        for (payload, count) in payloads {
            let rest = names.split_off(count);
            let these = std::mem::replace(&mut names, rest);
            writes.push((key.clone(), payload, these));
        }
    }
    Ok(writes)
}

/// The members of a group, by channel key, in the order Redis listed them
/// (as Python does): one message per key, routed to all its members.
///
/// Members are told apart by their non-local name, a slice of their own:
/// a group of 100,000 is 100,000 lookups, and no key is built for each.
fn by_key(members: Vec<String>, key_of: impl Fn(&str) -> String) -> Vec<(String, Vec<String>)> {
    // Each member's bucket, found by borrowing its name...
    let mut bucket_of = Vec::with_capacity(members.len());
    let mut first_of_bucket = Vec::new();
    {
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, name) in members.iter().enumerate() {
            let next = first_of_bucket.len();
            let bucket = *index.entry(non_local_name(name)).or_insert(next);
            if bucket == next {
                first_of_bucket.push(i);
            }
            bucket_of.push(bucket);
        }
    }
    let mut buckets: Vec<(String, Vec<String>)> = first_of_bucket
        .iter()
        .map(|&i| (key_of(&members[i]), Vec::new()))
        .collect();
    // ...then the names moved into their buckets, not copied.
    for (name, bucket) in members.into_iter().zip(bucket_of) {
        buckets[bucket].1.push(name);
    }
    buckets
}

impl Inner {
    pub(super) async fn send(
        &self,
        channel: &str,
        message: LayerMessage,
    ) -> Result<(), LayerError> {
        let specific = channel.contains('!');
        let route = if specific {
            Route::One(channel)
        } else {
            Route::None
        };
        let payload = codec::encode(&message, route, true, self.config.max_message_size)?;
        let key = self.key_of(channel);
        let shard = if specific {
            // Where the receiver reads (Python hashes the full name here,
            // which loses the message when there are several hosts).
            consistent_hash(non_local_name(channel), self.shards())
        } else {
            self.round_robin.fetch_add(1, Ordering::Relaxed) % self.shards()
        };
        let capacity = self.config.capacity_of(channel);
        let expiry = self.config.expiry_secs();
        let added = bounded("send", self.config.command_timeout, async {
            self.links[shard]
                .run(|mut conn| async move {
                    push_within_capacity(&mut conn, &key, &payload, capacity, expiry).await
                })
                .await
        })
        .await?;
        if added {
            Ok(())
        } else {
            metrics::counter!("axum_channels_layer_channel_full_total").increment(1);
            Err(LayerError::ChannelFull {
                channel: channel.to_owned(),
            })
        }
    }

    pub(super) async fn group_send(
        &self,
        group: &str,
        message: LayerMessage,
    ) -> Result<(), LayerError> {
        // Refuse a bad message before touching Redis.
        codec::encode(&message, Route::None, true, self.config.max_message_size)?;
        bounded("group_send", self.config.command_timeout, async {
            let gkey = group_key(&self.config.prefix, group);
            let gshard = consistent_hash(group, self.shards());
            let group_expiry = self.config.group_expiry_secs();
            let members: Vec<Vec<u8>> = self.links[gshard]
                .run(|mut conn| async move {
                    self.patient(&mut conn);
                    let (members,): (Vec<Vec<u8>>,) = redis::pipe()
                        .cmd("ZREMRANGEBYSCORE")
                        .arg(&gkey)
                        .arg(0)
                        .arg(purge_below(now_secs(), group_expiry))
                        .ignore()
                        .cmd("ZRANGE")
                        .arg(&gkey)
                        .arg(0)
                        .arg(-1)
                        .query_async(&mut conn)
                        .await?;
                    Ok(members)
                })
                .await?;
            let members = members
                .into_iter()
                .filter_map(|member| match String::from_utf8(member) {
                    Ok(name) => Some(name),
                    Err(_) => {
                        tracing::warn!(group, "skipped a group member whose name is not UTF-8");
                        None
                    }
                })
                .collect();

            let mut per_shard: Vec<Vec<Write>> = vec![Vec::new(); self.shards()];
            // A key with more members than one payload can name (a
            // server's share of a large group) gets several, each under
            // the size limit.
            let prefix = &self.config.prefix;
            let writes = payloads_by_key(
                &message,
                members,
                |name| channel_key(prefix, name),
                self.config.max_message_size,
            )?;
            for (key, payload, names) in writes {
                let capacity = self.config.capacity_of(&names[0]);
                let shard = consistent_hash(non_local_name(&names[0]), self.shards());
                per_shard[shard].push((key, payload, capacity, names));
            }
            let sends = per_shard
                .into_iter()
                .enumerate()
                .filter(|(_, batch)| !batch.is_empty())
                .map(|(shard, batch)| self.group_send_on(shard, group, batch));
            for outcome in futures_util::future::join_all(sends).await {
                outcome?;
            }
            Ok(())
        })
        .await
    }

    /// Gives `conn` (this call's handle) the whole call's time to answer,
    /// rather than the link's response timeout, half of it.
    ///
    /// A group of 100,000 is a reply of 7.6 MB to read and a script of as
    /// much to send: on a busy machine that can take longer than half the
    /// command timeout without anything being wrong with Redis. Timed out
    /// by the link, the call would make it probe Redis with a `PING`, which
    /// waits behind those megabytes on the same connection, times out in
    /// turn, and declares the connection lost: a reconnection, every
    /// membership written again, every call failing fast meanwhile, and
    /// the next broadcast slower still (seen at 100,000 members). Given the
    /// whole time, the call's own bound (`bounded`) ends it first, which
    /// fails the call and leaves the connection alone.
    fn patient(&self, conn: &mut redis::aio::MultiplexedConnection) {
        conn.set_response_timeout(self.config.command_timeout);
    }

    /// The per-host half of `group_send`: purge, then the Lua script, then
    /// (only if something was over capacity) find out which keys were.
    async fn group_send_on(
        &self,
        shard: usize,
        group: &str,
        batch: Vec<Write>,
    ) -> Result<(), LayerError> {
        let expiry = self.config.expiry_secs();
        let script = &self.group_send;
        let batch = &batch;
        let counts: Option<Vec<usize>> = self.links[shard]
            .run(|mut conn| async move {
                self.patient(&mut conn);
                let now = now_secs();
                let mut purge = redis::pipe();
                purge.atomic();
                for (key, ..) in batch {
                    purge
                        .cmd("ZREMRANGEBYSCORE")
                        .arg(key)
                        .arg(0)
                        .arg(purge_below(now, expiry))
                        .ignore();
                }
                purge.query_async::<()>(&mut conn).await?;
                let mut invocation = script.prepare_invoke();
                for (key, ..) in batch {
                    invocation.key(key);
                }
                for (_, payload, ..) in batch {
                    invocation.arg(payload);
                }
                for (_, _, capacity, _) in batch {
                    invocation.arg(*capacity);
                }
                invocation.arg(score_arg(now)).arg(expiry);
                let over: usize = invocation.invoke_async(&mut conn).await?;
                if over == 0 {
                    return Ok(None);
                }
                let mut count = redis::pipe();
                for (key, ..) in batch {
                    count.cmd("ZCOUNT").arg(key).arg("-inf").arg("+inf");
                }
                Ok(Some(count.query_async(&mut conn).await?))
            })
            .await?;
        let mut full = Vec::new();
        let mut fine = Vec::new();
        for (i, (key, _, capacity, _)) in batch.iter().enumerate() {
            let at_capacity = counts
                .as_ref()
                .and_then(|counts| counts.get(i))
                .is_some_and(|count| count >= capacity);
            if at_capacity {
                full.push(key.as_str());
            } else {
                fine.push(key.as_str());
            }
        }
        metrics::counter!("axum_channels_layer_channel_full_total").increment(full.len() as u64);
        let reported = self.lock().note_capacity(&full, &fine);
        for key in reported {
            if let Some((_, _, capacity, names)) = batch.iter().find(|(k, ..)| k == key) {
                tracing::warn!(
                    group,
                    channels = names.join(","),
                    capacity,
                    "group_send skipped member channels that are at capacity \
                     (reported once until they take a group message again)"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn group_members_are_bucketed_by_key_in_redis_order() {
        let members = names(&["s.p1!a", "worker.jobs", "s.p2!x", "s.p1!b"]);
        let buckets = by_key(members, |name| channel_key("asgi", name));
        assert_eq!(
            buckets,
            vec![
                ("asgis.p1!".to_owned(), names(&["s.p1!a", "s.p1!b"])),
                ("asgiworker.jobs".to_owned(), names(&["worker.jobs"])),
                ("asgis.p2!".to_owned(), names(&["s.p2!x"])),
            ],
            "one message per key, routed to all its members"
        );
    }
}

#[cfg(all(test, feature = "testing"))]
mod on_redis {
    use std::time::Duration;

    use serde_json::json;

    use crate::layer::redis::{RedisConfig, RedisLayer};
    use crate::layer::{ChannelLayer, LayerError};
    use channels_testkit::RedisServer;

    fn message(n: u64) -> crate::layer::LayerMessage {
        json!({"type": "t", "n": n}).as_object().unwrap().clone()
    }

    /// Capacity is the key's: two channels of one process share it.
    #[tokio::test]
    async fn channels_of_one_process_share_their_keys_capacity() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let layer = RedisLayer::connect(RedisConfig {
            capacity: 2,
            block_timeout: Duration::from_secs(1),
            ..RedisConfig::new(server.url())
        })
        .await
        .unwrap();
        let a = layer.new_channel("specific").await.unwrap();
        let b = layer.new_channel("specific").await.unwrap();
        layer.send(&a, message(1)).await.unwrap();
        layer.send(&a, message(2)).await.unwrap();
        let full = layer.send(&b, message(3)).await.unwrap_err();
        assert!(
            matches!(&full, LayerError::ChannelFull { channel } if *channel == b),
            "{full}"
        );
        assert_eq!(layer.receive(&a).await.unwrap(), message(1));
        layer.send(&b, message(3)).await.unwrap();
        assert_eq!(layer.receive(&b).await.unwrap(), message(3));
    }
}
