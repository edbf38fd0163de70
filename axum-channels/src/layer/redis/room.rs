//! Presence and history on Redis: [`RedisPresence`] and [`RedisHistory`],
//! the Redis backends of [`crate::room`]'s stores, so that every server on
//! one Redis sees one room.
//!
//! Each call is one Lua script, so that what it reads and what it writes
//! are one step for every other server. The keys of one room share a hash
//! tag (`{room}`), so the layout also fits on one slot of a Redis Cluster.
//! Both stores use the first of [`RedisConfig::hosts`], as the job queue
//! does: a room's presence and history live on one Redis.
//!
//! **History** (`PREFIX:history:{ROOM}:stream`, `...:meta`): a stream whose
//! entry ids are the offsets (`17-1` for offset 17), trimmed with
//! `XADD MAXLEN ~ N` (Redis keeps at least N, sometimes a few more), and a
//! hash with the last offset given out (`top`) and the `epoch`, a random id
//! written the first time the room is used. Both keys expire after
//! `history_ttl` without a message; a room that comes back gets a new
//! epoch, so an old offset is never taken for a new message.
//!
//! **Presence** (`PREFIX:presence:{ROOM}:conns`, `...:names`, `...:meta`):
//! a sorted set of connections (`name\nconn`) scored by their deadline in
//! Redis's own clock (`TIME`, so the servers' clocks do not matter), a hash
//! of connections per name, and the room's version. Every script first
//! sweeps the connections past their deadline and returns the names left
//! with none; the sweep and the removal are one step, so each such leave is
//! announced by exactly one server.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use redis::{FromRedisValue, Script, ScriptInvocation};
use serde_json::{Map, Value};

use super::RedisConfig;
use super::link::Link;
use super::wire::Version;
use crate::layer::{BackendError, LayerError};
use crate::room::{Entry, HistoryStore, Joined, Position, PresenceStore, Recovery, random_id};

/// Removes the expired connections of KEYS[1] (deadline below `now`, in
/// ms) and returns, in `gone`, the names left with none in KEYS[2].
const SWEEP: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = {}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('ZREM', KEYS[1], member)
  local name = string.sub(member, 1, string.find(member, '\n', 1, true) - 1)
  if redis.call('HINCRBY', KEYS[2], name, -1) <= 0 then
    redis.call('HDEL', KEYS[2], name)
    table.insert(gone, name)
  end
end
local changed = #gone
local function touch(ttl)
  if changed > 0 then redis.call('HINCRBY', KEYS[3], 'version', 1) end
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl * 2) end
  return tonumber(redis.call('HGET', KEYS[3], 'version') or '0')
end
local function add(member, name, ttl)
  if redis.call('ZADD', KEYS[1], now + ttl, member) == 1 then
    if redis.call('HINCRBY', KEYS[2], name, 1) == 1 then
      changed = changed + 1
      return 1
    end
  end
  return 0
end
"#;

/// ARGV: ttl ms, name, member. Returns {first, version, members, gone}.
static JOIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{SWEEP}
local first = add(ARGV[3], ARGV[2], tonumber(ARGV[1]))
local version = touch(tonumber(ARGV[1]))
return {{first, version, redis.call('HKEYS', KEYS[2]), gone}}"
    ))
});

/// ARGV: ttl ms, name, member. Returns {last, gone}.
static LEAVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{SWEEP}
local last = 0
if redis.call('ZREM', KEYS[1], ARGV[3]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then
    redis.call('HDEL', KEYS[2], ARGV[2])
    last = 1
    changed = changed + 1
  end
end
touch(tonumber(ARGV[1]))
return {{last, gone}}"
    ))
});

/// ARGV: ttl ms, then name, member pairs. Returns {back, gone}.
static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{SWEEP}
local ttl = tonumber(ARGV[1])
local back = {{}}
for i = 2, #ARGV, 2 do
  if add(ARGV[i + 1], ARGV[i], ttl) == 1 then table.insert(back, ARGV[i]) end
end
touch(ttl)
return {{back, gone}}"
    ))
});

/// ARGV: ttl ms, then names. Returns {version, flags, gone}.
static PRESENT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{SWEEP}
local here = {{}}
for i = 2, #ARGV do here[i - 1] = redis.call('HEXISTS', KEYS[2], ARGV[i]) end
local version = touch(tonumber(ARGV[1]))
return {{version, here, gone}}"
    ))
});

/// KEYS: stream, meta. ARGV: data, size, ttl ms, a new epoch. Returns
/// {offset, epoch}.
static APPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[4]
  redis.call('HSET', KEYS[2], 'epoch', epoch)
end
local offset = redis.call('HINCRBY', KEYS[2], 'top', 1)
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], offset .. '-1', 'd', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {offset, epoch}
"#,
    )
});

/// KEYS: stream, meta. ARGV: size, ttl ms, a new epoch, then (with a
/// position) its epoch, the exclusive start `(OFFSET-1`, and the id the
/// next message must have. Returns {epoch, top, recovered, entries}.
static RECOVER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[3]
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'top', 0)
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
local top = tonumber(redis.call('HGET', KEYS[2], 'top') or '0')
if ARGV[4] and ARGV[4] == epoch then
  local since = tonumber(ARGV[7])
  if since <= top then
    local entries = redis.call('XRANGE', KEYS[1], ARGV[5], '+')
    if since == top or (#entries > 0 and entries[1][1] == ARGV[6]) then
      return {epoch, top, 1, entries}
    end
  end
end
local entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[1])
local oldest_first = {}
for i = #entries, 1, -1 do table.insert(oldest_first, entries[i]) end
return {epoch, top, 0, oldest_first}
"#,
    )
});

/// Presence in Redis, shared by every server on it.
pub struct RedisPresence {
    link: Arc<Link>,
    prefix: String,
    ttl: Duration,
}

impl RedisPresence {
    /// Connects to the first of `config.hosts`. Entries live `ttl` unless
    /// renewed (see [`PresenceConfig`](crate::room::PresenceConfig)).
    pub async fn connect(config: &RedisConfig, ttl: Duration) -> Result<Self, LayerError> {
        let link = connect(config, "presence").await?;
        Ok(RedisPresence {
            link,
            prefix: config.prefix.clone(),
            ttl,
        })
    }

    fn keys(&self, room: &str) -> [String; 3] {
        let base = format!("{}:presence:{{{room}}}", self.prefix);
        [
            format!("{base}:conns"),
            format!("{base}:names"),
            format!("{base}:meta"),
        ]
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)
    }
}

/// The stored form of a connection: names have no control characters, so
/// `\n` separates.
fn member(name: &str, conn: &str) -> String {
    format!("{name}\n{conn}")
}

#[async_trait]
impl PresenceStore for RedisPresence {
    async fn join(&self, room: &str, name: &str, conn: &str) -> Result<Joined, LayerError> {
        let mut script = JOIN.prepare_invoke();
        script
            .key(self.keys(room).as_slice())
            .arg(self.ttl_ms())
            .arg(name)
            .arg(member(name, conn));
        let (first, version, mut members, expired): (u8, u64, Vec<String>, Vec<String>) =
            invoke(&self.link, script).await?;
        members.sort();
        Ok(Joined {
            first: first == 1,
            version,
            members,
            expired,
        })
    }

    async fn leave(
        &self,
        room: &str,
        name: &str,
        conn: &str,
    ) -> Result<(bool, Vec<String>), LayerError> {
        let mut script = LEAVE.prepare_invoke();
        script
            .key(self.keys(room).as_slice())
            .arg(self.ttl_ms())
            .arg(name)
            .arg(member(name, conn));
        let (last, expired): (u8, Vec<String>) = invoke(&self.link, script).await?;
        Ok((last == 1, expired))
    }

    async fn heartbeat(
        &self,
        room: &str,
        conns: &[(String, String)],
    ) -> Result<(Vec<String>, Vec<String>), LayerError> {
        let mut script = HEARTBEAT.prepare_invoke();
        script.key(self.keys(room).as_slice()).arg(self.ttl_ms());
        for (name, conn) in conns {
            script.arg(name).arg(member(name, conn));
        }
        invoke(&self.link, script).await
    }

    async fn present(
        &self,
        room: &str,
        names: &[String],
    ) -> Result<(u64, Vec<bool>, Vec<String>), LayerError> {
        let mut script = PRESENT.prepare_invoke();
        script
            .key(self.keys(room).as_slice())
            .arg(self.ttl_ms())
            .arg(names);
        let (version, here, expired): (u64, Vec<u8>, Vec<String>) =
            invoke(&self.link, script).await?;
        Ok((version, here.into_iter().map(|h| h == 1).collect(), expired))
    }
}

/// A bounded history per room in Redis Streams, shared by every server.
pub struct RedisHistory {
    link: Arc<Link>,
    prefix: String,
    size: usize,
    ttl: Duration,
}

impl RedisHistory {
    /// Connects to the first of `config.hosts`. Keeps about the last `size`
    /// messages of a room (at least `size`), for `ttl` after its last one.
    pub async fn connect(
        config: &RedisConfig,
        size: usize,
        ttl: Duration,
    ) -> Result<Self, LayerError> {
        let link = connect(config, "history").await?;
        Ok(RedisHistory {
            link,
            prefix: config.prefix.clone(),
            size: size.max(1),
            ttl,
        })
    }

    fn keys(&self, room: &str) -> [String; 2] {
        let base = format!("{}:history:{{{room}}}", self.prefix);
        [format!("{base}:stream"), format!("{base}:meta")]
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)
    }
}

/// A stream entry as the scripts return it: `[id, ["d", json]]`.
type RawEntry = (String, Vec<String>);

fn decode(room: &str, epoch: &str, raw: Vec<RawEntry>) -> Vec<Entry> {
    raw.into_iter()
        .filter_map(|(id, fields)| {
            let offset = id.split('-').next()?.parse().ok()?;
            let json = fields.get(1)?;
            match serde_json::from_str::<Map<String, Value>>(json) {
                Ok(data) => Some(Entry {
                    offset,
                    epoch: epoch.to_owned(),
                    data,
                }),
                Err(err) => {
                    tracing::warn!(room, id, %err, "skipped a history entry that is not a JSON object");
                    None
                }
            }
        })
        .collect()
}

#[async_trait]
impl HistoryStore for RedisHistory {
    async fn append(&self, room: &str, data: Map<String, Value>) -> Result<Entry, LayerError> {
        let json = Value::Object(data.clone()).to_string();
        let mut script = APPEND.prepare_invoke();
        script
            .key(self.keys(room).as_slice())
            .arg(json)
            .arg(self.size)
            .arg(self.ttl_ms())
            .arg(random_id());
        let (offset, epoch): (u64, String) = invoke(&self.link, script).await?;
        Ok(Entry {
            offset,
            epoch,
            data,
        })
    }

    async fn recover(&self, room: &str, since: Option<&Position>) -> Result<Recovery, LayerError> {
        let mut script = RECOVER.prepare_invoke();
        script
            .key(self.keys(room).as_slice())
            .arg(self.size)
            .arg(self.ttl_ms())
            .arg(random_id());
        if let Some(since) = since {
            script
                .arg(&since.epoch)
                .arg(format!("({}-1", since.offset))
                .arg(format!("{}-1", since.offset.saturating_add(1)))
                .arg(since.offset);
        }
        let (epoch, top, recovered, raw): (String, u64, u8, Vec<RawEntry>) =
            invoke(&self.link, script).await?;
        let entries = decode(room, &epoch, raw);
        Ok(Recovery {
            epoch,
            top,
            recovered: recovered == 1,
            entries,
        })
    }
}

/// Runs a prepared script on `link`.
async fn invoke<T: FromRedisValue>(
    link: &Arc<Link>,
    script: ScriptInvocation<'static>,
) -> Result<T, LayerError> {
    link.run(|mut conn| async move { script.invoke_async(&mut conn).await })
        .await
}

/// A supervised link to the first host (streams' exclusive ranges need 6.2).
async fn connect(config: &RedisConfig, what: &str) -> Result<Arc<Link>, LayerError> {
    config.validate()?;
    let Some(url) = config.hosts.first() else {
        return Err(BackendError::new(format!("{what} needs a Redis host")).into());
    };
    let link = Link::connect(
        url,
        Version(6, 2),
        "presence and history use streams' exclusive ranges",
        false,
        config.command_timeout,
        None,
    )
    .await?;
    link.supervise(Arc::new(|_| Box::pin(async { Ok(()) })));
    Ok(link)
}
