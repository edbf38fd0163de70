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
use std::sync::Arc;
use std::sync::atomic::Ordering;

use redis::{ErrorKind, ServerErrorKind};

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
            if self.shards() == 1 {
                self.group_send_checked(group, &message).await
            } else {
                let members = self.members(group).await?;
                self.send_to_members(group, &message, members).await
            }
        })
        .await
    }

    /// `group_send` on one host, in one round trip while the group's
    /// members stay what this process last saw: the messages, routed to
    /// those members, go with the digest of their list to a script that
    /// adds them only if the list in Redis still has that digest, and
    /// otherwise answers with the list as it is now. A sender waits on
    /// every `group_send`, so each round trip saved is a message sooner.
    ///
    /// The data left in Redis is what Python's `group_send` leaves. After
    /// a second change in a row (members arriving in a storm), the members
    /// just read are sent to as the two-step path does.
    async fn group_send_checked(
        &self,
        group: &str,
        message: &LayerMessage,
    ) -> Result<(), LayerError> {
        let mut seen = self.seen.lock().get(group).cloned();
        for _ in 0..2 {
            let (digest, writes) = match seen.as_deref() {
                Some(Seen::Members { digest, members }) => {
                    (digest.as_str(), self.writes(message, members.clone())?)
                }
                Some(Seen::TooMany) => {
                    let members = self.members(group).await?;
                    return self.send_to_members(group, message, members).await;
                }
                // Nothing seen yet: a digest no list has, to read it.
                None => ("", Vec::new()),
            };
            let batch: Vec<Write> = writes.into_iter().map(|(_, write)| write).collect();
            match self.checked_on_host(group, digest, &batch).await? {
                Checked::Sent(counts) => {
                    self.note_capacity(group, &batch, counts);
                    return Ok(());
                }
                Checked::Changed(raw) => seen = Some(self.saw(group, &raw)),
            }
        }
        match seen.as_deref() {
            Some(Seen::Members { members, .. }) => {
                self.send_to_members(group, message, members.clone()).await
            }
            _ => {
                let members = self.members(group).await?;
                self.send_to_members(group, message, members).await
            }
        }
    }

    /// Records what Redis listed as `group`'s members, for the next send.
    /// Shared, so that a send's look-up copies no list of names.
    fn saw(&self, group: &str, raw: &[Vec<u8>]) -> Arc<Seen> {
        let seen = Arc::new(if raw.len() > SEEN_MEMBERS_MAX {
            Seen::TooMany
        } else {
            Seen::Members {
                digest: digest(raw),
                members: utf8_members(group, raw.to_vec()),
            }
        });
        remember(&mut self.seen.lock(), group, Arc::clone(&seen));
        seen
    }

    /// The checked script on the one host: see [`GROUP_SEND_CHECKED_LUA`].
    async fn checked_on_host(
        &self,
        group: &str,
        digest: &str,
        batch: &[Write],
    ) -> Result<Checked, LayerError> {
        let script = &self.group_send_checked;
        let gkey = group_key(&self.config.prefix, group);
        let group_expiry = self.config.group_expiry_secs();
        let expiry = self.config.expiry_secs();
        self.links[0]
            .run(|mut conn| async move {
                self.patient(&mut conn);
                let now = now_secs();
                let mut invocation = script.key(&gkey);
                for (key, ..) in batch {
                    invocation.key(key);
                }
                invocation
                    .arg(purge_below(now, group_expiry))
                    .arg(digest)
                    .arg(purge_below(now, expiry))
                    .arg(score_arg(now))
                    .arg(expiry);
                for (_, payload, ..) in batch {
                    invocation.arg(payload);
                }
                for (_, _, capacity, _) in batch {
                    invocation.arg(*capacity);
                }
                let (over, members): (i64, Vec<Vec<u8>>) =
                    invocation.invoke_async(&mut conn).await?;
                if over < 0 {
                    return Ok(Checked::Changed(members));
                }
                if over == 0 {
                    return Ok(Checked::Sent(None));
                }
                Ok(Checked::Sent(Some(over_capacity(&mut conn, batch).await?)))
            })
            .await
    }

    /// The group's members as Redis lists them, expired ones purged first.
    async fn members(&self, group: &str) -> Result<Vec<String>, LayerError> {
        let gkey = group_key(&self.config.prefix, group);
        let gshard = consistent_hash(group, self.shards());
        let group_expiry = self.config.group_expiry_secs();
        let raw: Vec<Vec<u8>> = self.links[gshard]
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
        if self.shards() == 1 {
            self.saw(group, &raw);
        }
        Ok(utf8_members(group, raw))
    }

    /// The writes of one group message to `members`, with each one's host:
    /// see [`payloads_by_key`].
    fn writes(
        &self,
        message: &LayerMessage,
        members: Vec<String>,
    ) -> Result<Vec<(usize, Write)>, LayerError> {
        let prefix = &self.config.prefix;
        let payloads = payloads_by_key(
            message,
            members,
            |name| channel_key(prefix, name),
            self.config.max_message_size,
        )?;
        Ok(payloads
            .into_iter()
            .map(|(key, payload, names)| {
                let capacity = self.config.capacity_of(&names[0]);
                let shard = consistent_hash(non_local_name(&names[0]), self.shards());
                (shard, (key, payload, capacity, names))
            })
            .collect())
    }

    /// The second step of the two-step `group_send`: the writes to
    /// `members`, each host's in one transaction, the hosts at once.
    async fn send_to_members(
        &self,
        group: &str,
        message: &LayerMessage,
        members: Vec<String>,
    ) -> Result<(), LayerError> {
        let mut per_shard: Vec<Vec<Write>> = vec![Vec::new(); self.shards()];
        for (shard, write) in self.writes(message, members)? {
            per_shard[shard].push(write);
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
                // The purge and the script go out together: a round trip
                // less for every group message (the sender waits on each).
                let mut purge_then_add = redis::pipe();
                purge_then_add.atomic();
                for (key, ..) in batch {
                    purge_then_add
                        .cmd("ZREMRANGEBYSCORE")
                        .arg(key)
                        .arg(0)
                        .arg(purge_below(now, expiry))
                        .ignore();
                }
                purge_then_add.invoke_script(&invocation);
                let over: usize = match purge_then_add.query_async::<(usize,)>(&mut conn).await {
                    Ok((over,)) => over,
                    // Redis restarted or its scripts were flushed: the
                    // invocation loads the script and runs it again (the
                    // purge is done; it ran in the transaction).
                    Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                        invocation.invoke_async(&mut conn).await?
                    }
                    Err(err) => return Err(err),
                };
                if over == 0 {
                    return Ok(None);
                }
                Ok(Some(over_capacity(&mut conn, batch).await?))
            })
            .await?;
        self.note_capacity(group, batch, counts);
        Ok(())
    }

    /// Counts and reports the keys of `batch` that were at capacity, by
    /// the counts [`over_capacity`] read (`None`: none was).
    fn note_capacity(&self, group: &str, batch: &[Write], counts: Option<Vec<usize>>) {
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
    }
}

/// How many messages each key of `batch` holds, after a script that found
/// some of them at capacity (the script only counts them).
async fn over_capacity(
    conn: &mut redis::aio::MultiplexedConnection,
    batch: &[Write],
) -> Result<Vec<usize>, redis::RedisError> {
    let mut count = redis::pipe();
    for (key, ..) in batch {
        count.cmd("ZCOUNT").arg(key).arg("-inf").arg("+inf");
    }
    count.query_async(conn).await
}

/// What one checked `group_send` found.
enum Checked {
    /// Sent; with each key's count when some were at capacity.
    Sent(Option<Vec<usize>>),
    /// Nothing sent: the group's members are not the ones the messages
    /// were routed to. Here they are, as Redis lists them.
    Changed(Vec<Vec<u8>>),
}

/// What this process last saw of a group's members (one Redis host only).
pub(super) enum Seen {
    Members {
        /// [`digest`] of the list as Redis gave it.
        digest: String,
        members: Vec<String>,
    },
    /// More than [`SEEN_MEMBERS_MAX`]: sent to in two steps, as the list
    /// is read anyway and hashing it would only add to Redis's work.
    TooMany,
}

/// Groups larger than this are not remembered (see [`Seen::TooMany`]).
pub(crate) const SEEN_MEMBERS_MAX: usize = 4096;

/// How many groups' members a layer remembers before it starts over.
const SEEN_GROUPS_MAX: usize = 1024;

/// Keeps what a `group_send` saw of `group` in `groups` (either queue
/// layer's memory of its groups), starting over once it holds
/// [`SEEN_GROUPS_MAX`]: forgetting costs one round trip per group; keeping
/// every group ever sent to would cost memory without bound.
pub(crate) fn remember<T>(groups: &mut HashMap<String, Arc<T>>, group: &str, seen: Arc<T>) {
    if groups.len() >= SEEN_GROUPS_MAX && !groups.contains_key(group) {
        groups.clear();
    }
    groups.insert(group.to_owned(), seen);
}

/// The SHA-1, in hex, of `members` joined by newlines: what the checked
/// script computes with `redis.sha1hex(table.concat(members, '\n'))`.
pub(crate) fn digest(members: &[impl AsRef<[u8]>]) -> String {
    let mut sha1 = sha1_smol::Sha1::new();
    for (i, member) in members.iter().enumerate() {
        if i > 0 {
            sha1.update(b"\n");
        }
        sha1.update(member.as_ref());
    }
    sha1.digest().to_string()
}

/// The members whose names are text (channel names are); a member that is
/// not is skipped, with a warning.
fn utf8_members(group: &str, raw: Vec<Vec<u8>>) -> Vec<String> {
    raw.into_iter()
        .filter_map(|member| match String::from_utf8(member) {
            Ok(name) => Some(name),
            Err(_) => {
                tracing::warn!(group, "skipped a group member whose name is not UTF-8");
                None
            }
        })
        .collect()
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
    async fn redis(server: &RedisServer) -> redis::aio::MultiplexedConnection {
        redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    async fn layer_on(urls: &[String]) -> RedisLayer {
        RedisLayer::connect(RedisConfig {
            hosts: urls.to_vec(),
            block_timeout: Duration::from_secs(1),
            ..RedisConfig::new(urls[0].clone())
        })
        .await
        .unwrap()
    }

    /// A receive that gives up: `None` if nothing came within a moment.
    async fn try_receive(layer: &RedisLayer, channel: &str) -> Option<crate::layer::LayerMessage> {
        tokio::time::timeout(Duration::from_secs(1), layer.receive(channel))
            .await
            .ok()
            .map(Result::unwrap)
    }

    /// The checked script compares our digest with its own: both must hash
    /// the same bytes, or every send would take the slow path.
    #[tokio::test]
    async fn the_digest_is_the_one_redis_computes() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let mut conn = redis(&server).await;
        for members in [
            vec![],
            vec![b"asgi.specific.a!b".to_vec()],
            vec![b"x".to_vec(), "é!ü".as_bytes().to_vec(), vec![0xff, 0x00]],
        ] {
            let theirs: String = redis::cmd("EVAL")
                .arg("return redis.sha1hex(table.concat(ARGV, '\\n'))")
                .arg(0)
                .arg(&members)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(super::digest(&members), theirs, "{members:?}");
        }
    }

    /// One process remembers a group's members to send in one round trip;
    /// another process changing them must be seen at once: a member that
    /// left gets nothing more, one that joined gets the next message.
    #[tokio::test]
    async fn members_changed_by_another_process_are_seen_at_the_next_send() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let sender = layer_on(&[server.url()]).await;
        let other = layer_on(&[server.url()]).await;
        let first = other.new_channel("specific").await.unwrap();
        other.group_add("room", &first).await.unwrap();
        sender.group_send("room", message(1)).await.unwrap();
        assert_eq!(try_receive(&other, &first).await, Some(message(1)));

        let second = other.new_channel("specific").await.unwrap();
        other.group_add("room", &second).await.unwrap();
        other.group_discard("room", &first).await.unwrap();
        sender.group_send("room", message(2)).await.unwrap();
        assert_eq!(
            try_receive(&other, &second).await,
            Some(message(2)),
            "it joined"
        );
        assert_eq!(try_receive(&other, &first).await, None, "it left the group");

        // Again with nothing changed: the remembered members serve.
        sender.group_send("room", message(3)).await.unwrap();
        assert_eq!(try_receive(&other, &second).await, Some(message(3)));
        assert_eq!(try_receive(&other, &first).await, None);
    }

    /// Redis forgets its scripts when it restarts (or on `SCRIPT FLUSH`):
    /// a group message still goes out, on one host and on several.
    #[tokio::test]
    async fn group_send_loads_its_script_again_after_a_script_flush() {
        let (Some(one), Some(two)) = (RedisServer::start().await, RedisServer::start().await)
        else {
            return;
        };
        for urls in [vec![one.url()], vec![one.url(), two.url()]] {
            let layer = layer_on(&urls).await;
            let channel = layer.new_channel("specific").await.unwrap();
            layer.group_add("room", &channel).await.unwrap();
            layer.group_send("room", message(1)).await.unwrap();
            assert_eq!(try_receive(&layer, &channel).await, Some(message(1)));
            for server in [&one, &two] {
                redis::cmd("SCRIPT")
                    .arg("FLUSH")
                    .query_async::<()>(&mut redis(server).await)
                    .await
                    .unwrap();
            }
            layer.group_send("room", message(2)).await.unwrap();
            assert_eq!(
                try_receive(&layer, &channel).await,
                Some(message(2)),
                "{urls:?}"
            );
        }
    }
}
