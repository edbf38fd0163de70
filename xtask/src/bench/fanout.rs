//! The `fanout` scenario: one sender and `--receivers` receivers (default
//! 100) in one room, in deliveries per second (messages heard by the
//! receivers), through each channel layer of axum-channels, against a bare
//! broadcast server, all in one run:
//!
//! - **bare broadcast** (the baseline): loadgen's `bare-broadcast`, plain
//!   tokio-tungstenite and `tokio::sync::broadcast`, one write per frame;
//! - **bare, batched**: the same server writing every message already
//!   waiting for a client in one go (`--batch true`), as the axum-channels
//!   runner does: the layers gain from that too, so the report gives their
//!   ratio to it as well, the cost of the library alone;
//! - **memory**, **redis pub/sub**, **redis queue**: loadgen's
//!   `room-server`, one room consumer written against axum-channels, on the
//!   in-memory layer, `RedisPubSubLayer` and `RedisLayer`;
//! - **2 servers pubsub**: the room split across two `room-server`
//!   processes on one Redis, through `RedisPubSubLayer`, the receivers
//!   taking turns between them (what step 05 runs); the report gives its
//!   ratio to the single server in memory;
//! - **2 servers queue**: the same through `RedisLayer`;
//! - **cluster pubsub**, **cluster queue**: the same two-server room on a
//!   throwaway Redis Cluster of six nodes (three masters, a replica each),
//!   through `RedisPubSubLayer::connect_cluster` (sharded pub/sub) and
//!   `RedisClusterLayer`; the report gives each one's ratio to the same
//!   room on one Redis, in the same round (goal: at least 0.8);
//! - **bare relay, redis**, **bare relay, cluster**: the floor under those
//!   two: the same two-server room through one Redis and through the
//!   cluster, with no channel layer at all (loadgen's `bare-broadcast
//!   --relay`: a text is added to each server's sorted set, each server
//!   pops its own with `BZMPOP`, nothing is checked). Their ratio says what
//!   the cluster's layout costs on this machine before a layer does
//!   anything, so that the cluster layers' ratios can be read against it.
//!   From them the report also gives the most the cluster queue room could
//!   keep of one Redis if the cluster cost it nothing beyond what it costs
//!   the relays (see [`ceiling`]).
//!
//! The load is loadgen's `fanout` client (see its documentation): a closed
//! loop with a small window, so a slower server shows as fewer deliveries,
//! and a message a layer drops as `missing`, never as a hang.
//!
//! Each round runs every server once, in the opposite order to the round
//! before, so that none always runs on the warmest or the busiest machine.
//! The figures are the medians over the rounds, and each ratio is the
//! median of the ratios within a round, as in the echo scenario.
//!
//! **CPUs.** The server is pinned to CPU 0 and the load generator to CPU 1,
//! as in the echo scenario. redis-server is pinned to CPU 0 too, with the
//! server: every configuration then gets the same one core for its whole
//! server side, so the ratios compare like with like, and Redis never
//! takes time from the load generator (which would lower the Redis figures
//! for a reason that has nothing to do with the layers). It is the
//! pessimistic view: a production Redis has a core or a machine of its own.
//!
//! **Redis.** Each Redis run starts a throwaway `redis-server` of its own on
//! a free port (never 6379), without persistence, and stops it afterwards.
//! Without `redis-server` on PATH, the in-memory and baseline runs still
//! happen and the report says loudly that the Redis runs were skipped.
//!
//! The split rooms are the [`Target`]s with two servers: a second
//! `room-server` on the same Redis, and loadgen's `fanout` spreads its
//! receivers over their URLs. Both servers are pinned to CPU 0 with Redis,
//! like every other server side, so the comparison is of the same one core
//! doing the work of two processes and the Redis between them.
//!
//! **Cluster.** A cluster run starts six redis-servers as
//! `cargo xtask cluster --redis-cluster` does (`cluster::form_redis_cluster`,
//! the tests' recipe), all pinned to CPU 0 with the servers: the one core
//! then also carries replication to three replicas, which a production
//! cluster spreads over machines. It is the pessimistic view again; the
//! ratio says what the cluster costs on one core, not what it gains on
//! several. Without `redis-cli` the cluster runs are skipped, loudly.
//! After the cluster queue room's run, the report says on how many of the
//! three masters its keys were (the group's list and each server's
//! membership version): each round forms a new cluster, and the servers'
//! keys land where their random names hash, which moves the ratio more
//! than anything else from round to round.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{
    STARTUP_TIMEOUT, Scenario, Server, command, exe, free_port, json_number, median, on_path,
    wait_for_port,
};
use crate::{Result, cluster, fail, steps};

/// How to get redis-server, for the note when it is missing.
pub(super) const INSTALL_REDIS: &str =
    "install redis-server (Debian/Ubuntu: `sudo apt-get install redis-server`)";

/// What the servers aim for, each as a ratio to another in the same round:
/// against the bare server, the library's per-member work should cost
/// little next to the writes themselves; a room on Redis should keep most
/// of what one process does alone; a room on a Redis Cluster most of what
/// it does on one Redis. The last field says what the pair compares, when
/// the labels do not.
const GOALS: [(Target, Target, f64, &str); 6] = [
    (Target::Memory, Target::Baseline, 0.9, ""),
    (Target::PubSub, Target::Baseline, 0.85, ""),
    (Target::Queue, Target::Baseline, 0.7, ""),
    (Target::PubSub, Target::Memory, 0.7, ""),
    (
        Target::ClusterPubSub,
        Target::SplitPubSub,
        0.8,
        CLUSTER_PAIR,
    ),
    (Target::ClusterQueue, Target::SplitQueue, 0.8, CLUSTER_PAIR),
];

const CLUSTER_PAIR: &str =
    " (the two-server room on a three-master Redis Cluster, against one Redis)";

/// Which server a measurement runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    Baseline,
    /// The baseline, writing what waits for a client in one go.
    BareBatched,
    Memory,
    PubSub,
    Queue,
    /// The pub/sub room split across two servers on one Redis.
    SplitPubSub,
    /// The queue room split across two servers on one Redis.
    SplitQueue,
    /// The pub/sub room on two servers over a Redis Cluster.
    ClusterPubSub,
    /// The queue room on two servers over a Redis Cluster.
    ClusterQueue,
    /// Two bare servers relaying through one Redis: no layer.
    RelayOne,
    /// Two bare servers relaying through a Redis Cluster: no layer.
    RelayCluster,
}

impl Target {
    const ALL: [Target; 11] = [
        Target::Baseline,
        Target::BareBatched,
        Target::Memory,
        Target::PubSub,
        Target::Queue,
        Target::SplitPubSub,
        Target::SplitQueue,
        Target::ClusterPubSub,
        Target::ClusterQueue,
        Target::RelayOne,
        Target::RelayCluster,
    ];

    /// Each cluster target and the same room on one Redis, for the ratio.
    const ON_ONE_REDIS: [(Target, Target); 3] = [
        (Target::ClusterPubSub, Target::SplitPubSub),
        (Target::ClusterQueue, Target::SplitQueue),
        (Target::RelayCluster, Target::RelayOne),
    ];

    fn label(self) -> &'static str {
        match self {
            Target::Baseline => Scenario::Fanout.baseline().1,
            Target::BareBatched => "bare, batched",
            Target::Memory => "memory",
            Target::PubSub => "redis pub/sub",
            Target::Queue => "redis queue",
            Target::SplitPubSub => "2 servers pubsub",
            Target::SplitQueue => "2 servers queue",
            Target::ClusterPubSub => "cluster pubsub",
            Target::ClusterQueue => "cluster queue",
            Target::RelayOne => "bare relay, redis",
            Target::RelayCluster => "bare relay, cluster",
        }
    }

    /// How many server processes share the room.
    fn servers(self) -> usize {
        match self {
            Target::SplitPubSub
            | Target::SplitQueue
            | Target::ClusterPubSub
            | Target::ClusterQueue
            | Target::RelayOne
            | Target::RelayCluster => 2,
            _ => 1,
        }
    }

    /// `room-server --layer` for this target; `None` for the bare servers.
    fn layer(self) -> Option<&'static str> {
        match self {
            Target::Baseline | Target::BareBatched | Target::RelayOne | Target::RelayCluster => {
                None
            }
            Target::Memory => Some("memory"),
            Target::PubSub | Target::SplitPubSub => Some("pubsub"),
            Target::Queue | Target::SplitQueue => Some("queue"),
            Target::ClusterPubSub => Some("pubsub-cluster"),
            Target::ClusterQueue => Some("queue-cluster"),
        }
    }

    fn needs_redis(self) -> bool {
        !matches!(
            self,
            Target::Baseline | Target::BareBatched | Target::Memory
        )
    }

    /// Whether it runs on a Redis Cluster (which needs `redis-cli` too).
    fn on_cluster(self) -> bool {
        matches!(
            self,
            Target::ClusterPubSub | Target::ClusterQueue | Target::RelayCluster
        )
    }

    /// `bare-broadcast --relay` for this target, if it relays.
    fn relay(self) -> Option<&'static str> {
        match self {
            Target::RelayOne => Some("one"),
            Target::RelayCluster => Some("cluster"),
            _ => None,
        }
    }
}

/// The targets of round `round` (from 0), in the order they run: as given
/// on even rounds, reversed on odd ones.
fn order(round: u32, targets: &[Target]) -> Vec<Target> {
    let mut order = targets.to_vec();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// What loadgen's `fanout` reports (its one line of JSON).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Report {
    deliveries_per_s: f64,
    sent: f64,
    missing: f64,
    own_missing: f64,
    closed: f64,
    stalled: bool,
    p50_us: f64,
    p99_us: f64,
    /// How busy the load generator's core was during the run (1.0: fully).
    client_busy: Option<f64>,
    /// How busy the server side (the server, and Redis if any) was while
    /// the client ran, in cores; measured here, not by the client.
    server_busy: Option<f64>,
    /// For the cluster queue room: on how many masters its keys were (the
    /// group's list and each server's membership version).
    masters: Option<usize>,
}

impl Report {
    /// What went wrong in this run, if anything, in words.
    fn trouble(&self) -> Option<String> {
        let mut parts = Vec::new();
        if self.missing > 0.0 {
            parts.push(format!("{} deliveries never arrived", self.missing));
        }
        if self.own_missing > 0.0 {
            parts.push(format!(
                "the sender missed {} of its own messages",
                self.own_missing
            ));
        }
        if self.closed > 0.0 {
            parts.push(format!("{} connection(s) closed early", self.closed));
        }
        if self.stalled {
            parts.push("the run stalled and stopped early".to_owned());
        }
        (!parts.is_empty()).then(|| parts.join(", "))
    }

    /// Whether neither side had its core to itself. In a run that was not
    /// held back, the server's core or the load generator's is nearly
    /// full; when both are well below, other processes had the CPUs, and
    /// then a server side of two processes (a server and Redis) gets a
    /// bigger share than one, so the ratios lean towards Redis.
    fn held_back(&self) -> bool {
        let busy = |side: Option<f64>| side.is_some_and(|b| b >= BUSY);
        self.server_busy.is_some()
            && self.client_busy.is_some()
            && !busy(self.server_busy)
            && !busy(self.client_busy)
    }
}

/// How busy a core must be for a run to count as not held back.
const BUSY: f64 = 0.9;

fn parse_report(stdout: &str) -> Result<Report, String> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| format!("no JSON line in the fanout client's output: {stdout:?}"))?;
    let field = |key| json_number(line, key).ok_or_else(|| format!("no \"{key}\" in {line}"));
    Ok(Report {
        deliveries_per_s: field("deliveries_per_s")?,
        sent: field("sent")?,
        missing: field("missing")?,
        own_missing: field("own_missing")?,
        closed: field("closed")?,
        stalled: field("stalled")? != 0.0,
        p50_us: field("p50_us")?,
        p99_us: field("p99_us")?,
        // Negative: the client could not read its CPU time.
        client_busy: Some(field("cpu_busy")?).filter(|busy| *busy >= 0.0),
        server_busy: None,
        masters: None,
    })
}

/// CPU time a process has used, in clock ticks (USER_HZ, 100 per second
/// on Linux), from `/proc/PID/stat`: utime + stime, counted after the `)`
/// that ends the command name (which may hold spaces). `None` off Linux.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    ticks_of(&stat)
}

fn ticks_of(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The CPU ticks of every process of a server side, if all can be read.
fn side_ticks(pids: &[u32]) -> Option<u64> {
    pids.iter().map(|&pid| cpu_ticks(pid)).sum()
}

/// A share of one core as a percentage, `-` if unknown.
fn percent(busy: Option<f64>) -> String {
    busy.map_or("-".to_owned(), |b| format!("{:.0}%", b * 100.0))
}

/// A throwaway redis-server, killed (and its log removed) when dropped.
/// The storm bench starts its own the same way.
pub(super) struct Redis {
    port: u16,
    log: PathBuf,
    server: Server,
}

impl Redis {
    pub(super) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The redis-server's process id, to read its CPU time.
    pub(super) fn pid(&self) -> u32 {
        self.server.child.id()
    }

    /// Starts redis-server on a free port (pinned with the server) and
    /// waits until it answers `PING`. Another process may take the free
    /// port first: then it tries another.
    pub(super) fn start(pin: bool) -> Result<Redis> {
        Redis::start_with(pin, |_| Vec::new())
    }

    /// [`start`](Self::start) with more arguments, made from the port.
    fn start_with(pin: bool, extra: impl Fn(u16) -> Vec<String>) -> Result<Redis> {
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = free_port()?;
            match Redis::start_on(port, pin, &extra(port)) {
                Ok(redis) => return Ok(redis),
                Err(why) => last_error = why,
            }
        }
        Err(fail(format!("cannot start redis-server: {last_error}")))
    }

    fn start_on(port: u16, pin: bool, extra: &[String]) -> Result<Redis, String> {
        let log = std::env::temp_dir().join(format!(
            "xtask-bench-redis-{}-{port}.log",
            std::process::id()
        ));
        // The same throwaway settings as `cargo xtask step --redis`: no
        // snapshots, no log of writes, the log in a file of its own.
        let child = command(Path::new("redis-server"), "0", pin)
            .args(steps::redis_args(port, &log))
            .args(["--daemonize", "no"])
            .args(extra)
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run redis-server: {e}"))?;
        let mut redis = Redis {
            port,
            log,
            server: Server { child },
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if steps::ping(port) {
                return Ok(redis);
            }
            if let Ok(Some(status)) = redis.server.child.try_wait() {
                let log = std::fs::read_to_string(&redis.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(2).collect();
                return Err(format!(
                    "redis-server exited ({status}) on port {port}: {}",
                    tail.join(" | ")
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "redis-server did not answer PING on port {port} within {} s",
                    STARTUP_TIMEOUT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // `server` is killed right after this, when the fields drop; the
        // log only holds its start-up lines.
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A throwaway Redis Cluster of six nodes, each a [`Redis`] (pinned with
/// the servers); every node is killed, and its cluster file removed, when
/// dropped.
struct Cluster {
    nodes: Vec<Redis>,
}

impl Cluster {
    fn start(pin: bool) -> Result<Cluster> {
        let mut nodes = Vec::new();
        for _ in 0..cluster::cluster_recipe::MASTERS * 2 {
            nodes.push(Redis::start_with(pin, cluster::cluster_node_args)?);
        }
        let cluster = Cluster { nodes };
        let ports: Vec<u16> = cluster.nodes.iter().map(|node| node.port).collect();
        cluster::form_redis_cluster(&ports)?;
        Ok(cluster)
    }

    /// Every node's URL, comma-separated: what `--redis` takes.
    fn urls(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(Redis::url).collect();
        urls.join(",")
    }

    /// On how many masters there are keys that match `pattern`, if every
    /// node answered. Where a room's keys land decides how many processes
    /// each of its messages wakes, which on one core is much of its cost.
    fn masters_holding(&self, pattern: &str) -> Option<usize> {
        let mut masters = 0;
        for node in &self.nodes {
            let role = cluster::redis_cli(node.port, &["ROLE"])?;
            if role.lines().next() != Some("master") {
                continue;
            }
            let keys = cluster::redis_cli(node.port, &["--scan", "--pattern", pattern])?;
            masters += usize::from(keys.lines().any(|key| !key.is_empty()));
        }
        Some(masters)
    }

    /// On how many masters `keys` are (whether or not they exist), if
    /// every node asked answered.
    fn masters_of(&self, keys: &[String]) -> Option<usize> {
        let port = self.nodes.first()?.port;
        let nodes = cluster::redis_cli(port, &["CLUSTER", "NODES"])?;
        let mut owners = Vec::new();
        for key in keys {
            let slot = cluster::redis_cli(port, &["CLUSTER", "KEYSLOT", key])?;
            let owner = owner_of(&nodes, slot.trim().parse().ok()?)?;
            if !owners.contains(&owner) {
                owners.push(owner);
            }
        }
        Some(owners.len())
    }
}

/// The id of the master that serves `slot`, by a `CLUSTER NODES` reply.
fn owner_of(nodes: &str, slot: u16) -> Option<&str> {
    let serves = |line: &&str| {
        cluster::cluster_recipe::owned_slots(line)
            .iter()
            .any(|(first, last)| (*first..=*last).contains(&slot))
    };
    nodes.lines().find(serves)?.split(' ').next()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            let _ = std::fs::remove_file(cluster::cluster_node_conf(node.port));
        }
    }
}

/// What every measurement shares.
struct Fanout<'a> {
    release: &'a Path,
    receivers: u32,
    seconds: u32,
    pin: bool,
}

impl Fanout<'_> {
    /// Starts one server of `target` on a free port (on `redis`, if it
    /// has one; relaying through `relay`'s keys, if it relays) and waits
    /// until it listens; returns it and its room's URL.
    fn start_server(
        &self,
        target: Target,
        redis: Option<&str>,
        relay: Option<RelayKeys>,
    ) -> Result<(Server, String)> {
        let label = target.label();
        let port = free_port()?;
        let mut cmd = match target.layer() {
            None => {
                let mut cmd = command(
                    &self.release.join(exe(Scenario::Fanout.baseline().0)),
                    "0",
                    self.pin,
                );
                // The relays write as the layers' runner does.
                if target == Target::BareBatched || target.relay().is_some() {
                    cmd.args(["--batch", "true"]);
                }
                if let (Some(mode), Some(redis), Some(keys)) = (target.relay(), redis, relay) {
                    cmd.args(["--relay", mode, "--redis", redis]).args([
                        "--key",
                        keys.own,
                        "--keys",
                        &keys.all.join(","),
                    ]);
                }
                cmd
            }
            Some(layer) => {
                let mut cmd = command(&self.release.join(exe("room-server")), "0", self.pin);
                cmd.args(["--layer", layer]).env("RUST_LOG", "warn");
                super::unlimited_inbound(&mut cmd);
                if let Some(redis) = redis {
                    cmd.args(["--redis", redis]);
                }
                cmd
            }
        };
        cmd.args(["--port", &port.to_string()])
            .stdout(Stdio::null());
        let child = cmd
            .spawn()
            .map_err(|e| fail(format!("cannot start {label}: {e}")))?;
        let mut server = Server { child };
        wait_for_port(&mut server, port, label)?;
        Ok((server, format!("ws://127.0.0.1:{port}/ws/bench")))
    }

    /// Starts the target's servers (and their Redis), runs the fan-out
    /// client against them, stops them.
    fn measure(&self, target: Target) -> Result<Report> {
        let label = target.label();
        let cluster = if target.on_cluster() {
            Some(Cluster::start(self.pin)?)
        } else {
            None
        };
        let redis = if target.needs_redis() && cluster.is_none() {
            Some(Redis::start(self.pin)?)
        } else {
            None
        };
        let redis_url = match (&redis, &cluster) {
            (Some(redis), _) => Some(redis.url()),
            (_, Some(cluster)) => Some(cluster.urls()),
            _ => None,
        };
        // A relay's servers each read a key of their own, named afresh each
        // time, so that on a cluster they land where they may, as a layer's
        // random process names do.
        let relay_keys: Vec<String> = match target.relay() {
            Some(_) => (0..target.servers())
                .map(|server| {
                    let nanos = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |since| since.subsec_nanos());
                    format!("fanout-relay-{}-{nanos}-{server}", std::process::id())
                })
                .collect(),
            None => Vec::new(),
        };
        let mut servers = Vec::new();
        let mut urls = Vec::new();
        for server in 0..target.servers() {
            let relay = relay_keys.get(server).map(|own| RelayKeys {
                own,
                all: &relay_keys,
            });
            let (server, url) = self.start_server(target, redis_url.as_deref(), relay)?;
            servers.push(server);
            urls.push(url);
        }
        // The fanout client's sender uses the first, and its receivers
        // take turns.
        let urls = urls.join(",");
        let mut side: Vec<u32> = servers.iter().map(|s| s.child.id()).collect();
        side.extend(redis.as_ref().map(|r| r.server.child.id()));
        if let Some(cluster) = &cluster {
            side.extend(cluster.nodes.iter().map(Redis::pid));
        }
        let (ticks_before, started) = (side_ticks(&side), Instant::now());
        let output = command(&self.release.join(exe("fanout")), "1", self.pin)
            .args(["--url", &urls])
            .args(["--receivers", &self.receivers.to_string()])
            .args(["--seconds", &self.seconds.to_string()])
            .args(Scenario::Fanout.loadgen_args())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| fail(format!("cannot run the fanout client: {e}")))?;
        let server_busy = match (ticks_before, side_ticks(&side)) {
            (Some(before), Some(after)) => {
                Some((after - before) as f64 / 100.0 / started.elapsed().as_secs_f64())
            }
            _ => None,
        };
        // The room-server's group is `bench`; its list and each server's
        // membership version end in `:group:bench`.
        let masters = match &cluster {
            Some(cluster) if target == Target::ClusterQueue => {
                cluster.masters_holding("*:group:bench")
            }
            Some(cluster) if target == Target::RelayCluster => cluster.masters_of(&relay_keys),
            _ => None,
        };
        drop(servers);
        drop(redis);
        drop(cluster);
        if !output.status.success() {
            return Err(fail(format!(
                "the fanout client against {label} failed ({}); its error is above",
                output.status
            )));
        }
        let report = parse_report(&String::from_utf8_lossy(&output.stdout))
            .map_err(|e| fail(format!("against {label}: {e}")))?;
        Ok(Report {
            server_busy,
            masters,
            ..report
        })
    }
}

/// The keys of a relaying server: its own, and every server's.
#[derive(Clone, Copy)]
struct RelayKeys<'a> {
    own: &'a str,
    all: &'a [String],
}

/// The figures of one round, by target, in [`Target::ALL`] order.
type Round = Vec<(Target, Report)>;

fn figure(round: &Round, target: Target) -> Option<f64> {
    round
        .iter()
        .find(|(t, _)| *t == target)
        .map(|(_, r)| r.deliveries_per_s)
}

/// `a / b` within each round that has both, for the median.
fn ratios(rounds: &[Round], a: Target, b: Target) -> Vec<f64> {
    rounds
        .iter()
        .filter_map(|round| Some(figure(round, a)? / figure(round, b)?))
        .collect()
}

fn print_round(round: &Round) {
    println!(
        "  {:<20} {:>13} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8} {:>8}",
        "server",
        "deliveries/s",
        "sent",
        "missing",
        "p50 µs",
        "p99 µs",
        "cpu srv",
        "cpu cli",
        "vs bare"
    );
    let baseline = figure(round, Target::Baseline);
    for (target, r) in round {
        let ratio = baseline.map_or(String::new(), |b| format!("{:.2}", r.deliveries_per_s / b));
        println!(
            "  {:<20} {:>13.0} {:>8.0} {:>8.0} {:>9.0} {:>9.0} {:>8} {:>8} {ratio:>8}",
            target.label(),
            r.deliveries_per_s,
            r.sent,
            r.missing,
            r.p50_us,
            r.p99_us,
            percent(r.server_busy),
            percent(r.client_busy),
        );
    }
    for (target, r) in round {
        if r.held_back() {
            println!(
                "  note: {}: neither core was busy (server {}, client {}): other processes \
                 had the CPUs, so this figure is not comparable",
                target.label(),
                percent(r.server_busy),
                percent(r.client_busy)
            );
        }
        if let Some(trouble) = r.trouble() {
            println!("  warning: {}: {trouble}", target.label());
        }
    }
    if let (Some(pubsub), Some(memory)) =
        (figure(round, Target::PubSub), figure(round, Target::Memory))
    {
        println!(
            "  {} / {}: {:.2}",
            Target::PubSub.label(),
            Target::Memory.label(),
            pubsub / memory
        );
    }
    if let (Some(split), Some(memory)) = (
        figure(round, Target::SplitPubSub),
        figure(round, Target::Memory),
    ) {
        println!(
            "  {} / {}: {:.2}",
            Target::SplitPubSub.label(),
            Target::Memory.label(),
            split / memory
        );
    }
    for (cluster, one) in Target::ON_ONE_REDIS {
        if let (Some(c), Some(o)) = (figure(round, cluster), figure(round, one)) {
            println!(
                "  {} / {}: {:.2}{}",
                cluster.label(),
                one.label(),
                c / o,
                placement(round, cluster)
            );
        }
    }
    if let Some(most) = ceiling(round) {
        println!(
            "  {} / {} at most: {most:.2} (were the cluster to cost it only what it costs the \
             relays)",
            Target::ClusterQueue.label(),
            Target::SplitQueue.label(),
        );
    }
}

/// Where a cluster room's keys were in `round`, in words, if known.
fn placement(round: &Round, target: Target) -> String {
    let masters = round
        .iter()
        .find(|(t, _)| *t == target)
        .and_then(|(_, r)| r.masters);
    match masters {
        Some(n) => format!(
            " (the room's keys on {n} of {} masters)",
            cluster::cluster_recipe::MASTERS
        ),
        None => String::new(),
    }
}

fn print_summary(rounds: &[Round], targets: &[Target]) {
    let n = rounds.len();
    let plural = if n == 1 { "" } else { "s" };
    println!("\nmedian of {n} round{plural}");
    println!(
        "  {:<20} {:>13} {:>18} {:>15}",
        "server",
        "deliveries/s",
        format!("vs {}", Target::Baseline.label()),
        format!("vs {}", Target::BareBatched.label()),
    );
    for &target in targets {
        let figures: Vec<f64> = rounds.iter().filter_map(|r| figure(r, target)).collect();
        let ratio = median(&ratios(rounds, target, Target::Baseline));
        let batched = median(&ratios(rounds, target, Target::BareBatched));
        println!(
            "  {:<20} {:>13.0} {ratio:>18.2} {batched:>15.2}",
            target.label(),
            median(&figures)
        );
    }
    for (target, against, goal, pair) in GOALS {
        let ratios = ratios(rounds, target, against);
        if ratios.is_empty() {
            continue;
        }
        let ratio = median(&ratios);
        let verdict = if ratio >= goal { "met" } else { "NOT met" };
        println!(
            "{} / {}{pair}: {ratio:.2} (median of {n} round{plural}; goal: at least \
             {goal:.2}, {verdict})",
            target.label(),
            against.label(),
        );
    }
    let floor = ratios(rounds, Target::RelayCluster, Target::RelayOne);
    if !floor.is_empty() {
        println!(
            "{} / {} (the floor: the same room with no layer, on the cluster against one \
             Redis): {:.2} (median of {n} round{plural})",
            Target::RelayCluster.label(),
            Target::RelayOne.label(),
            median(&floor),
        );
    }
    let ceilings: Vec<f64> = rounds.iter().filter_map(ceiling).collect();
    if !ceilings.is_empty() {
        println!(
            "{} / {} could be at most {:.2} (median of {n} round{plural}): its time per delivery \
             on one Redis, plus what the cluster adds to it with no layer",
            Target::ClusterQueue.label(),
            Target::SplitQueue.label(),
            median(&ceilings),
        );
    }
    // A cluster room's rounds differ most by where its keys landed: say
    // so next to each round's ratio.
    for (cluster, one) in [
        (Target::ClusterQueue, Target::SplitQueue),
        (Target::RelayCluster, Target::RelayOne),
    ] {
        let by_round: Vec<String> = rounds
            .iter()
            .filter_map(|round| {
                let masters = round.iter().find(|(t, _)| *t == cluster)?.1.masters?;
                let ratio = figure(round, cluster)? / figure(round, one)?;
                Some(format!("{ratio:.2} ({masters})"))
            })
            .collect();
        if !by_round.is_empty() {
            println!(
                "{} / {} by round, with the number of masters its keys were on: {}",
                cluster.label(),
                one.label(),
                by_round.join(", ")
            );
        }
    }
    let split = ratios(rounds, Target::SplitPubSub, Target::Memory);
    if !split.is_empty() {
        println!(
            "{} / {} (one room on two servers through Redis, against one server in memory): \
             {:.2} (median of {n} round{plural})",
            Target::SplitPubSub.label(),
            Target::Memory.label(),
            median(&split),
        );
    }
}

/// The best the cluster queue room could do in `round`, as a ratio to the
/// same room on one Redis: if the cluster cost it nothing beyond what it
/// costs the bare relays, its time per delivery would be its time on one
/// Redis plus the relays' difference. Times per delivery are the inverse
/// of deliveries per second, which holds while the server's core is
/// saturated, as it is in every Redis run of this bench.
fn ceiling(round: &Round) -> Option<f64> {
    let one = figure(round, Target::SplitQueue)?;
    let added = 1.0 / figure(round, Target::RelayCluster)? - 1.0 / figure(round, Target::RelayOne)?;
    Some(1.0 / (1.0 + one * added))
}

/// `cargo xtask bench fanout [--receivers N] [--seconds S] [--rounds R]`,
/// after the release build.
pub(super) fn run(
    release: &Path,
    receivers: u32,
    seconds: u32,
    rounds: u32,
    pin: bool,
) -> Result<()> {
    let redis = on_path("redis-server");
    let redis_cli = on_path("redis-cli");
    let targets: Vec<Target> = Target::ALL
        .into_iter()
        .filter(|t| redis || !t.needs_redis())
        .filter(|t| redis_cli || !t.on_cluster())
        .collect();
    let skipped_note = format!(
        "note: the Redis runs (redis pub/sub, redis queue, 2 servers pubsub and queue, cluster \
         pubsub and queue, the bare relays) were SKIPPED: redis-server is not on PATH; \
         {INSTALL_REDIS} and run again"
    );
    let cluster_note = format!(
        "note: the Redis Cluster runs (cluster pubsub, cluster queue, bare relay on the \
         cluster) were SKIPPED: redis-cli is not on PATH; {INSTALL_REDIS} and run again"
    );
    println!(
        "fanout: one sender and {receivers} receivers in one room, {} s per run, {rounds} \
         round(s), {}",
        seconds,
        Scenario::Fanout.describe()
    );
    let names: Vec<&str> = targets.iter().map(|t| t.label()).collect();
    println!("servers: {}", names.join(", "));
    println!(
        "cpu srv / cpu cli: how busy the server's core (with Redis) and the load generator's \
         were; near 100% on the client, the figure is the load generator's limit"
    );
    if redis {
        println!(
            "each Redis run starts its own redis-server (six for a cluster run), pinned with the \
             server to CPU 0"
        );
    } else {
        println!("{skipped_note}");
    }
    if redis && !redis_cli {
        println!("{cluster_note}");
    }

    let bench = Fanout {
        release,
        receivers,
        seconds,
        pin,
    };
    let mut results: Vec<Round> = Vec::new();
    for round in 0..rounds {
        let mut measured = Vec::new();
        for target in order(round, &targets) {
            measured.push((target, bench.measure(target)?));
        }
        // Printed in one order whatever the order of the runs.
        measured.sort_by_key(|(t, _)| Target::ALL.iter().position(|a| a == t));
        println!("\nround {}/{rounds}", round + 1);
        print_round(&measured);
        results.push(measured);
    }
    print_summary(&results, &targets);
    if !redis {
        println!("\n{skipped_note}");
    } else if !redis_cli {
        println!("\n{cluster_note}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(deliveries_per_s: f64) -> Report {
        Report {
            deliveries_per_s,
            sent: 100.0,
            missing: 0.0,
            own_missing: 0.0,
            closed: 0.0,
            stalled: false,
            p50_us: 1.0,
            p99_us: 2.0,
            client_busy: None,
            server_busy: None,
            masters: None,
        }
    }

    #[test]
    fn says_where_a_cluster_rooms_keys_were() {
        let round: Round = vec![
            (Target::SplitQueue, report(100.0)),
            (
                Target::ClusterQueue,
                Report {
                    masters: Some(2),
                    ..report(60.0)
                },
            ),
            (Target::ClusterPubSub, report(90.0)),
        ];
        assert_eq!(
            placement(&round, Target::ClusterQueue),
            " (the room's keys on 2 of 3 masters)"
        );
        assert_eq!(placement(&round, Target::ClusterPubSub), "");
    }

    #[test]
    fn bounds_the_cluster_room_by_what_the_layout_adds() {
        // On one Redis: 10 µs per delivery for the room, 5 for the relays;
        // on the cluster the relays take 7.5, so the room at best 12.5.
        let round: Round = vec![
            (Target::SplitQueue, report(100_000.0)),
            (Target::RelayOne, report(200_000.0)),
            (Target::RelayCluster, report(1.0 / 7.5e-6)),
        ];
        assert!((ceiling(&round).unwrap() - 0.8).abs() < 1e-9);
        assert_eq!(ceiling(&round[..2].to_vec()), None);
    }

    #[test]
    fn finds_the_master_of_a_slot() {
        // `CLUSTER NODES` of a three-master cluster, one slot migrating.
        let nodes = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7002@17002 master - 0 1700000000000 2 connected 5461-10921 10922 [10922->-c3]
c3 127.0.0.1:7003@17003 master - 0 1700000000000 3 connected 10923-16383
d4 127.0.0.1:7004@17004 slave a1 0 1700000000000 1 connected
";
        assert_eq!(owner_of(nodes, 0), Some("a1"));
        assert_eq!(owner_of(nodes, 5460), Some("a1"));
        assert_eq!(owner_of(nodes, 5461), Some("b2"));
        assert_eq!(owner_of(nodes, 10922), Some("b2"));
        assert_eq!(owner_of(nodes, 16383), Some("c3"));
        assert_eq!(owner_of("", 1), None);
    }

    #[test]
    fn reads_the_fanout_json() {
        let out = "{\"receivers\":100,\"seconds\":5.0,\"window\":16,\"sent\":8000,\
                   \"deliveries\":799000,\"deliveries_per_s\":159800.0,\"missing\":1000,\
                   \"own_missing\":0,\"closed\":0,\"stalled\":1,\"cpu_busy\":0.97,\
                   \"p50_us\":6000,\"p99_us\":12000}\n";
        let r = parse_report(out).unwrap();
        assert_eq!(
            r,
            Report {
                deliveries_per_s: 159_800.0,
                sent: 8000.0,
                missing: 1000.0,
                own_missing: 0.0,
                closed: 0.0,
                stalled: true,
                p50_us: 6000.0,
                p99_us: 12000.0,
                client_busy: Some(0.97),
                server_busy: None,
                masters: None,
            }
        );
        let unknown = out.replace("0.97", "-1.00");
        assert_eq!(parse_report(&unknown).unwrap().client_busy, None);
        assert_eq!(
            r.trouble().unwrap(),
            "1000 deliveries never arrived, the run stalled and stopped early"
        );
        assert_eq!(report(1.0).trouble(), None);
        // The echo client's line is not a fan-out report.
        assert!(parse_report("{\"rps\":1,\"round_trips\":5}").is_err());
        assert!(parse_report("fanout: cannot connect").is_err());
    }

    #[test]
    fn rounds_alternate_their_order() {
        let all = Target::ALL;
        assert_eq!(order(0, &all), all);
        let mut reversed = all;
        reversed.reverse();
        assert_eq!(order(1, &all), reversed);
        assert_eq!(order(1, &all)[0], Target::RelayCluster);
        assert_eq!(order(2, &all), all);
    }

    #[test]
    fn ratios_are_taken_within_each_round() {
        let rounds = vec![
            vec![
                (Target::Memory, report(100.0)),
                (Target::PubSub, report(80.0)),
            ],
            vec![
                (Target::Memory, report(200.0)),
                (Target::PubSub, report(100.0)),
            ],
            // A round without pub/sub (Redis skipped) has no ratio.
            vec![(Target::Memory, report(150.0))],
        ];
        assert_eq!(ratios(&rounds, Target::PubSub, Target::Memory), [0.8, 0.5]);
        assert!(ratios(&rounds, Target::Queue, Target::Memory).is_empty());
    }

    #[test]
    fn only_redis_targets_need_redis() {
        let needing: Vec<Target> = Target::ALL
            .into_iter()
            .filter(|t| t.needs_redis())
            .collect();
        assert_eq!(needing, &Target::ALL[3..]);
        assert_eq!(Target::SplitPubSub.layer(), Some("pubsub"));
        assert_eq!(Target::SplitPubSub.servers(), 2);
        assert_eq!(Target::ClusterQueue.layer(), Some("queue-cluster"));
        assert_eq!(Target::ClusterPubSub.servers(), 2);
        let on_cluster: Vec<Target> = Target::ALL.into_iter().filter(|t| t.on_cluster()).collect();
        assert_eq!(
            on_cluster,
            [
                Target::ClusterPubSub,
                Target::ClusterQueue,
                Target::RelayCluster
            ]
        );
        assert_eq!(
            Target::RelayCluster.layer(),
            None,
            "no layer: a bare server"
        );
        assert_eq!(Target::RelayCluster.relay(), Some("cluster"));
        assert_eq!(Target::RelayOne.relay(), Some("one"));
        assert_eq!(Target::BareBatched.relay(), None);
        for (cluster, one) in Target::ON_ONE_REDIS {
            assert!(cluster.on_cluster() && !one.on_cluster());
            assert_eq!(cluster.servers(), one.servers(), "the same room");
        }
        assert_eq!(Target::PubSub.servers(), 1);
        assert_eq!(Target::Baseline.layer(), None);
        assert_eq!(Target::Memory.layer(), Some("memory"));
    }

    #[test]
    fn reads_cpu_ticks_after_the_command_name() {
        let stat = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 37 0 0 20 0";
        assert_eq!(ticks_of(stat), Some(287));
        assert_eq!(ticks_of("42 (x) S 1"), None);
        if cfg!(target_os = "linux") {
            assert!(side_ticks(&[std::process::id()]).is_some());
        }
        assert_eq!(percent(Some(0.974)), "97%");
        let run = |server, client| Report {
            server_busy: server,
            client_busy: client,
            ..report(1.0)
        };
        assert!(run(Some(0.56), Some(0.32)).held_back());
        assert!(!run(Some(0.99), Some(0.32)).held_back(), "server-bound");
        assert!(!run(Some(0.60), Some(0.95)).held_back(), "client-bound");
        assert!(!run(None, Some(0.3)).held_back(), "unknown");
        assert_eq!(percent(None), "-");
    }

    #[test]
    fn a_closed_port_does_not_ping() {
        let port = free_port().unwrap();
        assert!(!steps::ping(port));
    }
}
