//! Direct routes: a cluster layer's busiest commands (a publish, a group's
//! read, a send's script) go on a connection to the node that owns their
//! slot, not through redis-rs's cluster connection.
//!
//! Why: redis-rs's cluster connection hands each command to a task of its
//! own, which hands it on to that node's connection, and the reply comes
//! back the same way. On a server whose threads are busy writing to
//! clients, each of those hand-overs waits its turn behind every runnable
//! task. A member's messages are handled one after another, so the time a
//! `group_send` takes sets the pace of the whole room; `cargo xtask bench
//! fanout` measures it.
//!
//! The routes are a cache, never the authority. They are read with
//! `CLUSTER SLOTS` when the layer connects. A failure that is not the
//! node's own answer to the command (`MOVED`, `ASK`, `TRYAGAIN`, a
//! refused or dropped connection) sends that call through the cluster
//! connection, which follows redirections, retries and renews as before
//! (see [`routed`](super::routed)), and reads the routes again in the
//! background, at most every [`REFRESH_EVERY`]. So a moved slot or a
//! failover costs a few calls the slower way, never a lost one. A timeout
//! fails the call, as it would have on the cluster connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, RedisError, Value};
use tokio::time::Instant;

use super::super::config::RedisConfig;
use super::refused;
use crate::layer::{LayerError, Locked};

/// Redis Cluster's hash slots.
const SLOTS: usize = 16384;
/// In [`Routes::owner`]: no known node for the slot.
const NO_NODE: u16 = u16::MAX;
/// The least time between two readings of the routes.
pub(crate) const REFRESH_EVERY: Duration = Duration::from_millis(200);

/// A cluster's slot owners, and a connection to each (see the module doc).
pub(crate) struct Direct {
    /// How to reach the seed nodes: also the credentials and the database
    /// of every node's connection.
    seeds: Vec<ConnectionInfo>,
    timeouts: AsyncConnectionConfig,
    routes: Locked<Routes>,
    /// A reading of the routes is under way.
    refreshing: AtomicBool,
}

struct Routes {
    /// Slot → index in `nodes`, or [`NO_NODE`].
    owner: Vec<u16>,
    nodes: Vec<Node>,
    /// Counts the readings, so that a failure reported against an older
    /// reading's `nodes` is not taken for the node now at that index.
    generation: u64,
    /// When the routes were last read (or a reading was started).
    read_at: Option<Instant>,
}

/// A node of one reading of the routes.
#[derive(Clone, Copy)]
pub(crate) struct NodeAt {
    generation: u64,
    node: usize,
}

struct Node {
    host: String,
    port: u16,
    /// `None` once a call on it failed without an answer: the next reading
    /// connects again.
    conn: Option<MultiplexedConnection>,
}

impl Direct {
    /// Routes for the cluster `config` names; empty until [`refresh`]
    /// reads them.
    ///
    /// [`refresh`]: Direct::refresh
    pub(crate) fn new(config: &RedisConfig) -> Result<Arc<Self>, LayerError> {
        let seeds = config
            .hosts
            .iter()
            .map(|host| {
                redis::IntoConnectionInfo::into_connection_info(host.as_str()).map_err(|err| {
                    LayerError::invalid_config("hosts", format!("not a Redis URL: {err}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let timeouts = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.command_timeout))
            .set_response_timeout(Some(config.command_timeout));
        Ok(Arc::new(Direct {
            seeds,
            timeouts,
            routes: Locked::new(Routes {
                owner: vec![NO_NODE; SLOTS],
                nodes: Vec::new(),
                generation: 0,
                read_at: None,
            }),
            refreshing: AtomicBool::new(false),
        }))
    }

    /// The connection to `slot`'s owner, if it is known and open, and
    /// which node it is, for [`failed`](Direct::failed).
    pub(crate) fn to(&self, slot: u16) -> Option<(NodeAt, MultiplexedConnection)> {
        let routes = self.routes.lock();
        let node = usize::from(*routes.owner.get(usize::from(slot))?);
        let conn = routes.nodes.get(node)?.conn.clone()?;
        Some((
            NodeAt {
                generation: routes.generation,
                node,
            },
            conn,
        ))
    }

    /// Records that a call on `node`'s connection failed with `err`, and
    /// reads the routes again in the background. A failure without an
    /// answer also drops the connection, so that the reading opens it
    /// again; a timeout does not, since a slow node's connection still
    /// works and what waits on it still runs.
    pub(crate) fn failed(self: &Arc<Self>, node: NodeAt, err: &RedisError) {
        if !answered(err) && !err.is_timeout() {
            let mut routes = self.routes.lock();
            if routes.generation == node.generation
                && let Some(node) = routes.nodes.get_mut(node.node)
            {
                node.conn = None;
            }
        }
        self.refresh_soon();
    }

    /// Starts a reading of the routes, unless one is under way; it waits
    /// until [`REFRESH_EVERY`] has passed since the last one began, so a
    /// burst of failed calls is one reading, and the last of them is not
    /// left without one.
    pub(crate) fn refresh_soon(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let wait = self.routes.lock().read_at.map_or(Duration::ZERO, |at| {
            REFRESH_EVERY.saturating_sub(at.elapsed())
        });
        let this = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            this.read().await;
            this.refreshing.store(false, Ordering::Release);
        });
    }

    /// Reads the routes now, unless a reading is under way; true if they
    /// were read.
    pub(crate) async fn refresh(&self) -> bool {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return false;
        }
        let read = self.read().await;
        self.refreshing.store(false, Ordering::Release);
        read
    }

    /// Asks the known nodes, then the seeds, for `CLUSTER SLOTS`, and takes
    /// the first answer; connects to any owner without a connection.
    async fn read(&self) -> bool {
        let asked: Vec<MultiplexedConnection> = {
            let mut routes = self.routes.lock();
            routes.read_at = Some(Instant::now());
            routes.nodes.iter().filter_map(|n| n.conn.clone()).collect()
        };
        let mut answer = None;
        for conn in asked {
            answer = cluster_slots(conn).await;
            if answer.is_some() {
                break;
            }
        }
        if answer.is_none() {
            for seed in &self.seeds {
                if let Ok(conn) = self.open(seed.clone()).await {
                    answer = cluster_slots(conn).await;
                    if answer.is_some() {
                        break;
                    }
                }
            }
        }
        let Some(ranges) = answer.as_ref().and_then(slot_ranges) else {
            tracing::debug!("cannot read the Redis Cluster's slots; calls go the slower way");
            return false;
        };
        // Owners, each once, keeping the connections still open.
        let mut owners: Vec<(String, u16)> = Vec::new();
        for (_, _, host, port) in &ranges {
            if !owners.iter().any(|(h, p)| h == host && p == port) {
                owners.push((host.clone(), *port));
            }
        }
        let mut nodes = Vec::with_capacity(owners.len());
        for (host, port) in owners {
            let open = {
                let routes = self.routes.lock();
                routes
                    .nodes
                    .iter()
                    .find(|n| n.host == host && n.port == port)
                    .and_then(|n| n.conn.clone())
            };
            let conn = match open {
                Some(conn) => Some(conn),
                None => match self.node_info(&host, port) {
                    Some(info) => self.open(info).await.ok(),
                    None => None,
                },
            };
            nodes.push(Node { host, port, conn });
        }
        let mut owner = vec![NO_NODE; SLOTS];
        for (start, end, host, port) in &ranges {
            let Some(at) = nodes
                .iter()
                .position(|n| &n.host == host && n.port == *port)
            else {
                continue;
            };
            for slot in owner
                .iter_mut()
                .take(usize::from(*end) + 1)
                .skip(usize::from(*start))
            {
                *slot = at as u16;
            }
        }
        let mut routes = self.routes.lock();
        routes.owner = owner;
        routes.nodes = nodes;
        routes.generation += 1;
        true
    }

    /// The first seed's settings, at `host:port`; `None` for a seed that
    /// is not on TCP.
    fn node_info(&self, host: &str, port: u16) -> Option<ConnectionInfo> {
        let seed = self.seeds.first()?;
        let addr = match seed.addr() {
            ConnectionAddr::Tcp(..) => ConnectionAddr::Tcp(host.to_owned(), port),
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => return None,
        };
        Some(seed.clone().set_addr(addr))
    }

    async fn open(&self, info: ConnectionInfo) -> redis::RedisResult<MultiplexedConnection> {
        Client::open(info)?
            .get_multiplexed_async_connection_with_config(&self.timeouts)
            .await
    }
}

/// A node's answer to `CLUSTER SLOTS`, if it gives one.
async fn cluster_slots(mut conn: MultiplexedConnection) -> Option<Value> {
    redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async::<Value>(&mut conn)
        .await
        .ok()
}

/// Whether the node answered `err` itself: a server's error reply that is
/// not one of the cluster's refusals. Such an answer is the call's
/// outcome; anything else is tried again through the cluster connection.
pub(crate) fn answered(err: &RedisError) -> bool {
    matches!(
        err.kind(),
        redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
    ) && !refused(err)
}

/// `CLUSTER SLOTS`'s answer as `(first, last, host, port)` of each range's
/// master; a range whose master has no usable address is left out.
fn slot_ranges(value: &Value) -> Option<Vec<(u16, u16, String, u16)>> {
    let Value::Array(ranges) = value else {
        return None;
    };
    let mut out = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(fields) = range else {
            return None;
        };
        let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(master))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            return None;
        };
        let host = match master.first() {
            Some(Value::BulkString(host)) => String::from_utf8_lossy(host).into_owned(),
            Some(Value::SimpleString(host)) => host.clone(),
            _ => continue,
        };
        let Some(Value::Int(port)) = master.get(1) else {
            continue;
        };
        let (Ok(first), Ok(last), Ok(port)) = (
            u16::try_from(*first),
            u16::try_from(*last),
            u16::try_from(*port),
        ) else {
            continue;
        };
        // An empty host is "the node you asked", `?` an unknown one.
        if host.is_empty() || host == "?" || usize::from(last) >= SLOTS || first > last {
            continue;
        }
        out.push((first, last, host, port));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::redis::cluster::{Way, client, connect, routed, slot};
    use crate::layer::redis::wire::Version;
    use channels_testkit::RedisCluster;
    use std::sync::Mutex;

    /// For a test: the port of `slot`'s owner in the routes.
    fn owner_port(direct: &Direct, slot: u16) -> Option<u16> {
        let routes = direct.routes.lock();
        let node = routes
            .nodes
            .get(usize::from(routes.owner[usize::from(slot)]))?;
        node.conn.as_ref().map(|_| node.port)
    }

    async fn connected(
        cluster: &RedisCluster,
        timeout: Duration,
    ) -> (super::super::Renewing, Arc<Direct>) {
        let config = RedisConfig::default()
            .with_hosts(cluster.urls())
            .with_command_timeout(timeout);
        let none = None::<fn(redis::PushInfo) -> Result<(), ()>>;
        let (conn, _) = connect(
            client(&config, none).expect("a client"),
            Version(5, 0),
            "a test",
            "test",
            Duration::from_secs(5),
        )
        .await
        .expect("connect");
        let direct = Direct::new(&config).expect("routes");
        assert!(direct.refresh().await, "CLUSTER SLOTS is read");
        (conn, direct)
    }

    /// Runs `SET key value` (or, with `wrong_type`, `LPUSH` on a string) by
    /// [`routed`], and says which ways each attempt took: `true` straight
    /// to a node, `false` through the cluster connection.
    async fn set(
        direct: &Arc<Direct>,
        conn: &super::super::Renewing,
        key: &str,
        wrong_type: bool,
    ) -> (redis::RedisResult<()>, Vec<bool>) {
        let ways = Mutex::new(Vec::new());
        let result = routed(
            Duration::from_secs(5),
            direct,
            conn,
            slot(key.as_bytes()),
            |mut conn| {
                ways.lock()
                    .expect("not poisoned")
                    .push(matches!(conn, Way::Node(_)));
                let command = if wrong_type {
                    redis::cmd("LPUSH").arg(key).arg("x").to_owned()
                } else {
                    redis::cmd("SET").arg(key).arg("value").to_owned()
                };
                async move { command.query_async::<()>(&mut conn).await }
            },
        )
        .await;
        (result, ways.into_inner().expect("not poisoned"))
    }

    #[tokio::test]
    async fn calls_go_straight_to_the_owner_and_follow_a_moved_slot() {
        let Some(cluster) = RedisCluster::start().await else {
            return;
        };
        let within = Duration::from_secs(5);
        let (conn, direct) = connected(&cluster, within).await;

        let key = "direct-routes";
        let at = slot(key.as_bytes());
        let owner = cluster.master_of(at).await.port;
        assert_eq!(owner_port(&direct, at), Some(owner));
        let (result, ways) = set(&direct, &conn, key, false).await;
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(ways, [true], "one call, straight to the owner");

        // The node's own answer is the outcome: not tried again.
        let (result, ways) = set(&direct, &conn, key, true).await;
        let err = result.expect_err("LPUSH on a string");
        assert_eq!(err.code(), Some("WRONGTYPE"), "{err}");
        assert_eq!(ways, [true]);

        // The slot moves: the old owner answers MOVED, the call goes
        // through the cluster connection, and the routes are read again.
        let new_owner = cluster
            .nodes()
            .await
            .into_iter()
            .find(|node| node.master && node.port != owner && !node.slots.is_empty())
            .expect("three masters")
            .port;
        cluster.move_slot(at, new_owner).await;
        let (result, ways) = set(&direct, &conn, key, false).await;
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(ways, [true, false], "MOVED, then the cluster connection");
        let deadline = Instant::now() + within;
        while owner_port(&direct, at) != Some(new_owner) {
            assert!(Instant::now() < deadline, "the routes were not read again");
            tokio::time::sleep(REFRESH_EVERY / 4).await;
        }
        let (result, ways) = set(&direct, &conn, key, false).await;
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(ways, [true], "straight to the new owner");
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn reads_cluster_slots() {
        let answer = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(7000), bulk("id-a")]),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(7003), bulk("id-d")]),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(7001), bulk("id-b")]),
            ]),
            // A master without a known address is left out.
            Value::Array(vec![
                Value::Int(100),
                Value::Int(200),
                Value::Array(vec![bulk("?"), Value::Int(7002)]),
            ]),
        ]);
        assert_eq!(
            slot_ranges(&answer),
            Some(vec![
                (0, 5460, "127.0.0.1".to_owned(), 7000),
                (5461, 16383, "127.0.0.1".to_owned(), 7001),
            ])
        );
        assert_eq!(slot_ranges(&Value::Nil), None);
    }

    /// A node that does not answer in time may still run the call: it is
    /// not sent again the other way, where it would run twice.
    #[tokio::test]
    async fn a_call_that_timed_out_is_not_sent_again() {
        let Some(cluster) = RedisCluster::start().await else {
            return;
        };
        let (conn, direct) = connected(&cluster, Duration::from_millis(300)).await;
        let key = "direct-counted";
        let at = slot(key.as_bytes());
        let owner = cluster.master_of(at).await.port;
        let mut admin = redis::Client::open(format!("redis://127.0.0.1:{owner}"))
            .expect("a URL")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the owner");
        // Writes wait on the owner for 1 s: the call below times out there.
        let () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(1000)
            .arg("WRITE")
            .query_async(&mut admin)
            .await
            .expect("CLIENT PAUSE");
        let ways = Mutex::new(Vec::new());
        let result = routed(Duration::from_secs(5), &direct, &conn, at, |mut conn| {
            ways.lock()
                .expect("not poisoned")
                .push(matches!(conn, Way::Node(_)));
            async move {
                redis::cmd("INCR")
                    .arg(key)
                    .query_async::<i64>(&mut conn)
                    .await
            }
        })
        .await;
        let err = result.expect_err("the paused owner does not answer in time");
        assert!(err.is_timeout(), "{err}");
        assert_eq!(ways.into_inner().expect("not poisoned"), [true]);
        // Once the pause is over, the INCR has run, once.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let count: i64 = redis::cmd("GET")
            .arg(key)
            .query_async(&mut admin)
            .await
            .expect("GET");
        assert_eq!(count, 1);
    }
}
