//! What both Redis layers put on the wire, kept in one place so it can be
//! checked against the wire specification line by line: key names, the
//! consistent hash, scores, `new_channel` formats, the Lua scripts (verbatim
//! from the Python layer), the server version check and which keys `flush`
//! may delete.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::layer::{validate_channel_name, validate_group_name};

/// The shard a name lives on when there are `ring_size` hosts: Python's
/// `consistent_hash`, bit for bit: `int((crc32(utf8) & 0xFFF) / (4096 /
/// float(ring_size)))`.
///
/// Which string is hashed depends on the operation (the wire specification,
/// §1.6 and §2.5): the bare group name for the queue layer's groups, the
/// non-local name ([`non_local_name`]) for the queue layer's channels, and
/// the full Redis channel name (`{prefix}__group__{group}` for groups) for
/// the pub/sub layer.
///
/// ```
/// use axum_channels::layer::redis::consistent_hash;
///
/// assert_eq!(consistent_hash("chat__group__chat_room", 3), 2);
/// assert_eq!(consistent_hash("anything", 1), 0);
/// ```
pub fn consistent_hash(value: &str, ring_size: usize) -> usize {
    if ring_size <= 1 {
        return 0;
    }
    let bigval = f64::from(crc32fast::hash(value.as_bytes()) & 0xFFF);
    let ring_divisor = 4096.0 / ring_size as f64;
    // The float division and truncation are Python's; the `min` only guards
    // against a ring size so large that rounding could reach `ring_size`.
    ((bigval / ring_divisor) as usize).min(ring_size - 1)
}

/// The part of a channel name that names its process: up to and including
/// the `!`, or the whole name when it has none. Every specific channel of
/// one queue-layer instance shares the Redis key `{prefix}{non_local_name}`.
///
/// ```
/// use axum_channels::layer::redis::non_local_name;
///
/// assert_eq!(non_local_name("specific.abc!def"), "specific.abc!");
/// assert_eq!(non_local_name("worker.jobs"), "worker.jobs");
/// ```
pub fn non_local_name(channel: &str) -> &str {
    match channel.find('!') {
        Some(bang) => &channel[..=bang],
        None => channel,
    }
}

/// The field that routes a queue-layer message to the channels of one key:
/// a string for `send`, an array of strings for `group_send`.
pub(crate) const ROUTING_FIELD: &str = "__asgi_channel__";

/// Bytes of randomness in front of each queue-layer message, which makes
/// equal messages distinct sorted-set members. Python's default, and both
/// sides must agree: a reader blindly strips this many bytes.
pub(crate) const RANDOM_PREFIX_LENGTH: usize = 12;

/// The queue layer's key for a channel: `{prefix}{non_local}`, with no
/// separator (as in Python).
pub(crate) fn channel_key(prefix: &str, channel: &str) -> String {
    format!("{prefix}{}", non_local_name(channel))
}

/// The queue layer's key for a group: `{prefix}:group:{group}`.
pub(crate) fn group_key(prefix: &str, group: &str) -> String {
    format!("{prefix}:group:{group}")
}

/// The pub/sub layer's Redis channel for a group: `{prefix}__group__{group}`.
pub(crate) fn group_channel(prefix: &str, group: &str) -> String {
    format!("{prefix}__group__{group}")
}

/// Where a queue key keeps what a Python receiver has popped but not yet
/// handed over (restored by [`CLEANUP_LUA`]).
pub(crate) fn inflight_key(key: &str) -> String {
    format!("{key}$inflight")
}

/// Now as UNIX seconds, a float, as Python's `time.time()`: the score of
/// every message and membership. (Milliseconds would sort after every
/// Python message and never be purged by Python senders.)
pub(crate) fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// A score as Redis gets it: Rust's shortest round-trip decimal, which is
/// also what Python's `repr(float)` writes (e.g. `1795673582.8629916`).
pub(crate) fn score_arg(score: f64) -> String {
    format!("{score}")
}

/// The cut-off of a purge, `int(now) - int(lifetime)`: entries scored below
/// it are older than their lifetime. Saturating, so a lifetime beyond
/// `i64::MAX` seconds gives a cut-off far in the past (nothing purged)
/// rather than one that wraps into the future (everything purged).
pub(crate) fn purge_below(now: f64, lifetime_secs: u64) -> i64 {
    let lifetime = i64::try_from(lifetime_secs).unwrap_or(i64::MAX);
    (now as i64).saturating_sub(lifetime)
}

/// A plain send, as Python's layer does it: purge `key`'s expired messages,
/// and add `payload` unless the key already holds `capacity` of them.
/// `false` when it was full. Two round trips, not a script: the check and
/// the add are not atomic, in Python either, so a burst may overshoot the
/// capacity by a few.
pub(crate) async fn push_within_capacity<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    key: &str,
    payload: &[u8],
    capacity: usize,
    expiry: u64,
) -> redis::RedisResult<bool> {
    let now = now_secs();
    let (count,): (usize,) = redis::pipe()
        .cmd("ZREMRANGEBYSCORE")
        .arg(key)
        .arg(0)
        .arg(purge_below(now, expiry))
        .ignore()
        .cmd("ZCOUNT")
        .arg(key)
        .arg("-inf")
        .arg("+inf")
        .query_async(conn)
        .await?;
    if count >= capacity {
        return Ok(false);
    }
    redis::pipe()
        .cmd("ZADD")
        .arg(key)
        .arg(score_arg(now))
        .arg(payload)
        .ignore()
        .cmd("EXPIRE")
        .arg(key)
        .arg(expiry)
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(true)
}

/// 32 lowercase hex digits of a random version-4 UUID, as Python's
/// `uuid.uuid4().hex`.
pub(crate) fn uuid4_hex() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The queue layer's `new_channel`: `{prefix}.{client_prefix}!{uuid4 hex}`.
pub(crate) fn queue_channel_name(prefix: &str, client_prefix: &str) -> String {
    exactly(&[prefix, ".", client_prefix, "!", &uuid4_hex()])
}

/// `parts` joined into a string of exactly their length: a channel name
/// lives as long as its connection, and `format!` may leave it room for
/// half as much again (some 50 bytes a connection, at 15,000 a server).
fn exactly(parts: &[&str]) -> String {
    let mut joined = String::with_capacity(parts.iter().map(|part| part.len()).sum());
    for part in parts {
        joined.push_str(part);
    }
    joined
}

/// The pub/sub layer's `new_channel`: `{layer_prefix}{prefix}.{uuid4 hex}`
/// (Python's default argument is `"specific."`, dot included; the trait's
/// prefix comes without it).
pub(crate) fn pubsub_channel_name(layer_prefix: &str, prefix: &str) -> String {
    exactly(&[layer_prefix, prefix, ".", &uuid4_hex()])
}

// ANCHOR: group_send_lua
/// Adds one message per channel key unless the key is at capacity.
/// `ARGV`: the messages, then the capacities, then the time, then the
/// expiry. Verbatim from the Python layer, so the data it leaves is the
/// same; sent with `EVALSHA` (and `SCRIPT LOAD` on `NOSCRIPT`).
pub(crate) const GROUP_SEND_LUA: &str = r#"
                local over_capacity = 0
                local current_time = ARGV[#ARGV - 1]
                local expiry = ARGV[#ARGV]
                for i=1,#KEYS do
                    if redis.call('ZCOUNT', KEYS[i], '-inf', '+inf') < tonumber(ARGV[i + #KEYS]) then
                        redis.call('ZADD', KEYS[i], current_time, ARGV[i])
                        redis.call('EXPIRE', KEYS[i], expiry)
                    else
                        over_capacity = over_capacity + 1
                    end
                end
                return over_capacity
            "#;
// ANCHOR_END: group_send_lua

// ANCHOR: group_send_checked_lua
/// `group_send` in one round trip, on one host: purges the group, and adds
/// the messages as [`GROUP_SEND_LUA`] does only if the group's members,
/// joined by newlines, still have the SHA-1 the sender routed them by;
/// otherwise adds nothing and returns the members. `KEYS`: the group, then
/// the member keys. `ARGV`: the group's purge cut-off, the digest, the
/// keys' purge cut-off, the time, the expiry, the messages, the
/// capacities. Returns `{over_capacity, {}}` or `{-1, members}`. Ours:
/// Python sends with two calls, and the data left is the same.
pub(crate) const GROUP_SEND_CHECKED_LUA: &str = r#"
    redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[1])
    local members = redis.call('ZRANGE', KEYS[1], 0, -1)
    if redis.sha1hex(table.concat(members, '\n')) ~= ARGV[2] then
        return {-1, members}
    end
    local n = #KEYS - 1
    local over_capacity = 0
    for i = 1, n do
        local key = KEYS[i + 1]
        redis.call('ZREMRANGEBYSCORE', key, 0, ARGV[3])
        if redis.call('ZCOUNT', key, '-inf', '+inf') < tonumber(ARGV[5 + n + i]) then
            redis.call('ZADD', key, ARGV[4], ARGV[5 + i])
            redis.call('EXPIRE', key, ARGV[5])
        else
            over_capacity = over_capacity + 1
        end
    end
    return {over_capacity, {}}
"#;
// ANCHOR_END: group_send_checked_lua

/// Moves what a crashed Python receiver left in `key$inflight` back into
/// `key`, with its old score. `ARGV[1]` is the key, `ARGV[2]` its in-flight
/// key (`numkeys` is 0, as in Python). Verbatim from the Python layer.
pub(crate) const CLEANUP_LUA: &str = r#"
            local backed_up = redis.call('ZRANGE', ARGV[2], 0, -1, 'WITHSCORES')
            for i = #backed_up, 1, -2 do
                redis.call('ZADD', ARGV[1], backed_up[i], backed_up[i - 1])
            end
            redis.call('DEL', ARGV[2])
        "#;

/// A server version, as `INFO server` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Version(pub u32, pub u32);

/// Reads `redis_version:X.Y.Z` from the text of `INFO server`.
pub(crate) fn server_version(info: &str) -> Option<Version> {
    let value = info
        .lines()
        .find_map(|line| line.trim().strip_prefix("redis_version:"))?;
    let mut parts = value.trim().split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().unwrap_or("0").parse().ok()?;
    Some(Version(major, minor))
}

/// Refuses a server older than `needed`, in one line that says why; a
/// server that does not report its version is let through (the first
/// command it lacks will fail clearly enough).
pub(crate) fn check_server_version(
    info: &str,
    host: &str,
    needed: Version,
    because: &str,
) -> Result<Option<Version>, String> {
    match server_version(info) {
        Some(found) if found < needed => Err(format!(
            "Redis at {host} is version {}.{}, but this layer needs Redis {}.{} or newer \
             ({because}); upgrade Redis",
            found.0, found.1, needed.0, needed.1
        )),
        found => Ok(found),
    }
}

/// Whether `flush` of the layer with `prefix` may delete `key`.
///
/// `SCAN MATCH {prefix}*` also finds the keys of a layer whose prefix merely
/// *starts* with ours (`asgi2…` for `asgi`), so a key is only taken when its
/// structure is one of ours: `{prefix}:group:{valid group}`, or
/// `{prefix}{channel key}` with an optional `$inflight`, where the channel
/// key is a valid channel name that has no `!` or ends at it. Keys under a
/// longer prefix that `flush` has seen group keys of (`asgi2:group:…`) are
/// left alone too. What remains ambiguous, and is deleted: the channel keys
/// of a longer prefix that has no group keys at that moment, since
/// `asgi` + `2worker.jobs` and `asgi2` + `worker.jobs` are the same key.
/// Hence the advice to use prefixes of which none starts another.
pub(crate) fn flushable(key: &[u8], prefix: &str, longer_prefixes: &[String]) -> bool {
    let Ok(key) = std::str::from_utf8(key) else {
        return false;
    };
    let Some(rest) = key.strip_prefix(prefix) else {
        return false;
    };
    if let Some(group) = rest.strip_prefix(":group:") {
        return validate_group_name(group).is_ok();
    }
    if longer_prefixes
        .iter()
        .any(|longer| key.starts_with(longer.as_str()))
    {
        return false;
    }
    let channel = rest.strip_suffix("$inflight").unwrap_or(rest);
    validate_channel_name(channel).is_ok()
        && channel
            .find('!')
            .is_none_or(|bang| bang + 1 == channel.len())
}

/// The longer prefix a group key reveals, e.g. `asgi2` for key
/// `asgi2:group:room` when our prefix is `asgi`; `None` for our own group
/// keys and everything else.
pub(crate) fn longer_prefix_of(key: &[u8], prefix: &str) -> Option<String> {
    let key = std::str::from_utf8(key).ok()?;
    let rest = key.strip_prefix(prefix)?;
    let at = rest.find(":group:")?;
    (at > 0 && validate_group_name(&rest[at + ":group:".len()..]).is_ok())
        .then(|| format!("{prefix}{}", &rest[..at]))
}

/// `prefix` with the glob characters of `SCAN MATCH` escaped.
pub(crate) fn escape_glob(prefix: &str) -> String {
    let mut escaped = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table of the wire specification, §1.6, checked against Python.
    #[test]
    fn consistent_hash_matches_python() {
        let table = [
            ("chat__group__chat_room", [1, 2, 2, 3]),
            ("reliable_chat", [0, 0, 0, 0]),
            ("specific.abc!", [1, 2, 3, 4]),
        ];
        for (value, shards) in table {
            assert_eq!(consistent_hash(value, 1), 0, "{value}");
            for (n, expected) in (2..=5).zip(shards) {
                assert_eq!(
                    consistent_hash(value, n),
                    expected,
                    "{value} over {n} hosts"
                );
            }
        }
        assert_eq!(crc32fast::hash(b"chat__group__chat_room"), 0x02b3_ab18);
        assert_eq!(crc32fast::hash(b"reliable_chat"), 0x2172_40e5);
        assert_eq!(crc32fast::hash(b"specific.abc!"), 0xf5d8_8e43);
    }

    #[test]
    fn names_and_keys_have_the_python_shape() {
        let name = queue_channel_name("specific", "d0a712bf8a1f4369ba8d0a9a466b4511");
        assert_eq!(name.len(), 74);
        assert!(name.starts_with("specific.d0a712bf8a1f4369ba8d0a9a466b4511!"));
        assert_eq!(
            channel_key("queue", &name),
            "queuespecific.d0a712bf8a1f4369ba8d0a9a466b4511!"
        );
        assert_eq!(channel_key("queue", "worker.jobs"), "queueworker.jobs");
        assert_eq!(
            group_key("queue", "reliable_chat"),
            "queue:group:reliable_chat"
        );
        assert_eq!(group_channel("chat", "chat_room"), "chat__group__chat_room");
        let pubsub = pubsub_channel_name("chat", "specific");
        assert!(pubsub.starts_with("chatspecific."), "{pubsub}");
        assert_eq!(pubsub.len(), "chatspecific.".len() + 32);
        let uuid = uuid4_hex();
        assert_eq!(uuid.len(), 32);
        assert_eq!(&uuid[12..13], "4", "version nibble of {uuid}");
        assert!(
            matches!(&uuid[16..17], "8" | "9" | "a" | "b"),
            "variant of {uuid}"
        );
    }

    #[test]
    fn scores_are_float_seconds() {
        assert_eq!(score_arg(1_795_673_582.862_991_6), "1795673582.8629916");
        let now = now_secs();
        assert!(now > 1.7e9 && now < 1e10, "{now}");
        assert_eq!(purge_below(1_795_673_582.9, 900), 1_795_672_682);
        for lifetime in [i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX] {
            assert!(purge_below(now, lifetime) < 0, "{lifetime}");
        }
    }

    #[test]
    fn old_servers_are_refused_with_a_clear_message() {
        let needed = Version(5, 0);
        let info = "# Server\r\nredis_version:4.0.9\r\nredis_git_sha1:00000000\r\n";
        let err =
            check_server_version(info, "127.0.0.1:6379", needed, "it uses BZPOPMIN").unwrap_err();
        assert_eq!(
            err,
            "Redis at 127.0.0.1:6379 is version 4.0, but this layer needs Redis 5.0 or newer \
             (it uses BZPOPMIN); upgrade Redis"
        );
        for ok in [
            "redis_version:5.0.0",
            "redis_version:7.0.15",
            "redis_version:10.2",
        ] {
            assert!(check_server_version(ok, "h", needed, "x").is_ok(), "{ok}");
        }
        assert_eq!(
            check_server_version("# Server\nredis_version:7.2.4\n", "h", needed, "x"),
            Ok(Some(Version(7, 2)))
        );
        assert_eq!(
            check_server_version("no version here", "h", needed, "x"),
            Ok(None)
        );
        assert_eq!(server_version("redis_version:garbage"), None);
    }

    #[test]
    fn flush_takes_only_keys_of_its_own_prefix() {
        let ours: [&[u8]; 6] = [
            b"asgi:group:room",
            b"asgispecific.abc!",
            b"asgispecific.abc!$inflight",
            b"asgiworker.jobs",
            b"asgiworker.jobs$inflight",
            b"asgi2worker.jobs", // ambiguous without a sign of prefix "asgi2"
        ];
        for key in ours {
            assert!(
                flushable(key, "asgi", &[]),
                "{}",
                String::from_utf8_lossy(key)
            );
        }
        let theirs: [&[u8]; 6] = [
            b"asgi2:group:room",
            b"asgi:group:bad name",
            b"asgispecific.abc!def",
            b"other:group:room",
            b"asgi:other",
            b"asgi\xff",
        ];
        for key in theirs {
            assert!(
                !flushable(key, "asgi", &[]),
                "{}",
                String::from_utf8_lossy(key)
            );
        }
        let longer = longer_prefix_of(b"asgi2:group:room", "asgi").unwrap();
        assert_eq!(longer, "asgi2");
        assert_eq!(longer_prefix_of(b"asgi:group:room", "asgi"), None);
        assert!(!flushable(b"asgi2worker.jobs", "asgi", &[longer]));
        assert_eq!(escape_glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
