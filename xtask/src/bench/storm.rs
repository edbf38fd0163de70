//! The `storm` scenario: a reconnect storm on step 05's rooms, once per
//! channel layer. `--connections` (18,000) arrive at once in rooms of
//! `--room-size` (10), `--in-flight` (2,000) handshakes at a time, then all
//! drop at once; the report says whether every connection opened, how long
//! the handshakes took, whether every join and leave announcement reached
//! the rooms, and how much the server logged meanwhile.
//!
//! - **memory**: step 05 without `REDIS_URL`, its rooms on the in-memory
//!   layer;
//! - **pubsub**: step 05 with `REDIS_URL` on a throwaway redis-server, its
//!   rooms on the Redis pub/sub layer.
//!
//! The queue layer is not measured: step 05 has no setting that puts its
//! rooms on it, its one endpoint on the queue layer (`/ws/reliable`) is a
//! single group of everyone (18,000 announcements to 18,000 members each),
//! and loadgen's `room-server` serves one silent room, with no joins or
//! leaves to count.
//!
//! The load is loadgen's `storm` (see its documentation for the four
//! phases): one observer per room first, then the others, then the drop,
//! without close frames. It prints markers between the phases and waits
//! for a go-ahead, so the server's log, captured to a file at
//! `RUST_LOG=info`, is cut exactly at them: the lines of the arrival, of
//! the departure, and which of them are warnings or errors, or mention the
//! channel layer.
//!
//! **Settings.** `MAX_CONNECTIONS` is set to the connections plus
//! [`HEADROOM`]: its default, 10,000, would refuse most of the storm with
//! 503, which is not what is measured. The server's socket cap (the
//! open-file limit less a reserve) is not set; if it is below
//! `MAX_CONNECTIONS`, the server warns at start, and the report shows that
//! warning. The inbound budget is lifted as in every bench, though the
//! storm's clients send nothing.
//!
//! **CPUs.** As in the fan-out bench: the server and its Redis on CPU 0,
//! the load generator on CPU 1.
//!
//! One run of each layer, not rounds: a storm's failures are counts, not a
//! rate that noise blurs, and a round costs a minute.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::fanout::{INSTALL_REDIS, Redis};
use super::{Server, command, exe, free_port, json_number, on_path, wait_for_port};
use crate::steps::Step;
use crate::{Error, Result, fail};

/// The step whose rooms are stormed: the first whose rooms go through
/// Redis when `REDIS_URL` is set.
pub(super) const STEP: &str = "05";
/// Where the step serves its rooms; the load generator adds the name.
const ROOMS: &str = "/ws/room/";
/// `MAX_CONNECTIONS` is the connections plus this, so that the limit
/// under test is the server's, not a setting's.
const HEADROOM: u32 = 100;
/// The goal: the pub/sub layer's p99 handshake at most this many
/// times the in-memory layer's.
const P99_GOAL: f64 = 1.5;
/// The "a handful of lines, not one per call": at most this many
/// log lines during a storm.
const HANDFUL: usize = 20;
/// Warning messages shown per layer, most frequent first.
const SHOWN_MESSAGES: usize = 5;

/// A channel layer the rooms run on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Layer {
    Memory,
    PubSub,
}

impl Layer {
    const ALL: [Layer; 2] = [Layer::Memory, Layer::PubSub];

    /// As `--layers` names it.
    fn name(self) -> &'static str {
        match self {
            Layer::Memory => "memory",
            Layer::PubSub => "pubsub",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Layer::Memory => "memory",
            Layer::PubSub => "redis pub/sub",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Options {
    pub connections: u32,
    pub in_flight: u32,
    pub room_size: u32,
    pub layers: Vec<Layer>,
}

/// The storm's options, from the values given (`None`: the default).
pub(super) fn options(
    connections: Option<u32>,
    in_flight: Option<u32>,
    room_size: Option<u32>,
    layers: Option<String>,
) -> Result<Options> {
    let connections = connections.unwrap_or(18_000);
    let in_flight = in_flight.unwrap_or(2_000);
    let room_size = room_size.unwrap_or(10);
    if room_size < 2 {
        return Err(Error::Usage(
            "--room-size must be at least 2: an observer and someone to observe".into(),
        ));
    }
    if connections < room_size {
        return Err(Error::Usage(
            "--connections must be at least --room-size".into(),
        ));
    }
    if in_flight == 0 {
        return Err(Error::Usage("--in-flight must be at least 1".into()));
    }
    let layers = match layers {
        None => Layer::ALL.to_vec(),
        Some(list) => parse_layers(&list)?,
    };
    Ok(Options {
        connections,
        in_flight,
        room_size,
        layers,
    })
}

fn parse_layers(list: &str) -> Result<Vec<Layer>> {
    let mut layers = Vec::new();
    for name in list.split(',').map(str::trim) {
        let layer = match name {
            "memory" => Layer::Memory,
            "pubsub" => Layer::PubSub,
            "queue" => {
                return Err(Error::Usage(
                    "the storm cannot run the queue layer: step 05's rooms are on it only \
                     through pub/sub (see `cargo xtask bench fanout` for the queue layer)"
                        .into(),
                ));
            }
            other => {
                return Err(Error::Usage(format!(
                    "unknown layer {other:?} in --layers: use memory, pubsub or both, \
                     comma-separated"
                )));
            }
        };
        if !layers.contains(&layer) {
            layers.push(layer);
        }
    }
    Ok(layers)
}

/// What loadgen's `storm` reports (its one line of JSON).
#[derive(Debug, Clone, PartialEq, Default)]
struct Report {
    opened: f64,
    failed: f64,
    failures: Vec<(String, u64)>,
    open_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    joins_heard: f64,
    joins_expected: f64,
    leaves_heard: f64,
    leaves_expected: f64,
    /// Seconds from the drop until the last leave was heard; negative: not
    /// all within the wait.
    leave_s: f64,
    closed_early: Vec<(String, u64)>,
    observers_unjoined: f64,
    observers_lost: f64,
    misrouted: f64,
}

/// The counts of the flat object `"key":{"a":1,"b":2}` in `json`.
pub(super) fn json_counts(json: &str, key: &str) -> Option<Vec<(String, u64)>> {
    let pattern = format!("\"{key}\":{{");
    let rest = &json[json.find(&pattern)? + pattern.len()..];
    let body = &rest[..rest.find('}')?];
    body.split(',')
        .filter(|field| !field.trim().is_empty())
        .map(|field| {
            let (name, count) = field.rsplit_once(':')?;
            Some((
                name.trim().trim_matches('"').to_owned(),
                count.trim().parse().ok()?,
            ))
        })
        .collect()
}

fn parse_report(line: &str) -> Result<Report, String> {
    let field = |key| json_number(line, key).ok_or_else(|| format!("no \"{key}\" in {line}"));
    let counts = |key| json_counts(line, key).ok_or_else(|| format!("no \"{key}\" in {line}"));
    Ok(Report {
        opened: field("opened")?,
        failed: field("failed")?,
        failures: counts("failures")?,
        open_s: field("open_s")?,
        p50_ms: field("p50_ms")?,
        p99_ms: field("p99_ms")?,
        max_ms: field("max_ms")?,
        joins_heard: field("joins_heard")?,
        joins_expected: field("joins_expected")?,
        leaves_heard: field("leaves_heard")?,
        leaves_expected: field("leaves_expected")?,
        leave_s: field("leave_s")?,
        closed_early: counts("closed_early")?,
        observers_unjoined: field("observers_unjoined")?,
        observers_lost: field("observers_lost")?,
        misrouted: field("misrouted")?,
    })
}

/// `a ×2, b ×1`, or `none`.
fn list_counts(counts: &[(String, u64)]) -> String {
    if counts.is_empty() {
        return "none".to_owned();
    }
    let parts: Vec<String> = counts.iter().map(|(n, c)| format!("{n} ×{c}")).collect();
    parts.join(", ")
}

/// How much of the server's log a stretch of it holds.
#[derive(Debug, Default, Clone, PartialEq)]
struct LogCounts {
    lines: usize,
    /// WARN and ERROR lines, and lines that are not tracing's (a panic,
    /// an `error:` before exiting).
    warn_plus: usize,
    /// Of those, the ones about the channel layer: a failed `group_send`
    /// (the step's "could not announce a departure", a refused handshake
    /// whose join announcement failed), Redis, a full channel.
    layer: usize,
    /// The warning messages, without their fields, by count.
    messages: BTreeMap<String, usize>,
}

/// Removes terminal colour codes (`ESC [ ... m`), in case the server
/// ignores `NO_COLOR`.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

const LEVELS: [&str; 5] = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"];

/// The level of a line in tracing's format (`TIME LEVEL target: message
/// fields`), or `None` for a line in another.
fn level_of(line: &str) -> Option<&str> {
    let level = line.split_whitespace().nth(1)?;
    LEVELS.contains(&level).then_some(level)
}

/// A warning without its time and fields, but with its error if it has
/// one, so that 13,000 failures of one call count as one message per kind
/// of failure: `WARN target: message err=why`.
fn message_of(line: &str) -> String {
    if level_of(line).is_none() {
        return line.chars().take(120).collect();
    }
    fn field(word: &str) -> Option<&str> {
        let (key, _) = word.split_once('=')?;
        let is_key = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        is_key.then_some(key)
    }
    let mut words = line.split_whitespace().skip(1);
    let mut kept: Vec<&str> = words.next().into_iter().collect();
    let mut after_target = false;
    // Whether the words are the message (before any field) or an error.
    let mut keep = true;
    for word in words {
        match field(word) {
            // A field (`room="storm-1"`, `err=...`) ends the message.
            Some(key) if after_target => keep = matches!(key, "err" | "error"),
            _ => {}
        }
        // Spans (`name{field=...}:`) come before the target.
        if !after_target && word.ends_with(':') && !word.contains('{') {
            after_target = true;
        }
        if keep {
            kept.push(word);
        }
    }
    kept.join(" ")
}

fn count_log(text: &str) -> LogCounts {
    let mut counts = LogCounts::default();
    for line in text.lines().map(strip_ansi) {
        if line.trim().is_empty() {
            continue;
        }
        counts.lines += 1;
        let warn_plus = match level_of(&line) {
            Some(level) => level == "WARN" || level == "ERROR",
            None => true,
        };
        if !warn_plus {
            continue;
        }
        counts.warn_plus += 1;
        // Not "channel" alone: every target of the library is
        // `axum_channels::...`.
        let lower = line.to_lowercase();
        if ["layer", "group_send", "announce", "redis", "channel's"]
            .iter()
            .any(|word| lower.contains(word))
        {
            counts.layer += 1;
        }
        *counts.messages.entry(message_of(&line)).or_default() += 1;
    }
    counts
}

/// The listen queue overflows and drops the kernel counted so far
/// (`TcpExt: ListenOverflows` in `/proc/net/netstat`, for the whole
/// network namespace); `None` off Linux.
fn listen_overflows() -> Option<u64> {
    let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
    overflows_in(&netstat)
}

fn overflows_in(netstat: &str) -> Option<u64> {
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let index = names
        .split_whitespace()
        .position(|name| name == "ListenOverflows")?;
    values.split_whitespace().nth(index)?.parse().ok()
}

/// One layer's run.
struct Measured {
    layer: Layer,
    report: Report,
    /// The loadgen's JSON line.
    json: String,
    arrival: LogCounts,
    departure: LogCounts,
    /// WARN and ERROR lines from before the storm, as written.
    startup_warnings: Vec<String>,
    overflows: Option<u64>,
    /// How the server ended, if it did before being stopped.
    exited: Option<String>,
    log: PathBuf,
}

impl Measured {
    fn storm_log(&self) -> LogCounts {
        let mut all = self.arrival.clone();
        all.lines += self.departure.lines;
        all.warn_plus += self.departure.warn_plus;
        all.layer += self.departure.layer;
        for (message, count) in &self.departure.messages {
            *all.messages.entry(message.clone()).or_default() += count;
        }
        all
    }

    fn all_opened(&self, connections: u32) -> bool {
        let fivexx = self
            .report
            .failures
            .iter()
            .any(|(c, _)| c.starts_with("http 5"));
        self.report.opened == f64::from(connections) && !fivexx
    }

    fn all_heard(&self) -> bool {
        let r = &self.report;
        r.joins_heard >= r.joins_expected
            && r.leaves_heard >= r.leaves_expected
            && self.storm_log().layer == 0
    }

    /// The figures as one JSON line: the load generator's, the layer's
    /// name first and the server's side last.
    fn json(&self) -> String {
        let log = self.storm_log();
        let rest = self
            .json
            .trim()
            .trim_start_matches('{')
            .trim_end_matches('}');
        let overflows = self.overflows.map_or(-1, |n| n as i64);
        format!(
            "{{\"layer\":\"{}\",{rest},\"log_lines\":{},\"log_warn\":{},\"log_layer\":{},\
             \"listen_overflows\":{overflows}}}",
            self.layer.name(),
            log.lines,
            log.warn_plus,
            log.layer
        )
    }
}

/// What every layer's run shares.
struct Storm<'a> {
    release: &'a Path,
    step: &'a Step,
    options: &'a Options,
    pin: bool,
}

impl Storm<'_> {
    fn measure(&self, layer: Layer) -> Result<Measured> {
        let o = self.options;
        let redis = match layer {
            Layer::PubSub => Some(Redis::start(self.pin)?),
            Layer::Memory => None,
        };
        let label = format!("step {} ({})", self.step.id, layer.label());
        let port = free_port()?;
        // Overwritten by the next run, so that one is there to read and
        // nothing piles up.
        let log = std::env::temp_dir().join(format!("xtask-bench-storm-{}.log", layer.name()));
        let file = File::create(&log)
            .map_err(|e| fail(format!("cannot create {}: {e}", log.display())))?;
        let stderr = file
            .try_clone()
            .map_err(|e| fail(format!("cannot share {}: {e}", log.display())))?;
        let mut cmd = command(&self.release.join(exe(&self.step.package())), "0", self.pin);
        cmd.env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env("MAX_CONNECTIONS", (o.connections + HEADROOM).to_string())
            .stdout(file)
            .stderr(stderr);
        super::unlimited_inbound(&mut cmd);
        match &redis {
            Some(redis) => cmd.env("REDIS_URL", redis.url()),
            // The user's own REDIS_URL would turn the memory run into a
            // second Redis run, on their Redis.
            None => cmd.env_remove("REDIS_URL"),
        };
        let child = cmd
            .spawn()
            .map_err(|e| fail(format!("cannot start {label}: {e}")))?;
        let mut server = Server { child };
        wait_for_port(&mut server, port, &label)?;

        let mut client = command(&self.release.join(exe("storm")), "1", self.pin)
            .args(["--url", &format!("ws://127.0.0.1:{port}{ROOMS}")])
            .args(["--connections", &o.connections.to_string()])
            .args(["--in-flight", &o.in_flight.to_string()])
            .args(["--room-size", &o.room_size.to_string()])
            .arg("--markers")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| fail(format!("cannot start the storm client: {e}")))?;
        let (Some(mut stdin), Some(stdout)) = (client.stdin.take(), client.stdout.take()) else {
            return Err(fail("the storm client has no pipes"));
        };
        let log_len = || std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
        let mut marks = BTreeMap::new();
        let mut overflows_before = None;
        let mut overflows = None;
        let mut json = None;
        for line in BufReader::new(stdout).lines() {
            let line = line.map_err(|e| fail(format!("the storm client: {e}")))?;
            if let Some(phase) = line.strip_prefix("phase ") {
                marks.insert(phase.to_owned(), log_len());
                match phase {
                    "storm" => overflows_before = listen_overflows(),
                    "done" => {
                        overflows = listen_overflows()
                            .zip(overflows_before)
                            .map(|(after, before)| after.saturating_sub(before));
                    }
                    _ => {}
                }
                // It waits for this before going on.
                writeln!(stdin, "go").map_err(|e| fail(format!("the storm client: {e}")))?;
            } else if line.starts_with('{') {
                json = Some(line);
            } else {
                println!("  {line}");
            }
        }
        let status = client
            .wait()
            .map_err(|e| fail(format!("the storm client: {e}")))?;
        let exited = server
            .child
            .try_wait()
            .ok()
            .flatten()
            .map(|status| status.to_string());
        drop(server);
        drop(redis);
        if !status.success() {
            return Err(fail(format!(
                "the storm client against {label} failed ({status}); its error is above, \
                 the server's log is {}",
                log.display()
            )));
        }
        let json = json.ok_or_else(|| fail("the storm client printed no JSON line"))?;
        let report = parse_report(&json).map_err(|e| fail(format!("against {label}: {e}")))?;

        let text =
            std::fs::read(&log).map_err(|e| fail(format!("cannot read {}: {e}", log.display())))?;
        let mark = |phase: &str| {
            marks
                .get(phase)
                .copied()
                .unwrap_or(text.len())
                .min(text.len())
        };
        let slice = |from: usize, to: usize| {
            String::from_utf8_lossy(&text[from..to.max(from)]).into_owned()
        };
        let (storm, dropped, done) = (mark("storm"), mark("drop"), mark("done"));
        let startup_warnings = slice(0, storm)
            .lines()
            .filter(|line| matches!(level_of(&strip_ansi(line)), Some("WARN" | "ERROR") | None))
            .map(str::to_owned)
            .collect();
        Ok(Measured {
            layer,
            report,
            json,
            arrival: count_log(&slice(storm, dropped)),
            departure: count_log(&slice(dropped, done)),
            startup_warnings,
            overflows,
            exited,
            log,
        })
    }
}

fn print_table(runs: &[Measured], connections: u32) {
    println!(
        "\n  {:<14} {:>13} {:>6} {:>7} {:>7} {:>7} {:>7} {:>13} {:>13} {:>12}",
        "layer",
        "opened",
        "failed",
        "open s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "joins heard",
        "leaves heard",
        "log (warn+)"
    );
    for run in runs {
        let r = &run.report;
        let log = run.storm_log();
        println!(
            "  {:<14} {:>13} {:>6} {:>7.1} {:>7.0} {:>7.0} {:>7.0} {:>13} {:>13} {:>12}",
            run.layer.label(),
            format!("{}/{connections}", r.opened),
            r.failed,
            r.open_s,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            format!("{}/{}", r.joins_heard, r.joins_expected),
            format!("{}/{}", r.leaves_heard, r.leaves_expected),
            format!("{} ({})", log.lines, log.warn_plus),
        );
    }
}

/// What else each run showed: failures by cause, early closes, the
/// server's warnings.
fn print_details(runs: &[Measured]) {
    for run in runs {
        let r = &run.report;
        let log = run.storm_log();
        println!("\n{}:", run.layer.label());
        println!("  failures: {}", list_counts(&r.failures));
        if !r.closed_early.is_empty() {
            println!(
                "  closed by the server before the drop: {}",
                list_counts(&r.closed_early)
            );
        }
        if r.leave_s >= 0.0 {
            println!("  every leave heard {:.1} s after the drop", r.leave_s);
        }
        for (what, n) in [
            (
                "observers that never heard their own join",
                r.observers_unjoined,
            ),
            ("observers whose connection ended", r.observers_lost),
            ("announcements that named another room", r.misrouted),
        ] {
            if n > 0.0 {
                println!("  {what}: {n}");
            }
        }
        if let Some(overflows) = run.overflows.filter(|&n| n > 0) {
            println!(
                "  listen queue overflows: {overflows} (the kernel dropped handshakes the server \
                 had not accepted yet; each costs its client a SYN retransmit, 1 s or more)"
            );
        }
        for warning in &run.startup_warnings {
            println!("  at start: {warning}");
        }
        println!(
            "  server log: {} lines during the arrival, {} during the departure; {} warnings or \
             errors, {} about the channel layer",
            run.arrival.lines, run.departure.lines, log.warn_plus, log.layer
        );
        let mut messages: Vec<(&String, &usize)> = log.messages.iter().collect();
        messages.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (message, count) in messages.iter().take(SHOWN_MESSAGES) {
            println!("    {count:>6} × {message}");
        }
        if messages.len() > SHOWN_MESSAGES {
            println!(
                "    ... and {} other messages",
                messages.len() - SHOWN_MESSAGES
            );
        }
        if log.warn_plus > 0 || !run.startup_warnings.is_empty() {
            println!("  (the whole log: {})", run.log.display());
        }
        if let Some(status) = &run.exited {
            println!("  THE SERVER EXITED during the run ({status})");
        }
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

fn print_goals(runs: &[Measured], connections: u32) {
    let each = |check: &dyn Fn(&Measured) -> bool| -> String {
        let parts: Vec<String> = runs
            .iter()
            .map(|run| format!("{} {}", run.layer.label(), verdict(check(run))))
            .collect();
        parts.join(", ")
    };
    println!("\ngoals:");
    println!(
        "  every connection opens, no 5xx: {}",
        each(&|run| run.all_opened(connections))
    );
    println!(
        "  every join and leave heard, no failed layer call logged: {}",
        each(&|run| run.all_heard())
    );
    println!(
        "  a handful of log lines (at most {HANDFUL}) during the storm: {}",
        each(&|run| run.storm_log().lines <= HANDFUL)
    );
    let p99 = |layer| {
        runs.iter()
            .find(|run| run.layer == layer)
            .map(|run| run.report.p99_ms)
    };
    if let (Some(pubsub), Some(memory)) = (p99(Layer::PubSub), p99(Layer::Memory)) {
        let ratio = pubsub / memory;
        println!(
            "  {} p99 / {} p99: {ratio:.2} (at most {P99_GOAL}: {})",
            Layer::PubSub.label(),
            Layer::Memory.label(),
            verdict(ratio <= P99_GOAL)
        );
    }
}

/// `cargo xtask bench storm`, after the release build of the step and of
/// loadgen.
pub(super) fn run(release: &Path, step: &Step, options: &Options, pin: bool) -> Result<()> {
    let redis = on_path("redis-server");
    let layers: Vec<Layer> = options
        .layers
        .iter()
        .copied()
        .filter(|&layer| redis || layer != Layer::PubSub)
        .collect();
    let skipped = layers.len() < options.layers.len();
    let o = options;
    let rooms = o.connections.div_ceil(o.room_size);
    println!(
        "storm: step {} ({}) at {ROOMS}storm-N: {} connections in {rooms} rooms of {}: one \
         observer per room, then the other {} at once, {} handshakes in flight; then all but \
         the observers drop at once, without a close frame",
        step.id,
        step.dir_name(),
        o.connections,
        o.room_size,
        o.connections - rooms,
        o.in_flight,
    );
    println!(
        "server: RUST_LOG=info, MAX_CONNECTIONS={} (the default 10,000 would refuse the storm), \
         pinned to CPU 0 with its Redis; the load generator on CPU 1",
        o.connections + HEADROOM
    );
    if skipped {
        println!("note: the pubsub run is SKIPPED: redis-server is not on PATH; {INSTALL_REDIS}");
    }
    let bench = Storm {
        release,
        step,
        options,
        pin,
    };
    let mut runs = Vec::new();
    for layer in layers {
        println!("\n{}:", layer.label());
        let run = bench.measure(layer)?;
        println!("{}", run.json());
        runs.push(run);
    }
    print_table(&runs, o.connections);
    print_details(&runs);
    print_goals(&runs, o.connections);
    if skipped {
        println!("\nnote: the pubsub run was SKIPPED (no redis-server)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_layers() {
        assert_eq!(
            options(None, None, None, None).unwrap(),
            Options {
                connections: 18_000,
                in_flight: 2_000,
                room_size: 10,
                layers: vec![Layer::Memory, Layer::PubSub]
            }
        );
        let given = options(
            Some(4000),
            Some(500),
            Some(5),
            Some("pubsub, memory,pubsub".into()),
        )
        .unwrap();
        assert_eq!(given.layers, [Layer::PubSub, Layer::Memory]);
        assert_eq!(
            (given.connections, given.in_flight, given.room_size),
            (4000, 500, 5)
        );
        for (connections, in_flight, room_size, layers) in [
            (None, None, Some(1), None),
            (Some(5), None, Some(10), None),
            (None, Some(0), None, None),
            (None, None, None, Some("queue")),
            (None, None, None, Some("memory,redis")),
            (None, None, None, Some("")),
        ] {
            let parsed = options(connections, in_flight, room_size, layers.map(str::to_owned));
            assert!(matches!(parsed, Err(Error::Usage(_))), "{layers:?}");
        }
    }

    #[test]
    fn reads_the_storm_json() {
        let line = "{\"connections\":20,\"rooms\":2,\"room_size\":10,\"in_flight\":5,\
                    \"opened\":19,\"failed\":1,\"failures\":{\"http 503\":1},\
                    \"observers_unjoined\":0,\"open_s\":0.52,\"p50_ms\":1.0,\"p99_ms\":2.5,\
                    \"max_ms\":2.5,\"joins_heard\":17,\"joins_expected\":17,\"join_s\":0.60,\
                    \"leaves_heard\":5,\"leaves_expected\":17,\"leave_s\":-1.00,\
                    \"closed_early\":{\"close 1011\":2,\"reset\":1},\"observers_lost\":0,\
                    \"misrouted\":0}";
        let r = parse_report(line).unwrap();
        assert_eq!(r.opened, 19.0);
        assert_eq!(r.failures, [("http 503".to_owned(), 1)]);
        assert_eq!(
            r.closed_early,
            [("close 1011".to_owned(), 2), ("reset".to_owned(), 1)]
        );
        assert_eq!((r.p99_ms, r.leaves_heard, r.leave_s), (2.5, 5.0, -1.0));
        assert_eq!(list_counts(&r.closed_early), "close 1011 ×2, reset ×1");
        assert_eq!(json_counts("{\"failures\":{}}", "failures"), Some(vec![]));
        assert!(parse_report("{\"rps\":1}").is_err());
    }

    #[test]
    fn counts_the_servers_log() {
        let log = "\
2026-12-06T06:55:44.865002Z  INFO step_05_scaling_out: listening on http://127.0.0.1:1 pid=2
2026-12-06T06:55:45.000001Z  WARN step_05_scaling_out::room_chat: could not announce a departure room=\"storm-1\" err=channel layer failed: timed out
2026-12-06T06:55:45.000002Z  WARN step_05_scaling_out::room_chat: could not announce a departure room=\"storm-2\" err=channel layer failed: timed out
\u{1b}[2m2026-12-06T06:55:45.1Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m axum_channels::http: socket limit reached (19000); closing new connections

thread 'tokio-runtime-worker' panicked at src/x.rs:1:1:
";
        let counts = count_log(log);
        assert_eq!(counts.lines, 5);
        assert_eq!(counts.warn_plus, 4);
        assert_eq!(counts.layer, 2);
        assert_eq!(
            counts.messages["WARN step_05_scaling_out::room_chat: could not announce a departure \
                             err=channel layer failed: timed out"],
            2
        );
        assert!(counts.messages.contains_key(
            "WARN axum_channels::http: socket limit reached (19000); closing new connections"
        ));
        assert_eq!(
            message_of(
                "2026Z  WARN conn{path=/ws/room/a}: axum_channels::runner: connect failed; refusing the handshake path=/x err=boom"
            ),
            "WARN conn{path=/ws/room/a}: axum_channels::runner: connect failed; refusing the handshake err=boom"
        );
        assert_eq!(
            message_of("2026Z  INFO step: production settings max=Some(1) metrics=false"),
            "INFO step: production settings"
        );
    }

    #[test]
    fn reads_listen_overflows() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n\
                       TcpExt: 0 11732 11737\n\
                       IpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(overflows_in(netstat), Some(11732));
        assert_eq!(overflows_in("IpExt: A\nIpExt: 1\n"), None);
        if cfg!(target_os = "linux") {
            assert!(listen_overflows().is_some());
        }
    }
}
