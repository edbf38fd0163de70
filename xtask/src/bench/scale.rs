//! The `scale` scenario: N connections in one group, spread over several
//! release servers of step 05 on one throwaway Redis, and what they cost:
//! handshakes, memory, a broadcast to all of them, a sustained load, and
//! (with `--rolling`) a rolling restart.
//!
//! One process may hold only so many open files (`ulimit -Hn`; 20,000 on
//! the machine the book was measured on, and not to be raised there), so
//! N connections need several servers and several load generators: each
//! server takes at most four fifths of the limit in connections (16,000),
//! each `scale` process of loadgen 15,000, binding loopback addresses of its
//! own (127.0.0.2, 127.0.0.3, ...) so that no address runs out of ports.
//! The bench says so, and refuses up front an N the machine cannot hold
//! (files, memory), saying what to change.
//!
//! The group is one whose members are not told of each other's joins:
//! step 05's `/ws/analytics` (`--layer queue`, the default: its alias is
//! the Redis queue layer). Step 05 has no such group on the pub/sub layer:
//! `/ws/notifications` (`--layer pubsub`) announces every join to every
//! member, N²/2 frames for N joins (5 billion at 100,000), so the bench
//! refuses pubsub above 10,000 connections.
//!
//! How the figures are taken, as the Phoenix and Centrifugo write-ups do:
//! latencies at the clients (each message carries its send time on
//! CLOCK_MONOTONIC, which all processes of the machine share, and each
//! receiver subtracts it from its own reading of that clock); memory from
//! the operating system (`VmRSS` of every server, summed) once it has
//! stopped moving; three warm-up messages before the broadcast is
//! measured; the sustained load in steady state (after the broadcast).
//! Everything, load generators included, runs on the same machine, so a
//! latency includes the load generators' own wait for a core.
//!
//! The baseline (unless `--no-baseline`, and not with `--curve`): the same
//! N connections, load generators and messages against as many bare
//! servers (loadgen's `bare-broadcast`: tokio-tungstenite and one tokio
//! broadcast channel per process, with the step's 2 KiB read buffer; no
//! framework, no layer, no Redis), measured after the step in the same
//! run. Bare servers share nothing, so each gets a sender of its own and
//! the message is sent into all of them at once. What the step's figures
//! are then measured against is what this machine, its kernel and these
//! load generators can do at all.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::fanout::Redis;
use super::idle::resident_kb;
use super::{Server, exe, free_port, json_number, wait_for_port};
use crate::steps::Step;
use crate::{Error, Result, fail};

/// The step whose servers are measured.
pub(super) const STEP: &str = "05";
/// The connections when `--connections` is not given: the issue's goal.
const DEFAULT_CONNECTIONS: u32 = 100_000;
/// Handshakes in flight, over all load generators.
const DEFAULT_IN_FLIGHT: u32 = 1_000;
/// The points of `--curve`.
const CURVE: [u32; 4] = [10_000, 25_000, 50_000, 100_000];
/// Above this, `/ws/notifications`' join announcements are the whole run.
const PUBSUB_MAX: u32 = 10_000;
/// Connections per `scale` process (its open-file limit less a margin).
const PER_CLIENT: u32 = 15_000;
/// A generous estimate of what one connection costs the machine: the
/// server's ~7 kB, the client's ~10 kB, two kernel sockets and slack.
const KB_PER_CONNECTION: u64 = 40;
/// Messages before the broadcast that are not measured (first-use costs).
const WARM_UP: u64 = 3;
/// The broadcast: messages, and the time between them.
const BROADCASTS: u64 = 10;
const BROADCAST_GAP_MS: u64 = 2_000;
/// The sustained load: one message a second for a minute.
const SUSTAINED: u64 = 60;
/// How long a report may wait for the last deliveries.
const REPORT_WAIT_S: u64 = 60;
/// How long the clients of a restarted server may take to come back.
const BACK_WAIT: Duration = Duration::from_secs(180);
/// The baseline's read buffer: axum-channels' default `read_buffer_size`.
const BARE_READ_BUFFER: usize = 2 * 1024;

/// What serves the connections: step 05 on one Redis, or the baseline.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Step,
    Bare,
}

/// The group, by the layer it is on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Layer {
    PubSub,
    Queue,
}

impl Layer {
    fn path(self) -> &'static str {
        match self {
            Layer::PubSub => "/ws/notifications",
            Layer::Queue => "/ws/analytics",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Layer::PubSub => "Redis pub/sub layer",
            Layer::Queue => "Redis queue layer",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Options {
    pub(super) connections: u32,
    servers: Option<u32>,
    layer: Layer,
    in_flight: u32,
    curve: bool,
    rolling: bool,
    baseline: bool,
}

pub(super) fn options(
    connections: Option<u32>,
    servers: Option<u32>,
    layer: Option<String>,
    in_flight: Option<u32>,
    curve: bool,
    rolling: bool,
    no_baseline: bool,
) -> Result<Options> {
    let layer = match layer.as_deref() {
        None | Some("queue") => Layer::Queue,
        Some("pubsub") => Layer::PubSub,
        Some(other) => {
            return Err(Error::Usage(format!(
                "--layer {other}: use queue (/ws/analytics) or pubsub (/ws/notifications)"
            )));
        }
    };
    if curve && connections.is_some() {
        return Err(Error::Usage(format!(
            "--curve runs {CURVE:?} connections; leave out --connections"
        )));
    }
    for (name, value) in [
        ("--connections", connections),
        ("--servers", servers),
        ("--in-flight", in_flight),
    ] {
        if value == Some(0) {
            return Err(Error::Usage(format!("{name} must be at least 1")));
        }
    }
    Ok(Options {
        connections: connections.unwrap_or(DEFAULT_CONNECTIONS),
        servers,
        layer,
        in_flight: in_flight.unwrap_or(DEFAULT_IN_FLIGHT),
        curve,
        rolling,
        baseline: !no_baseline && !curve,
    })
}

/// How many processes of each kind a run needs, or why it cannot run here.
#[derive(Debug, PartialEq)]
struct Plan {
    connections: u32,
    servers: u32,
    per_server: u32,
    clients: u32,
    per_client: u32,
}

/// The hard open-file limit of this process (what its children get too).
fn file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let hard = line.split_whitespace().nth(4)?;
    hard.parse().ok().or(Some(u64::MAX))
}

/// `MemAvailable` of `/proc/meminfo`, in kB.
fn available_kb() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn plan(
    connections: u32,
    servers: Option<u32>,
    layer: Layer,
    files: u64,
    available_kb: u64,
) -> Result<Plan> {
    if layer == Layer::PubSub && connections > PUBSUB_MAX {
        return Err(fail(format!(
            "--layer pubsub runs /ws/notifications, which announces every join to every member: \
             {connections} joins would send {:.1e} frames before anything is measured. Step 05 has \
             no silent group on the pub/sub layer; use --layer queue (/ws/analytics, silent joins) \
             or at most {PUBSUB_MAX} connections",
            f64::from(connections) * f64::from(connections) / 2.0
        )));
    }
    // Four fifths of the file limit: the server keeps a twentieth for its
    // own files, and the rest is headroom for the reconnections.
    let file_cap = u32::try_from(files / 5 * 4).unwrap_or(u32::MAX).max(1);
    let needed = connections.div_ceil(file_cap);
    let servers = servers.unwrap_or(needed);
    if servers < needed {
        return Err(fail(format!(
            "{connections} connections on {servers} server(s) is {} each, but one process may \
             hold at most {files} open files here (ulimit -Hn), so a server takes at most \
             {file_cap} connections: use --servers {needed} or more (or fewer --connections)",
            connections.div_ceil(servers),
        )));
    }
    let client_cap = PER_CLIENT.min(u32::try_from(files.saturating_sub(1_000)).unwrap_or(0));
    if client_cap == 0 {
        return Err(fail(format!(
            "one process may hold only {files} open files here (ulimit -Hn): too few for a load \
             generator; raise the limit"
        )));
    }
    let need_kb = u64::from(connections) * KB_PER_CONNECTION;
    if need_kb > available_kb {
        return Err(fail(format!(
            "{connections} connections need about {} MB of memory ({KB_PER_CONNECTION} kB each: \
             server, load generator and kernel), and {} MB are available: ask for at most {} \
             --connections, or free memory",
            need_kb / 1024,
            available_kb / 1024,
            available_kb / KB_PER_CONNECTION
        )));
    }
    let clients = connections.div_ceil(client_cap);
    Ok(Plan {
        connections,
        servers,
        per_server: connections.div_ceil(servers),
        clients,
        per_client: connections.div_ceil(clients),
    })
}

/// CPU time of a process, in clock ticks (utime + stime of /proc/PID/stat).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which may hold spaces: state is field 3,
    // utime 14, stime 15.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

/// A histogram of microseconds, as the `scale` client prints it: the low
/// edge of each bucket and its count.
#[derive(Debug, Default, Clone, PartialEq)]
struct Histogram {
    buckets: BTreeMap<u64, u64>,
    max: u64,
}

impl Histogram {
    fn merge(&mut self, pairs: &[(u64, u64)], max: u64) {
        for (low, count) in pairs {
            *self.buckets.entry(*low).or_default() += count;
        }
        self.max = self.max.max(max);
    }

    fn count(&self) -> u64 {
        self.buckets.values().sum()
    }

    /// The nearest-rank percentile, as a bucket's low edge (at most 3%
    /// under the value), in milliseconds; the exact maximum for 1.0.
    fn ms(&self, p: f64) -> f64 {
        if p >= 1.0 {
            return self.max as f64 / 1000.0;
        }
        let rank = ((p * self.count() as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (low, count) in &self.buckets {
            seen += count;
            if seen >= rank {
                return *low as f64 / 1000.0;
            }
        }
        0.0
    }
}

/// The pairs of `"key":[[a,b],[c,d]]` in `json`.
fn json_pairs(json: &str, key: &str) -> Option<Vec<(u64, u64)>> {
    let pattern = format!("\"{key}\":[");
    let rest = &json[json.find(&pattern)? + pattern.len()..];
    let body = &rest[..rest.find("]]").map_or(0, |end| end + 1)];
    body.split("],")
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (a, b) = pair.trim_matches(['[', ']']).split_once(',')?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect()
}

/// Adds the counts of `"key":{"a":1}` in `json` to `into`.
fn add_counts(into: &mut BTreeMap<String, u64>, json: &str, key: &str) {
    for (cause, count) in super::storm::json_counts(json, key).unwrap_or_default() {
        *into.entry(cause).or_default() += count;
    }
}

fn list_counts(counts: &BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "none".to_owned();
    }
    counts
        .iter()
        .map(|(cause, n)| format!("{cause} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One message's deliveries over every load generator.
#[derive(Debug, Default, Clone)]
struct Delivery {
    heard: u64,
    missing: u64,
    latency: Histogram,
}

/// The per-message part of the clients' `report` answers, merged.
fn merge_reports(answers: &[String]) -> Result<(BTreeMap<u64, Delivery>, u64)> {
    let mut messages: BTreeMap<u64, Delivery> = BTreeMap::new();
    let mut throughout = 0;
    for answer in answers {
        throughout += json_number(answer, "throughout").unwrap_or(0.0) as u64;
        for chunk in answer.split("{\"seq\":").skip(1) {
            let chunk = format!("{{\"seq\":{chunk}");
            let field = |key| {
                json_number(&chunk, key)
                    .map(|v| v as u64)
                    .ok_or_else(|| fail(format!("no {key} in a report: {chunk}")))
            };
            let entry = messages.entry(field("seq")?).or_default();
            entry.heard += field("heard")?;
            entry.missing += field("missing")?;
            let hist = json_pairs(&chunk, "hist").unwrap_or_default();
            entry.latency.merge(&hist, field("max_us")?);
        }
    }
    Ok((messages, throughout))
}

/// One `scale` process of loadgen, spoken to line by line.
struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    fn say(&mut self, command: &str) -> Result<()> {
        writeln!(self.stdin, "{command}").map_err(|e| fail(format!("a load generator: {e}")))
    }

    fn hear(&mut self) -> Result<String> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .map_err(|e| fail(format!("a load generator: {e}")))?;
        if !line.starts_with("{\"event\"") {
            return Err(fail(format!(
                "a load generator said {:?} (its error is above)",
                line.trim()
            )));
        }
        Ok(line)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Says `command` to every client, then reads every answer: they work at
/// the same time.
fn ask_all(clients: &mut [Client], command: &str) -> Result<Vec<String>> {
    for client in clients.iter_mut() {
        client.say(command)?;
    }
    clients.iter_mut().map(Client::hear).collect()
}

/// A server of the run, with what it takes to start it again.
struct StepServer {
    server: Server,
    port: u16,
    log: PathBuf,
}

/// Everything one measurement runs.
struct Fleet<'a> {
    release: &'a Path,
    step: &'a Step,
    plan: &'a Plan,
    layer: Layer,
    /// The Redis step 05's servers share; `None` for the bare servers of
    /// the baseline, which need none.
    redis: Option<Redis>,
    servers: Vec<StepServer>,
}

impl Fleet<'_> {
    fn start_server(&self, port: u16, log: &Path, index: usize) -> Result<Server> {
        let label = match self.redis {
            Some(_) => format!("server {} of step {}", index + 1, self.step.id),
            None => format!("bare server {}", index + 1),
        };
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| fail(format!("cannot open {}: {e}", log.display())))?;
        // The step logs to stdout (tracing's default), errors to stderr.
        let stdout = file
            .try_clone()
            .map_err(|e| fail(format!("cannot share {}: {e}", log.display())))?;
        let mut command = match &self.redis {
            Some(redis) => {
                let mut command = Command::new(self.release.join(exe(&self.step.package())));
                command
                    .env("HOST", "127.0.0.1")
                    .env("PORT", port.to_string())
                    .env("REDIS_URL", redis.url());
                command
            }
            None => {
                let mut command = Command::new(self.release.join(exe("bare-broadcast")));
                command.args([
                    "--port",
                    &port.to_string(),
                    "--read-buffer",
                    &BARE_READ_BUFFER.to_string(),
                ]);
                command
            }
        };
        let child = command
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            // Room for its share, and for clients that come back to it
            // while their old sockets are still closing.
            .env(
                "MAX_CONNECTIONS",
                (self.plan.per_server + 1_000).to_string(),
            )
            .stdout(stdout)
            .stderr(file)
            .spawn()
            .map_err(|e| fail(format!("cannot start {label}: {e}")))?;
        let mut server = Server { child };
        wait_for_port(&mut server, port, &label)?;
        Ok(server)
    }

    fn memory_kb(&self) -> Result<u64> {
        self.servers
            .iter()
            .map(|s| resident_kb(s.server.child.id()))
            .sum()
    }

    /// The servers' memory once it has stopped moving (two readings a
    /// second apart within 0.5%), after at least 2 s and at most 20 s.
    fn settled_memory_kb(&self) -> Result<u64> {
        std::thread::sleep(Duration::from_secs(1));
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = self.memory_kb()?;
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let now = self.memory_kb()?;
            if now.abs_diff(last) * 200 <= last || Instant::now() >= deadline {
                return Ok(now);
            }
            last = now;
        }
    }

    fn server_ticks(&self) -> u64 {
        self.servers
            .iter()
            .filter_map(|s| cpu_ticks(s.server.child.id()))
            .sum()
    }

    /// Lines at WARN or ERROR in the servers' logs.
    fn warnings(&self) -> Vec<String> {
        self.servers
            .iter()
            .filter_map(|s| std::fs::read_to_string(&s.log).ok())
            .flat_map(|text| {
                text.lines()
                    .filter(|l| {
                        l.contains(" WARN ") || l.contains(" ERROR ") || l.starts_with("error")
                    })
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// What one run measured.
#[derive(Debug, Default, Clone)]
struct Measured {
    connections: u32,
    servers: u32,
    clients: u32,
    opened: u64,
    failed: BTreeMap<String, u64>,
    ended: BTreeMap<String, u64>,
    open_s: f64,
    handshake: Histogram,
    memory_before_kb: u64,
    memory_idle_kb: u64,
    memory_loaded_kb: u64,
    memory_closed_kb: u64,
    broadcast: BTreeMap<u64, Delivery>,
    sustained: BTreeMap<u64, Delivery>,
    sustained_s: f64,
    redis_cpu: f64,
    servers_cpu: f64,
    resent: u64,
    /// Messages the sender never heard back, after every try.
    unsent: u64,
    rolling: Option<Rolling>,
    warnings: Vec<String>,
    load_before: String,
    load_after: String,
}

#[derive(Debug, Default, Clone)]
struct Rolling {
    /// Per server: seconds from its SIGTERM until every connection was
    /// open again.
    back_after: Vec<f64>,
    total_s: f64,
    failed: BTreeMap<String, u64>,
    ended: BTreeMap<String, u64>,
    handshake: Histogram,
    messages: BTreeMap<u64, Delivery>,
    throughout: u64,
}

impl Measured {
    fn kb_per_connection(&self) -> f64 {
        self.memory_idle_kb.saturating_sub(self.memory_before_kb) as f64
            / f64::from(self.connections)
    }

    fn returned(&self) -> f64 {
        let taken = self.memory_loaded_kb.saturating_sub(self.memory_before_kb) as f64;
        if taken <= 0.0 {
            return 1.0;
        }
        self.memory_loaded_kb.saturating_sub(self.memory_closed_kb) as f64 / taken
    }

    fn pooled(messages: &BTreeMap<u64, Delivery>) -> Histogram {
        let mut all = Histogram::default();
        for delivery in messages.values() {
            for (low, count) in &delivery.latency.buckets {
                *all.buckets.entry(*low).or_default() += count;
            }
            all.max = all.max.max(delivery.latency.max);
        }
        all
    }

    /// Whether some message of the broadcast never went out, or never
    /// reached everyone: then its latencies describe nothing.
    fn broadcast_failed(&self) -> bool {
        self.unsent > 0
            || self
                .broadcast
                .values()
                .any(|d| d.heard < u64::from(self.connections))
    }

    fn lost(messages: &BTreeMap<u64, Delivery>) -> u64 {
        messages.values().map(|d| d.missing).sum()
    }
}

/// Sums the `status`-like answers of the clients.
fn tally_status(
    answers: &[String],
) -> (u64, BTreeMap<String, u64>, BTreeMap<String, u64>, Histogram) {
    let mut open = 0;
    let mut failed = BTreeMap::new();
    let mut ended = BTreeMap::new();
    let mut handshake = Histogram::default();
    for answer in answers {
        open += json_number(answer, "connected").unwrap_or(0.0) as u64;
        add_counts(&mut failed, answer, "failed");
        add_counts(&mut ended, answer, "ended");
        let max = json_number(answer, "handshake_max_us").unwrap_or(0.0) as u64;
        handshake.merge(
            &json_pairs(answer, "handshake_hist").unwrap_or_default(),
            max,
        );
    }
    (open, failed, ended, handshake)
}

fn start_clients(
    release: &Path,
    plan: &Plan,
    urls: &str,
    layer: Layer,
    in_flight: u32,
    kind: Kind,
) -> Result<(Vec<Client>, Vec<Client>)> {
    let spawn = |connections: u32, first: u32, sources: String, in_flight: u32, sender: bool| {
        let mut cmd = Command::new(release.join(exe("scale")));
        cmd.args(["--urls", urls])
            .args(["--connections", &connections.to_string()])
            .args(["--first", &first.to_string()])
            .args(["--sources", &sources])
            .args(["--in-flight", &in_flight.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if sender {
            cmd.arg("--sender");
        }
        if layer == Layer::PubSub {
            cmd.arg("--json");
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| fail(format!("cannot start loadgen's scale: {e}")))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(fail("the load generator has no pipes"));
        };
        Ok(Client {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        })
    };
    let per_process_in_flight = in_flight.div_ceil(plan.clients).max(1);
    let mut clients = Vec::new();
    for i in 0..plan.clients {
        let first = i * plan.per_client;
        let count = plan.per_client.min(plan.connections - first);
        // Two loopback addresses per process: 7,500 ports each at most,
        // with room for sockets in TIME_WAIT after a restart.
        let sources = format!("127.0.0.{},127.0.0.{}", 2 + 2 * i, 3 + 2 * i);
        clients.push(spawn(count, first, sources, per_process_in_flight, false)?);
    }
    // A sender is a connection of its own, so that its process can be told
    // to send while the others are asked how they are doing. Step 05 needs
    // one, to the first server: the layer takes its messages to every
    // server. Bare servers share nothing, so each gets one (connection `k`
    // of the bench goes to server `k`).
    let senders = match kind {
        Kind::Step => 1,
        Kind::Bare => plan.servers,
    };
    let senders = (0..senders)
        .map(|k| spawn(1, k, "127.0.0.250".to_owned(), 1, true))
        .collect::<Result<Vec<_>>>()?;
    Ok((clients, senders))
}

/// Has every sender send `FIRST COUNT INTERVAL_MS`, at the same time, and
/// adds up what they sent again and never got out.
fn send_all(senders: &mut [Client], what: &str) -> Result<(u64, u64)> {
    let answers = ask_all(senders, &format!("send {what}"))?;
    Ok(answers.iter().fold((0, 0), |(resent, unsent), answer| {
        (
            resent + json_number(answer, "resent").unwrap_or(0.0) as u64,
            unsent + json_number(answer, "unsent").unwrap_or(0.0) as u64,
        )
    }))
}

/// One run at `connections`: everything of the module documentation.
fn measure(
    release: &Path,
    step: &Step,
    o: &Options,
    connections: u32,
    rolling: bool,
    kind: Kind,
) -> Result<Measured> {
    let files = file_limit().unwrap_or(u64::MAX);
    let plan = plan(
        connections,
        o.servers,
        o.layer,
        files,
        available_kb().unwrap_or(u64::MAX),
    )?;
    match kind {
        Kind::Step => println!(
            "\nscale: {connections} connections into {} ({}) on {} server(s) of step {} \
             (~{} each), one Redis, {} load generator process(es) (~{} each)",
            o.layer.path(),
            o.layer.label(),
            plan.servers,
            step.id,
            plan.per_server,
            plan.clients,
            plan.per_client
        ),
        Kind::Bare => println!(
            "\nscale, baseline: the same {connections} connections on {} bare server(s) \
             (loadgen's bare-broadcast, ~{} each; no layer, no Redis), {} load generator \
             process(es), one sender into each server",
            plan.servers, plan.per_server, plan.clients
        ),
    }
    println!(
        "  one process may hold at most {files} open files here (ulimit -Hn), so the \
         connections are spread over processes; {} handshakes in flight in all",
        o.in_flight
    );
    let load_before = load_average();
    println!("  load average before: {load_before}");

    let redis = match kind {
        Kind::Step => Some(Redis::start(false)?),
        Kind::Bare => None,
    };
    let mut fleet = Fleet {
        release,
        step,
        plan: &plan,
        layer: o.layer,
        redis,
        servers: Vec::new(),
    };
    for index in 0..plan.servers as usize {
        let port = free_port()?;
        let log = std::env::temp_dir().join(format!("xtask-bench-scale-server-{index}.log"));
        // A fresh log per run.
        File::create(&log).map_err(|e| fail(format!("cannot create {}: {e}", log.display())))?;
        let server = fleet.start_server(port, &log, index)?;
        fleet.servers.push(StepServer { server, port, log });
    }
    let urls: Vec<String> = fleet
        .servers
        .iter()
        .map(|s| format!("ws://127.0.0.1:{}{}", s.port, fleet.layer.path()))
        .collect();
    let memory_before_kb = fleet.settled_memory_kb()?;

    let (mut clients, mut senders) =
        start_clients(release, &plan, &urls.join(","), o.layer, o.in_flight, kind)?;
    // The senders first, so that they hear the warm-up.
    ask_all(&mut senders, "open")?;
    let started = Instant::now();
    let answers = ask_all(&mut clients, "open")?;
    let open_s = started.elapsed().as_secs_f64();
    let (opened, failed, ended, handshake) = tally_status(&answers);
    println!(
        "  opened {opened} of {connections} in {open_s:.1} s (handshake p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms); failed: {}",
        handshake.ms(0.5),
        handshake.ms(0.99),
        handshake.ms(1.0),
        list_counts(&failed)
    );
    let memory_idle_kb = fleet.settled_memory_kb()?;
    println!(
        "  servers' memory: {memory_before_kb} kB before, {memory_idle_kb} kB with the connections idle"
    );
    if opened < u64::from(connections) {
        return Err(fail(format!(
            "only {opened} of {connections} connections opened (failures: {}); the servers' logs \
             are {}",
            list_counts(&failed),
            fleet.servers[0].log.display()
        )));
    }

    ask_all(&mut clients, "mark")?;
    send_all(&mut senders, &format!("0 {WARM_UP} 500"))?;
    ask_all(&mut clients, &format!("report 0 {WARM_UP} {REPORT_WAIT_S}"))?;

    let first = WARM_UP;
    let (mut resent, mut unsent) = send_all(
        &mut senders,
        &format!("{first} {BROADCASTS} {BROADCAST_GAP_MS}"),
    )?;
    let answers = ask_all(
        &mut clients,
        &format!("report {first} {BROADCASTS} {REPORT_WAIT_S}"),
    )?;
    let (broadcast, _) = merge_reports(&answers)?;
    let pooled = Measured::pooled(&broadcast);
    println!(
        "  broadcast of {BROADCASTS}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; missing {}",
        pooled.ms(0.5),
        pooled.ms(0.99),
        pooled.ms(1.0),
        Measured::lost(&broadcast)
    );

    let first = WARM_UP + BROADCASTS;
    let ticks = ticks_per_second();
    let redis_pid = fleet.redis.as_ref().map(Redis::pid);
    let (redis_before, servers_before) = (redis_pid.and_then(cpu_ticks), fleet.server_ticks());
    // Sixty messages that each fail five times would take a quarter of an
    // hour to find out what the broadcast already said.
    let sustained_count = if unsent > 0 {
        println!("  sustained: not run, the broadcast's group_send failed");
        0
    } else {
        SUSTAINED
    };
    let started = Instant::now();
    let (again, never) = send_all(&mut senders, &format!("{first} {sustained_count} 1000"))?;
    resent += again;
    unsent += never;
    let answers = ask_all(
        &mut clients,
        &format!("report {first} {sustained_count} {REPORT_WAIT_S}"),
    )?;
    let sustained_s = started.elapsed().as_secs_f64();
    let (redis_after, servers_after) = (redis_pid.and_then(cpu_ticks), fleet.server_ticks());
    let redis_cpu = redis_after
        .zip(redis_before)
        .map_or(0.0, |(a, b)| (a - b) as f64 / ticks / sustained_s);
    let servers_cpu = (servers_after - servers_before) as f64 / ticks / sustained_s;
    let (sustained, _) = merge_reports(&answers)?;
    let heard: u64 = sustained.values().map(|d| d.heard).sum();
    println!(
        "  sustained, 1 message/s for {SUSTAINED} s: {:.0} deliveries/s, p99 {:.0} ms, lost {}, \
         Redis {:.0}% of a core, servers {:.0}%",
        heard as f64 / sustained_s,
        Measured::pooled(&sustained).ms(0.99),
        Measured::lost(&sustained),
        redis_cpu * 100.0,
        servers_cpu * 100.0
    );

    let rolling = if rolling {
        Some(roll(
            &mut fleet,
            &mut clients,
            senders,
            first + SUSTAINED,
            connections,
        )?)
    } else {
        drop(senders);
        None
    };

    let memory_loaded_kb = fleet.memory_kb()?;
    ask_all(&mut clients, "close")?;
    let memory_closed_kb = fleet.settled_memory_kb()?;
    println!(
        "  servers' memory: {memory_loaded_kb} kB before closing, {memory_closed_kb} kB after"
    );
    drop(clients);
    let warnings = fleet.warnings();
    let load_after = load_average();
    Ok(Measured {
        connections,
        servers: plan.servers,
        clients: plan.clients,
        opened,
        failed,
        ended,
        open_s,
        handshake,
        memory_before_kb,
        memory_idle_kb,
        memory_loaded_kb,
        memory_closed_kb,
        broadcast,
        sustained,
        sustained_s,
        redis_cpu,
        servers_cpu,
        resent,
        unsent,
        rolling,
        warnings,
        load_before,
        load_after,
    })
}

/// Stops each server with SIGTERM and starts it again on its port, one at
/// a time, while a message a second goes to the group; then counts what
/// the members owed them missed: those connected from before a message
/// was sent until 5 s after it (loadgen's `report`), since in a rolling
/// restart every connection ends once and none is connected throughout.
fn roll(
    fleet: &mut Fleet,
    clients: &mut [Client],
    mut senders: Vec<Client>,
    first: u64,
    connections: u32,
) -> Result<Rolling> {
    ask_all(clients, "mark")?;
    let stop = Arc::new(AtomicBool::new(false));
    let sending = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<u64> {
            let mut seq = first;
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                send_all(&mut senders, &format!("{seq} 1 0"))?;
                seq += 1;
                let next = Duration::from_secs(seq - first);
                std::thread::sleep(next.saturating_sub(started.elapsed()));
            }
            Ok(seq - first)
        })
    };
    let started = Instant::now();
    let mut back_after = Vec::new();
    for index in 0..fleet.servers.len() {
        let killed = Instant::now();
        let pid = fleet.servers[index].server.child.id();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while fleet.servers[index]
            .server
            .child
            .try_wait()
            .ok()
            .flatten()
            .is_none()
        {
            if Instant::now() >= deadline {
                println!(
                    "  server {} did not stop within 30 s of SIGTERM; killed",
                    index + 1
                );
                let _ = fleet.servers[index].server.child.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let (port, log) = (fleet.servers[index].port, fleet.servers[index].log.clone());
        fleet.servers[index].server = fleet.start_server(port, &log, index)?;
        let deadline = Instant::now() + BACK_WAIT;
        loop {
            let (open, ..) = tally_status(&ask_all(clients, "status")?);
            if open >= u64::from(connections) {
                break;
            }
            if Instant::now() >= deadline {
                stop.store(true, Ordering::Relaxed);
                return Err(fail(format!(
                    "after restarting server {}, only {open} of {connections} connections came \
                     back within {} s",
                    index + 1,
                    BACK_WAIT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let took = killed.elapsed().as_secs_f64();
        println!(
            "  server {} restarted: all {connections} back after {took:.1} s",
            index + 1
        );
        back_after.push(took);
    }
    let total_s = started.elapsed().as_secs_f64();
    // A few more messages with everyone back, then the count.
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let count = sending
        .join()
        .map_err(|_| fail("the sending thread panicked"))??;
    let (_, failed, ended, handshake) = tally_status(&ask_all(clients, "status")?);
    let answers = ask_all(clients, &format!("report {first} {count} {REPORT_WAIT_S}"))?;
    let (messages, throughout) = merge_reports(&answers)?;
    let rolling = Rolling {
        back_after,
        total_s,
        failed,
        ended,
        handshake,
        messages,
        throughout,
    };
    println!(
        "  rolling restart: {total_s:.1} s; failed handshakes: {}; connections ended: {}; \
         {count} messages, lost to members connected from before each until 5 s after \
         ({throughout} never disconnected): {}",
        list_counts(&rolling.failed),
        list_counts(&rolling.ended),
        Measured::lost(&rolling.messages)
    );
    Ok(rolling)
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT MET" }
}

/// Whether a failure cause is a 5xx other than a 503 with Retry-After.
fn is_bad_5xx(cause: &str) -> bool {
    cause.starts_with("http 5") && cause != "http 503 retry-after"
}

/// Step 05's figures beside the bare servers' of the same run.
fn print_baseline(m: &Measured, bare: &Measured) {
    let (ours, theirs) = (
        Measured::pooled(&m.broadcast),
        Measured::pooled(&bare.broadcast),
    );
    let (ours_s, theirs_s) = (
        Measured::pooled(&m.sustained),
        Measured::pooled(&bare.sustained),
    );
    let rate = |h: &Histogram, m: &Measured| h.count() as f64 / m.sustained_s.max(f64::EPSILON);
    println!(
        "  against {} bare servers in this run (loadgen's bare-broadcast, same connections, \
         load generators and messages; step / bare, lower is better but for deliveries/s):",
        bare.servers
    );
    println!(
        "    {:<28} {:>10} {:>10} {:>7}",
        "", "step 05", "bare", "ratio"
    );
    // The last field says whether the ratio means anything. Not for the
    // first delivery: the bare servers' is a fraction of a millisecond, the
    // step's the way through Redis.
    let rows = [
        (
            "handshake p99 (ms)",
            m.handshake.ms(0.99),
            bare.handshake.ms(0.99),
            true,
        ),
        (
            "kB per idle connection",
            m.kb_per_connection(),
            bare.kb_per_connection(),
            true,
        ),
        ("broadcast first (ms)", ours.ms(0.0), theirs.ms(0.0), false),
        ("broadcast p50 (ms)", ours.ms(0.5), theirs.ms(0.5), true),
        ("broadcast p99 (ms)", ours.ms(0.99), theirs.ms(0.99), true),
        ("broadcast max (ms)", ours.ms(1.0), theirs.ms(1.0), true),
        (
            "sustained deliveries/s",
            rate(&ours_s, m),
            rate(&theirs_s, bare),
            true,
        ),
        (
            "sustained p99 (ms)",
            ours_s.ms(0.99),
            theirs_s.ms(0.99),
            true,
        ),
    ];
    for (name, ours, theirs, compared) in rows {
        // Two decimals for the small figures (kB), none for the rest.
        let places = if ours.max(theirs) < 100.0 { 2 } else { 0 };
        let ratio = if compared {
            format!("{:.2}", ours / theirs.max(f64::EPSILON))
        } else {
            "-".to_owned()
        };
        println!("    {name:<28} {ours:>10.places$} {theirs:>10.places$} {ratio:>7}");
    }
    println!(
        "    bare: {} missing in the broadcast, {} lost sustained, {} never sent",
        Measured::lost(&bare.broadcast),
        Measured::lost(&bare.sustained),
        bare.unsent
    );
}

fn print_report(m: &Measured, baseline: Option<&Measured>) {
    let n = m.connections;
    println!(
        "\n== {n} connections, {} servers, {} load generators ==",
        m.servers, m.clients
    );
    println!(
        "  load average: {} before, {} after",
        m.load_before, m.load_after
    );
    println!(
        "  opening: {} opened in {:.1} s; handshake p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; \
         failed: {}; ended: {}",
        m.opened,
        m.open_s,
        m.handshake.ms(0.5),
        m.handshake.ms(0.99),
        m.handshake.ms(1.0),
        list_counts(&m.failed),
        list_counts(&m.ended)
    );
    // After a rolling restart the servers are new processes: what they
    // return says nothing about what the first ones took.
    let returned = if m.rolling.is_some() {
        "returned: not measured (the servers were restarted)".to_owned()
    } else {
        format!("{:.0}% returned", m.returned() * 100.0)
    };
    println!(
        "  memory (all servers): {} kB before, {} kB idle, {} kB before closing, {} kB after: \
         {:.2} kB per idle connection, {returned}",
        m.memory_before_kb,
        m.memory_idle_kb,
        m.memory_loaded_kb,
        m.memory_closed_kb,
        m.kb_per_connection(),
    );
    // `first`: the member that had it soonest, which is the way through
    // the layer (and Redis) before any member's share of the work.
    println!("  broadcast, time until each member had it (ms):");
    println!(
        "    {:>7} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "message", "heard", "missing", "first", "p50", "p99", "max"
    );
    for (seq, d) in &m.broadcast {
        println!(
            "    {:>7} {:>9} {:>8} {:>8.0} {:>8.0} {:>8.0} {:>8.0}",
            seq - WARM_UP + 1,
            d.heard,
            d.missing,
            d.latency.ms(0.0),
            d.latency.ms(0.5),
            d.latency.ms(0.99),
            d.latency.ms(1.0)
        );
    }
    let pooled = Measured::pooled(&m.broadcast);
    println!(
        "    {:>7} {:>9} {:>8} {:>8.0} {:>8.0} {:>8.0} {:>8.0}",
        "all",
        pooled.count(),
        Measured::lost(&m.broadcast),
        pooled.ms(0.0),
        pooled.ms(0.5),
        pooled.ms(0.99),
        pooled.ms(1.0)
    );
    let sustained = Measured::pooled(&m.sustained);
    println!(
        "  sustained ({SUSTAINED} messages, 1/s): {} deliveries in {:.1} s ({:.0}/s), p50 {:.0} ms, \
         p99 {:.0} ms, max {:.0} ms, lost {}; CPU over that time: Redis {:.1}% of one core, the \
         servers {:.0}% (of 200%)",
        sustained.count(),
        m.sustained_s,
        sustained.count() as f64 / m.sustained_s,
        sustained.ms(0.5),
        sustained.ms(0.99),
        sustained.ms(1.0),
        Measured::lost(&m.sustained),
        m.redis_cpu * 100.0,
        m.servers_cpu * 100.0
    );
    if m.unsent > 0 {
        println!(
            "  {} message(s) never came back to the sender after 5 tries: the group_send failed \
             (the servers' log lines below say why)",
            m.unsent
        );
    }
    if m.resent > 0 {
        println!(
            "  the sender sent {} message(s) again (not heard back within 10 s)",
            m.resent
        );
    }
    if let Some(r) = &m.rolling {
        let backs: Vec<String> = r.back_after.iter().map(|s| format!("{s:.1}")).collect();
        println!(
            "  rolling restart: {:.1} s in all; per server, s from SIGTERM until all {n} were back: {}",
            r.total_s,
            backs.join(", ")
        );
        println!(
            "    handshakes again: {} (p99 {:.0} ms); failed: {}; connections ended: {}",
            r.handshake.count(),
            r.handshake.ms(0.99),
            list_counts(&r.failed),
            list_counts(&r.ended)
        );
        println!(
            "    {} messages during it; lost to members connected from before each until 5 s after ({} never disconnected): {}",
            r.messages.len(),
            r.throughout,
            Measured::lost(&r.messages)
        );
    }
    println!("  server log lines at WARN or ERROR: {}", m.warnings.len());
    for line in m.warnings.iter().take(3) {
        println!("    {line}");
    }
    if let Some(bare) = baseline {
        print_baseline(m, bare);
    }

    println!("\n  goals:");
    let all_open = m.opened == u64::from(n) && m.failed.is_empty();
    println!("  - all {n} open, none refused: {}", verdict(all_open));
    println!(
        "  - at most 7 kB per idle connection: {:.2} kB, {}",
        m.kb_per_connection(),
        verdict(m.kb_per_connection() <= 7.0)
    );
    let bare = baseline.map_or(String::new(), |bare| {
        format!(
            " (the bare servers: {:.0} ms)",
            Measured::pooled(&bare.broadcast).ms(0.99)
        )
    });
    println!(
        "  - broadcast p99 under 1 s: {:.0} ms, {}{bare}",
        pooled.ms(0.99),
        verdict(pooled.ms(0.99) < 1000.0 && Measured::lost(&m.broadcast) == 0 && m.unsent == 0)
    );
    let heard_all = m.sustained.values().all(|d| d.heard >= u64::from(n));
    println!(
        "  - nothing lost, sustained: {} lost, {}",
        Measured::lost(&m.sustained),
        verdict(
            Measured::lost(&m.sustained) == 0 && heard_all && m.sustained.len() as u64 == SUSTAINED
        )
    );
    if m.rolling.is_none() {
        println!(
            "  - at least 90% of the memory returned: {:.0}%, {}",
            m.returned() * 100.0,
            verdict(m.returned() >= 0.9)
        );
    }
    if let Some(r) = &m.rolling {
        let bad = r.failed.keys().any(|c| is_bad_5xx(c));
        println!(
            "  - rolling restart, no 5xx but 503 with Retry-After: {}",
            verdict(!bad)
        );
        println!(
            "  - rolling restart, nothing lost to members connected across a message: {}",
            verdict(Measured::lost(&r.messages) == 0)
        );
    }
}

/// The table of `--curve`, in Markdown.
fn curve_table(points: &[Measured]) -> String {
    let mut table = String::from(
        "| connections | servers | opened | failed | all open after | handshake p50 | handshake p99 | kB per idle connection | broadcast p50 | broadcast p99 | broadcast max | sustained p99 | lost | Redis CPU | memory returned |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for m in points {
        if m.broadcast_failed() {
            let _ = writeln!(
                table,
                "| {} | {} | {} | {} | {:.1} s | {:.0} ms | {:.0} ms | {:.2} | failed | failed | failed | not run | | | {:.0}% |",
                thousands(u64::from(m.connections)),
                m.servers,
                thousands(m.opened),
                m.failed.values().sum::<u64>(),
                m.open_s,
                m.handshake.ms(0.5),
                m.handshake.ms(0.99),
                m.kb_per_connection(),
                m.returned() * 100.0
            );
            continue;
        }
        let b = Measured::pooled(&m.broadcast);
        let s = Measured::pooled(&m.sustained);
        let failed: u64 = m.failed.values().sum();
        let _ = writeln!(
            table,
            "| {} | {} | {} | {failed} | {:.1} s | {:.0} ms | {:.0} ms | {:.2} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {} | {:.1}% | {:.0}% |",
            thousands(u64::from(m.connections)),
            m.servers,
            thousands(m.opened),
            m.open_s,
            m.handshake.ms(0.5),
            m.handshake.ms(0.99),
            m.kb_per_connection(),
            b.ms(0.5),
            b.ms(0.99),
            b.ms(1.0),
            s.ms(0.99),
            Measured::lost(&m.broadcast) + Measured::lost(&m.sustained),
            m.redis_cpu * 100.0,
            m.returned() * 100.0
        );
    }
    table
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The plot of `--curve`: three panels side by side, each one figure
/// against the connections, drawn as SVG polylines.
fn curve_svg(points: &[(f64, [f64; 3])]) -> String {
    const PANEL_W: f64 = 240.0;
    const PANEL_H: f64 = 180.0;
    const LEFT: f64 = 48.0;
    const TOP: f64 = 34.0;
    const GAP: f64 = 70.0;
    let titles = [
        "server memory, kB per idle connection",
        "handshake p99, ms",
        "broadcast p99, ms",
    ];
    let colours = ["#1f77b4", "#d62728", "#2ca02c"];
    let width = LEFT + 3.0 * PANEL_W + 2.0 * GAP + 20.0;
    let height = TOP + PANEL_H + 50.0;
    let max_n = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (panel, title) in titles.iter().enumerate() {
        let x0 = LEFT + panel as f64 * (PANEL_W + GAP);
        let y_max = nice_ceiling(points.iter().map(|p| p.1[panel]).fold(0.0, f64::max));
        let x = |n: f64| x0 + n / max_n * PANEL_W;
        let y = |v: f64| TOP + PANEL_H - v / y_max * PANEL_H;
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-weight=\"bold\">{title}</text>",
            x0 + PANEL_W / 2.0,
            TOP - 14.0
        );
        let _ = writeln!(
            svg,
            "<path d=\"M{x0:.1},{TOP:.1} V{:.1} H{:.1}\" fill=\"none\" stroke=\"#333\"/>",
            TOP + PANEL_H,
            x0 + PANEL_W
        );
        for step in 0..=4 {
            let v = y_max * f64::from(step) / 4.0;
            let (x1, yv, label) = (x0 + PANEL_W, y(v), trim_number(v));
            let _ = writeln!(
                svg,
                "<line x1=\"{x0:.1}\" x2=\"{x1:.1}\" y1=\"{yv:.1}\" y2=\"{yv:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>",
                x0 - 4.0,
                yv + 4.0,
            );
        }
        for (n, _) in points {
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}k</text>",
                x(*n),
                TOP + PANEL_H + 14.0,
                n / 1000.0
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">connections</text>",
            x0 + PANEL_W / 2.0,
            TOP + PANEL_H + 30.0
        );
        let line: Vec<String> = points
            .iter()
            .map(|(n, v)| format!("{:.1},{:.1}", x(*n), y(v[panel])))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"/>",
            line.join(" "),
            colours[panel]
        );
        for (n, v) in points {
            let _ = writeln!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"><title>{n} connections: {}</title></circle>",
                x(*n),
                y(v[panel]),
                colours[panel],
                trim_number(v[panel])
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// 1, 2 or 5 times a power of ten, at least `v` (and at least 1).
fn nice_ceiling(v: f64) -> f64 {
    let v = v.max(1.0);
    let power = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * power)
}

fn trim_number(v: f64) -> String {
    if v.fract() == 0.0 || v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Writes the curve's table and plot into the book.
fn write_curve(root: &Path, points: &[Measured]) -> Result<()> {
    let table_path = root.join("docs/src/scale-curve.md");
    let svg_path = root.join("docs/src/img/scale.svg");
    let mut table = String::from(
        "<!-- Written by `cargo xtask bench scale --curve`; do not edit by hand. -->\n\n",
    );
    table.push_str(&curve_table(points));
    std::fs::write(&table_path, table)
        .map_err(|e| fail(format!("cannot write {}: {e}", table_path.display())))?;
    // A failed broadcast has no latency to plot: its point is left out.
    let series: Vec<(f64, [f64; 3])> = points
        .iter()
        .filter(|m| !m.broadcast_failed())
        .map(|m| {
            (
                f64::from(m.connections),
                [
                    m.kb_per_connection(),
                    m.handshake.ms(0.99),
                    Measured::pooled(&m.broadcast).ms(0.99),
                ],
            )
        })
        .collect();
    if let Some(dir) = svg_path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    }
    std::fs::write(&svg_path, curve_svg(&series))
        .map_err(|e| fail(format!("cannot write {}: {e}", svg_path.display())))?;
    println!(
        "\nwrote {} and {}",
        table_path.display(),
        svg_path.display()
    );
    Ok(())
}

/// Copies of the binaries a run starts, in a folder of its own, removed
/// when dropped: a rolling restart starts the servers again minutes later,
/// and a build in the meantime (another checkout sharing the target
/// folder) must not change what is measured.
struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    fn copy(release: &Path, names: &[String]) -> Result<Binaries> {
        let dir = std::env::temp_dir().join(format!("xtask-bench-scale-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
        let binaries = Binaries { dir };
        for name in names {
            std::fs::copy(release.join(name), binaries.dir.join(name))
                .map_err(|e| fail(format!("cannot copy {name}: {e}")))?;
        }
        Ok(binaries)
    }
}

impl Drop for Binaries {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(super) fn run(root: &Path, release: &Path, step: &Step, o: &Options) -> Result<()> {
    if !super::on_path("redis-server") {
        return Err(fail(
            "scale needs redis-server on PATH (step 05's servers share one Redis)",
        ));
    }
    // Refuse what cannot run before minutes of measuring the rest.
    let files = file_limit().unwrap_or(u64::MAX);
    let memory = available_kb().unwrap_or(u64::MAX);
    let sizes: Vec<u32> = if o.curve {
        CURVE.to_vec()
    } else {
        vec![o.connections]
    };
    for n in &sizes {
        plan(*n, o.servers, o.layer, files, memory)?;
    }
    println!(
        "scale: step {} ({}) on {}; not pinned: servers, Redis and load generators share \
         every core, as they would on one machine",
        step.id,
        step.dir_name(),
        o.layer.label()
    );
    let binaries = Binaries::copy(
        release,
        &[exe(&step.package()), exe("scale"), exe("bare-broadcast")],
    )?;
    let mut points = Vec::new();
    for n in sizes {
        let rolling = o.rolling && !o.curve;
        let measured = measure(&binaries.dir, step, o, n, rolling, Kind::Step)?;
        let baseline = if o.baseline {
            Some(measure(&binaries.dir, step, o, n, false, Kind::Bare)?)
        } else {
            None
        };
        print_report(&measured, baseline.as_ref());
        points.push(measured);
    }
    if o.curve {
        println!("\n{}", curve_table(&points));
        write_curve(root, &points)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_processes_within_the_file_limit() {
        let gb = 20 * 1024 * 1024;
        let p = plan(100_000, None, Layer::Queue, 20_000, gb).unwrap();
        assert_eq!(
            p,
            Plan {
                connections: 100_000,
                servers: 7,
                per_server: 14_286,
                clients: 7,
                per_client: 14_286
            }
        );
        assert_eq!(
            plan(10_000, None, Layer::PubSub, 20_000, gb)
                .unwrap()
                .servers,
            1
        );
        assert_eq!(
            plan(10_000, None, Layer::Queue, 20_000, gb)
                .unwrap()
                .servers,
            1
        );
        assert_eq!(
            plan(100_000, Some(8), Layer::Queue, 20_000, gb)
                .unwrap()
                .servers,
            8
        );
        // Four fifths of 20,000 files a server: 7 servers for 100,000,
        // whatever the layer (a queue-layer group message to a server with
        // 14,286 members is split under the size limit).
        let few = plan(100_000, Some(6), Layer::Queue, 20_000, gb).unwrap_err();
        assert!(format!("{few:?}").contains("--servers 7"), "{few:?}");
        let memory = plan(100_000, None, Layer::Queue, 20_000, 1024 * 1024).unwrap_err();
        assert!(format!("{memory:?}").contains("memory"), "{memory:?}");
        assert!(plan(20_000, None, Layer::PubSub, 20_000, gb).is_err());
        assert!(plan(10_000, None, Layer::PubSub, 20_000, gb).is_ok());
    }

    #[test]
    fn options_refuse_nonsense() {
        let o = options(None, None, None, None, false, false, false).unwrap();
        assert_eq!(
            (o.connections, o.layer, o.in_flight),
            (100_000, Layer::Queue, 1_000)
        );
        // The baseline runs by default, but not for the curve's four points.
        assert!(o.baseline);
        assert!(
            !options(None, None, None, None, false, false, true)
                .unwrap()
                .baseline
        );
        assert!(
            !options(None, None, None, None, true, false, false)
                .unwrap()
                .baseline
        );
        assert!(options(Some(10), None, None, None, true, false, false).is_err());
        assert!(options(None, None, Some("memory".into()), None, false, false, false).is_err());
        assert!(options(None, Some(0), None, None, false, false, false).is_err());
        assert_eq!(
            options(None, None, Some("pubsub".into()), None, false, true, false)
                .unwrap()
                .layer,
            Layer::PubSub
        );
    }

    #[test]
    fn merges_the_clients_reports() {
        let a = r#"{"event":"report","waited_s":0.1,"throughout":2,"messages":[{"seq":3,"heard":2,"missing":0,"max_us":900,"hist":[[800,1],[896,1]]},{"seq":4,"heard":1,"missing":1,"max_us":5,"hist":[[5,1]]}]}"#;
        let b = r#"{"event":"report","waited_s":0.1,"throughout":1,"messages":[{"seq":3,"heard":1,"missing":0,"max_us":2000,"hist":[[1984,1]]},{"seq":4,"heard":1,"missing":0,"max_us":7,"hist":[]}]}"#;
        let (messages, throughout) = merge_reports(&[a.to_owned(), b.to_owned()]).unwrap();
        assert_eq!(throughout, 3);
        let three = &messages[&3];
        assert_eq!((three.heard, three.missing), (3, 0));
        assert_eq!(three.latency.ms(0.5), 0.896);
        assert_eq!(three.latency.ms(1.0), 2.0);
        assert_eq!(Measured::lost(&messages), 1);
    }

    #[test]
    fn reads_status_answers() {
        let s = r#"{"event":"status","connected":10,"ever_opened":10,"handshakes":10,"handshake_max_us":40000,"handshake_hist":[[1000,9],[39936,1]],"failed":{"refused":3,"http 503 retry-after":1},"ended":{"closed 1001":10}}"#;
        let (open, failed, ended, handshake) = tally_status(&[s.to_owned(), s.to_owned()]);
        assert_eq!(open, 20);
        assert_eq!(failed["refused"], 6);
        assert_eq!(ended["closed 1001"], 20);
        assert_eq!(handshake.count(), 20);
        assert_eq!(handshake.ms(0.5), 1.0);
        assert_eq!(handshake.ms(0.99), 39.936);
        assert!(!is_bad_5xx("http 503 retry-after"));
        assert!(is_bad_5xx("http 500"));
        assert!(is_bad_5xx("http 503"));
    }

    #[test]
    fn reads_proc_files() {
        if cfg!(target_os = "linux") {
            assert!(cpu_ticks(std::process::id()).is_some());
            assert!(file_limit().unwrap() > 0);
            assert!(available_kb().unwrap() > 0);
        }
    }

    #[test]
    fn draws_the_curve() {
        let svg = curve_svg(&[
            (10_000.0, [6.0, 100.0, 50.0]),
            (100_000.0, [6.5, 900.0, 700.0]),
        ]);
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(svg.contains("100k"));
        assert_eq!(nice_ceiling(6.5), 10.0);
        assert_eq!(nice_ceiling(900.0), 1000.0);
        assert_eq!(nice_ceiling(1200.0), 2000.0);
        assert_eq!(thousands(100_000), "100,000");
        assert_eq!(thousands(999), "999");
    }
}
