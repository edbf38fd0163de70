//! The `bench` task: what does a step cost compared with the simplest
//! possible WebSocket server doing the same job?
//!
//! A *scenario* says what is measured and against which baseline:
//!
//! - `echo` (the default): every client sends a message to `--path` and
//!   waits for the reply that contains it, compared with a bare
//!   tokio-tungstenite echo server;
//! - `idle`: the server's memory per idle connection, and how much of it
//!   comes back once they close (see [`idle`]);
//! - `fanout`: one sender and 100 receivers in one room, in deliveries per
//!   second, through the in-memory, Redis pub/sub and Redis queue channel
//!   layers, and with the room split across two servers on one Redis and
//!   on a three-master Redis Cluster, compared with a bare tokio broadcast
//!   server (see [`fanout`]).
//!   It measures the layers with a room server of its own, so it takes no
//!   step and no endpoint;
//! - `storm`: a reconnect storm, 18,000 connections arriving at once in
//!   step 05's rooms and then dropping at once, on the in-memory and the
//!   Redis pub/sub layer: what opened, how long the handshakes took, and
//!   whether every join and leave reached the rooms (see [`storm`]);
//! - `flood`: one client sending large messages into a room whose other
//!   members never read: how far the server's memory rises, and whether it
//!   comes back (see [`flood`]);
//! - `scale`: up to 100,000 connections in one group over several servers
//!   of step 05 on one Redis: handshakes, memory, a broadcast, a sustained
//!   load, a rolling restart, and (`--curve`) how these grow with N; then
//!   the same against bare tokio-tungstenite broadcast servers, the
//!   baseline (see [`scale`]);
//! - `jobs`: background jobs on Redis, each timed from its request to its
//!   result, against the job's own delay (see [`jobs`]);
//! - `presence`: what presence and history cost on a join and on a message,
//!   step 06's presence room against step 05's room in the same run, and
//!   the presence frames of a join storm of 5,000 (see [`presence`]).
//!
//! Which step and which endpoint are options (default: the newest step,
//! `/ws/system`), so adding a step needs no change here; adding a scenario is
//! a new [`Scenario`] variant.
//!
//! In the echo scenario, each round starts each server in turn (the
//! baseline, then the step, alternating the order every round so neither
//! always runs on a warmer machine), drives it with the `loadgen` binary, and
//! compares the round trips per second. Server and load generator are pinned to different CPUs with
//! `taskset` when available, so they don't compete for one core. The result is
//! the median ratio over the rounds, which is less sensitive to one noisy
//! round than the mean.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::steps::{self, Step, free_port};
use crate::{Args, Error, Result, Workspace, fail};

mod fanout;
mod flood;
mod idle;
mod jobs;
mod presence;
mod scale;
mod storm;

/// How long a server may take to start accepting connections.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// The endpoint measured when `--path` is not given: every step from 01 on
/// has it.
const DEFAULT_PATH: &str = "/ws/system";
/// Message size the load generator sends in the echo scenario, in bytes.
const MESSAGE_SIZE: &str = "32";

/// What is measured, and against what.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scenario {
    /// Closed-loop round trips: send, wait for the reply, send again.
    Echo,
    /// Resident memory per idle connection, and what comes back.
    Idle,
    /// One sender, many receivers in one room, through each channel layer.
    Fanout,
    /// Many connections arriving in rooms at once, then leaving at once.
    Storm,
    /// Large messages into a room of members that never read.
    Flood,
    /// Many connections in one group over several servers.
    Scale,
    /// Background jobs on Redis, timed from request to result.
    Jobs,
    /// Presence and history on join and on a message, and a join storm.
    Presence,
}

impl Scenario {
    const ALL: [Scenario; 8] = [
        Scenario::Echo,
        Scenario::Idle,
        Scenario::Fanout,
        Scenario::Storm,
        Scenario::Flood,
        Scenario::Scale,
        Scenario::Jobs,
        Scenario::Presence,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::Echo => "echo",
            Scenario::Idle => "idle",
            Scenario::Fanout => "fanout",
            Scenario::Storm => "storm",
            Scenario::Flood => "flood",
            Scenario::Scale => "scale",
            Scenario::Jobs => "jobs",
            Scenario::Presence => "presence",
        }
    }

    /// How many clients when `--clients` is not given (for fanout: the
    /// receivers, `--receivers`; for storm: the connections,
    /// `--connections`).
    fn default_clients(self) -> u32 {
        match self {
            Scenario::Echo => 32,
            Scenario::Idle => 10_000,
            Scenario::Fanout => 100,
            Scenario::Storm => 18_000,
            Scenario::Flood => 200,
            Scenario::Jobs => 1,
            Scenario::Presence => presence::STORM as u32,
            Scenario::Scale => 100_000,
        }
    }

    /// How long it runs when `--seconds` is not given: for the flood,
    /// long enough to pass the write timeout (10 s) of the members.
    fn default_seconds(self) -> u32 {
        match self {
            Scenario::Flood => 12,
            _ => 5,
        }
    }

    /// The endpoint when `--path` is not given.
    fn default_path(self) -> &'static str {
        match self {
            Scenario::Flood => flood::PATH,
            _ => DEFAULT_PATH,
        }
    }

    fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|s| s.name()).collect();
                Error::Usage(format!(
                    "unknown scenario '{name}'; known scenarios: {}",
                    known.join(", ")
                ))
            })
    }

    /// One line for the report's header.
    fn describe(self) -> String {
        match self {
            Scenario::Echo => {
                format!("{MESSAGE_SIZE}-byte messages, each client waits for its reply")
            }
            Scenario::Idle => "connections that say nothing after the handshake".to_owned(),
            Scenario::Fanout => {
                format!("{MESSAGE_SIZE}-byte messages, at most 16 that someone has not heard yet")
            }
            Scenario::Storm => "connections that arrive at once and leave at once".to_owned(),
            Scenario::Flood => format!(
                "{} KiB messages from one client, the other members never read",
                flood::MESSAGE_SIZE / 1024
            ),
            Scenario::Scale => "connections in one group over several servers".to_owned(),
            Scenario::Jobs => "jobs on Redis, one after another, timed to their results".to_owned(),
            Scenario::Presence => {
                "joins and messages timed one after another, and a join storm".to_owned()
            }
        }
    }

    /// The baseline server, a binary of the `loadgen` package, and its label.
    fn baseline(self) -> (&'static str, &'static str) {
        match self {
            Scenario::Echo | Scenario::Idle => ("bare-echo", "bare echo"),
            Scenario::Fanout => ("bare-broadcast", "bare broadcast"),
            // It compares the layers with each other; `run` sends it to
            // `storm::run` before anything asks for a baseline.
            Scenario::Storm | Scenario::Scale => unreachable!("{} has no baseline", self.name()),
            // Its baseline is the server's own memory before the flood.
            Scenario::Flood => unreachable!("the flood has no baseline server"),
            // Its baseline is the job's own delay.
            Scenario::Jobs => unreachable!("the jobs bench has no baseline server"),
            // Its baseline is step 05's room, run by `presence::run`.
            Scenario::Presence => unreachable!("the presence bench runs its own servers"),
        }
    }

    /// The load generator's arguments beyond the URL, clients and duration.
    fn loadgen_args(self) -> Vec<&'static str> {
        match self {
            Scenario::Echo | Scenario::Idle | Scenario::Fanout => vec!["--size", MESSAGE_SIZE],
            // They run clients of their own.
            Scenario::Storm
            | Scenario::Flood
            | Scenario::Scale
            | Scenario::Jobs
            | Scenario::Presence => vec![],
        }
    }
}

#[derive(Debug, PartialEq)]
struct Options {
    scenario: Scenario,
    /// The step as the user named it; `None` means the newest one.
    step: Option<String>,
    path: String,
    seconds: u32,
    rounds: u32,
    /// The connections the load generator opens: `--clients`, or for
    /// fanout the receivers, `--receivers` (plus one sender), or for storm
    /// `--connections`.
    clients: u32,
    /// The storm's own options; `Some` exactly for the storm.
    storm: Option<storm::Options>,
    /// The scale scenario's own options; `Some` exactly for scale.
    scale: Option<scale::Options>,
}

fn parse_options(mut args: Args) -> Result<Options> {
    let positive = |name: &str, value: Option<u32>, default: u32| match value {
        Some(0) => Err(Error::Usage(format!("{name} must be at least 1"))),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    let seconds = args.value("--seconds")?;
    let rounds = args.value("--rounds")?;
    let clients = args.value("--clients")?;
    let receivers = args.value("--receivers")?;
    let connections = args.value("--connections")?;
    let in_flight = args.value("--in-flight")?;
    let room_size = args.value("--room-size")?;
    let layers: Option<String> = args.value("--layers")?;
    let layer: Option<String> = args.value("--layer")?;
    let servers = args.value("--servers")?;
    let curve = args.flag("--curve");
    let rolling = args.flag("--rolling");
    let no_baseline = args.flag("--no-baseline");
    let step: Option<String> = args.value("--step")?;
    let path: Option<String> = args.value("--path")?;
    if path.as_ref().is_some_and(|p| !p.starts_with('/')) {
        return Err(Error::Usage(format!(
            "--path must start with '/', like {DEFAULT_PATH}"
        )));
    }
    let scenario = match args.positionals(0, 1)?.first() {
        Some(name) => Scenario::from_name(name)?,
        None => Scenario::Echo,
    };
    // Options that mean nothing to the scenario are refused rather than
    // ignored, so that nobody believes they measured what they asked for.
    let scale_only = [
        ("--layer", layer.is_some()),
        ("--servers", servers.is_some()),
        ("--curve", curve),
        ("--rolling", rolling),
        ("--no-baseline", no_baseline),
    ];
    if scenario == Scenario::Scale {
        refuse_stray(
            &[
                ("--clients", clients.is_some()),
                ("--receivers", receivers.is_some()),
                ("--step", step.is_some()),
                ("--path", path.is_some()),
                ("--seconds", seconds.is_some()),
                ("--rounds", rounds.is_some()),
                ("--room-size", room_size.is_some()),
                ("--layers", layers.is_some()),
            ],
            |name| {
                format!(
                    "{name} does not apply to scale, which runs step {}'s servers \
                 (--connections, --servers, --layer pubsub|queue, --in-flight, --curve, --rolling, \
                 --no-baseline)",
                    scale::STEP
                )
            },
        )?;
        let scale = scale::options(
            connections,
            servers,
            layer,
            in_flight,
            curve,
            rolling,
            no_baseline,
        )?;
        return Ok(Options {
            scenario,
            step: Some(scale::STEP.to_owned()),
            path: String::new(),
            seconds: 0,
            rounds: 1,
            clients: scale.connections,
            storm: None,
            scale: Some(scale),
        });
    }
    refuse_stray(&scale_only, |name| {
        format!("{name} is for scale, not {}", scenario.name())
    })?;
    if scenario == Scenario::Storm {
        refuse_stray(
            &[
                ("--clients", clients.is_some()),
                ("--receivers", receivers.is_some()),
                ("--step", step.is_some()),
                ("--path", path.is_some()),
                ("--seconds", seconds.is_some()),
                ("--rounds", rounds.is_some()),
            ],
            |name| {
                format!(
                    "{name} does not apply to storm, which runs step {}'s rooms once per layer \
                 (--connections sets how many)",
                    storm::STEP
                )
            },
        )?;
        let storm = storm::options(connections, in_flight, room_size, layers)?;
        return Ok(Options {
            scenario,
            step: Some(storm::STEP.to_owned()),
            path: "/ws/room/".to_owned(),
            seconds: 0,
            rounds: 1,
            clients: storm.connections,
            storm: Some(storm),
            scale: None,
        });
    }
    let storm_only = [
        ("--connections", connections.is_some()),
        ("--in-flight", in_flight.is_some()),
        ("--room-size", room_size.is_some()),
        ("--layers", layers.is_some()),
    ];
    if let Some((name, _)) = storm_only.iter().find(|(_, given)| *given) {
        return Err(Error::Usage(format!(
            "{name} is for storm, not {}",
            scenario.name()
        )));
    }
    if scenario == Scenario::Presence {
        refuse_stray(
            &[
                ("--clients", clients.is_some()),
                ("--receivers", receivers.is_some()),
                ("--step", step.is_some()),
                ("--path", path.is_some()),
                ("--seconds", seconds.is_some()),
                ("--rounds", rounds.is_some()),
            ],
            |name| {
                format!(
                    "{name} does not apply to presence, which runs step 05's room and step 06's \
                 presence room in memory and on Redis"
                )
            },
        )?;
    }
    if scenario == Scenario::Jobs {
        refuse_stray(
            &[
                ("--clients", clients.is_some()),
                ("--receivers", receivers.is_some()),
                ("--path", path.is_some()),
                ("--seconds", seconds.is_some()),
                ("--rounds", rounds.is_some()),
            ],
            |name| {
                format!(
                    "{name} does not apply to jobs, which times 50 jobs on the step's \
                 /ws/backgroundjob (--step chooses the step)"
                )
            },
        )?;
    }
    let seconds = positive("--seconds", seconds, scenario.default_seconds())?;
    if scenario == Scenario::Flood && rounds.is_some() {
        return Err(Error::Usage(
            "--rounds does not apply to flood: memory is a reading, one run says it".to_owned(),
        ));
    }
    let rounds = positive("--rounds", rounds, 3)?;
    let clients = if scenario == Scenario::Fanout {
        refuse_stray(
            &[
                ("--clients", clients.is_some()),
                ("--step", step.is_some()),
                ("--path", path.is_some()),
            ],
            |name| {
                format!(
                    "{name} does not apply to fanout, which runs a room server of its own \
                 (--receivers sets the room's size)"
                )
            },
        )?;
        positive("--receivers", receivers, scenario.default_clients())?
    } else {
        if receivers.is_some() {
            return Err(Error::Usage(format!(
                "--receivers is for fanout; {} takes --clients",
                scenario.name()
            )));
        }
        positive("--clients", clients, scenario.default_clients())?
    };
    let path = path.unwrap_or_else(|| scenario.default_path().to_string());
    Ok(Options {
        scenario,
        step,
        path,
        seconds,
        rounds,
        clients,
        storm: None,
        scale: None,
    })
}

/// What the load generator reports (its one line of JSON).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Report {
    rps: f64,
    round_trips: f64,
    p50_us: f64,
    p99_us: f64,
}

/// The number after `"key":` in a flat JSON object. The output format is ours
/// and tiny, so a string search is enough and avoids a serde dependency.
fn json_number(json: &str, key: &str) -> Option<f64> {
    let pattern = format!("\"{key}\"");
    let rest = &json[json.find(&pattern)? + pattern.len()..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn parse_report(stdout: &str) -> Result<Report, String> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| format!("no JSON line in loadgen output: {stdout:?}"))?;
    let field = |key| json_number(line, key).ok_or_else(|| format!("no \"{key}\" in {line}"));
    Ok(Report {
        rps: field("rps")?,
        round_trips: field("round_trips")?,
        p50_us: field("p50_us")?,
        p99_us: field("p99_us")?,
    })
}

/// Median of a non-empty list (mean of the middle two for an even count).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

/// Whether `program` is an executable file on PATH.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Whether `taskset` exists and can pin to both CPU 0 and CPU 1 (a container
/// may only be allowed other CPUs). Probed by pinning `taskset -V` itself.
fn can_pin() -> bool {
    on_path("taskset")
        && ["0", "1"].iter().all(|cpu| {
            Command::new("taskset")
                .args(["-c", cpu, "taskset", "-V"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

/// Whether to pin, saying so when we cannot.
fn pinning() -> bool {
    let pin = can_pin();
    if !pin {
        println!("note: taskset unavailable or CPUs 0/1 not allowed; running unpinned (noisier)");
    }
    pin
}

/// `program` pinned to `cpu` when pinning is possible.
fn command(program: &Path, cpu: &str, pin: bool) -> Command {
    if pin {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", cpu]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// A running server, killed when dropped so that an error in the middle of a
/// round never leaves one behind holding its port.
struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls until `port` accepts a TCP connection, failing early if the server
/// process exits.
fn wait_for_port(server: &mut Server, port: u16, name: &str) -> Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            return Err(fail(format!("{name} exited before listening ({status})")));
        }
        if Instant::now() >= deadline {
            return Err(fail(format!(
                "{name} did not accept connections on port {port} within {} s",
                STARTUP_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The status code of a plain `GET path` on the server at `port`. A
/// WebSocket route refuses a request without the upgrade headers with an
/// error other than 404 (the demo page probes endpoints the same way), so a
/// 404 means the step has no such endpoint.
fn http_status(port: u16, path: &str) -> Result<u16, String> {
    let mut stream =
        TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("cannot connect: {e}"))?;
    stream
        .set_read_timeout(Some(STARTUP_TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("cannot send a request: {e}"))?;
    let mut status_line = String::new();
    BufReader::new(stream)
        .read_line(&mut status_line)
        .map_err(|e| format!("no answer: {e}"))?;
    status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {status_line:?}"))
}

/// Which server of a round runs.
#[derive(Clone, Copy, PartialEq)]
enum Target {
    Baseline,
    Step,
}

struct Bench<'a> {
    release: PathBuf,
    step: &'a Step,
    options: Options,
    pin: bool,
}

impl Bench<'_> {
    fn label(&self, target: Target) -> String {
        match target {
            Target::Baseline => self.options.scenario.baseline().1.to_string(),
            Target::Step => format!("step {}", self.step.id),
        }
    }

    /// Starts the server, runs the load generator against it, stops it.
    fn measure(&self, target: Target) -> Result<Report> {
        let label = self.label(target);
        let port = free_port()?;
        let mut cmd = match target {
            Target::Baseline => {
                let binary = self.options.scenario.baseline().0;
                let mut cmd = command(&self.release.join(exe(binary)), "0", self.pin);
                cmd.args(["--port", &port.to_string()]);
                cmd
            }
            Target::Step => {
                let mut cmd = command(&self.release.join(exe(&self.step.package())), "0", self.pin);
                // HOST too, in case the user's environment sets another one.
                cmd.env("HOST", "127.0.0.1")
                    .env("PORT", port.to_string())
                    .env("RUST_LOG", "warn");
                unlimited_inbound(&mut cmd);
                cmd
            }
        };
        // The server's stdout (its "listening on" line) would clutter the
        // table; its stderr stays visible in case it fails.
        cmd.stdout(Stdio::null());
        let child = cmd
            .spawn()
            .map_err(|e| fail(format!("cannot start {label}: {e}")))?;
        let mut server = Server { child };
        wait_for_port(&mut server, port, &label)?;

        let path = &self.options.path;
        if target == Target::Step {
            match http_status(port, path) {
                Ok(404) => {
                    return Err(fail(format!(
                        "{label} has no endpoint {path} (a plain GET answers 404); \
                         choose another with --step or --path"
                    )));
                }
                Ok(_) => {}
                Err(why) => return Err(fail(format!("{label} at {path}: {why}"))),
            }
        }

        let o = &self.options;
        let output = command(&self.release.join(exe("loadgen")), "1", self.pin)
            .args(["--url", &format!("ws://127.0.0.1:{port}{path}")])
            .args(["--clients", &o.clients.to_string()])
            .args(["--seconds", &o.seconds.to_string()])
            .args(o.scenario.loadgen_args())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| fail(format!("cannot run loadgen: {e}")))?;
        drop(server);
        if !output.status.success() {
            return Err(fail(format!(
                "loadgen against {label} failed ({})",
                output.status
            )));
        }
        parse_report(&String::from_utf8_lossy(&output.stdout))
            .map_err(|e| fail(format!("against {label}: {e}")))
    }
}

/// The file name of an executable on this platform.
fn exe(name: &str) -> String {
    format!("{name}{}", std::env::consts::EXE_SUFFIX)
}

/// Where cargo puts release binaries: `$CARGO_TARGET_DIR/release` (relative
/// to the workspace, where we run cargo) or `<workspace>/target/release`.
fn release_dir(root: &Path) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(|d| root.join(d))
        .unwrap_or_else(|| root.join("target"));
    target.join("release")
}

/// `cargo xtask bench [SCENARIO] [--step N] [--path P] [--seconds S] [--rounds R] [--clients C]`,
/// or `cargo xtask bench fanout [--seconds S] [--rounds R] [--receivers N]`,
/// or `cargo xtask bench storm [--connections N] [--in-flight K] [--room-size R] [--layers L]`,
/// or `cargo xtask bench scale [--connections N] [--servers S] [--layer pubsub|queue] [--in-flight K] [--curve] [--rolling] [--no-baseline]`
pub fn run(ws: &Workspace, args: Args) -> Result<()> {
    let options = parse_options(args)?;
    if let Some(scale) = &options.scale {
        let all_steps = steps::discover(&ws.root)?;
        let step = steps::resolve_arg(&all_steps, scale::STEP)?;
        let status = ws
            .cargo()
            .args(["build", "--release", "--package", "loadgen"])
            .args(["--package", &step.package()])
            .status()
            .map_err(|e| fail(format!("cannot run cargo: {e}")))?;
        crate::propagate(status)?;
        return scale::run(&ws.root, &release_dir(&ws.root), step, scale);
    }
    if let Some(storm) = &options.storm {
        let all_steps = steps::discover(&ws.root)?;
        let step = steps::resolve_arg(&all_steps, storm::STEP)?;
        // The step's server, and the storm client from loadgen.
        let status = ws
            .cargo()
            .args(["build", "--release", "--package", "loadgen"])
            .args(["--package", &step.package()])
            .status()
            .map_err(|e| fail(format!("cannot run cargo: {e}")))?;
        crate::propagate(status)?;
        return storm::run(&release_dir(&ws.root), step, storm, pinning());
    }
    if options.scenario == Scenario::Presence {
        let all_steps = steps::discover(&ws.root)?;
        let room = steps::resolve_arg(&all_steps, "05")?;
        let presence = steps::resolve_arg(&all_steps, "06")?;
        let status = ws
            .cargo()
            .args(["build", "--release", "--package", "loadgen"])
            .args(["--package", &room.package()])
            .args(["--package", &presence.package()])
            .status()
            .map_err(|e| fail(format!("cannot run cargo: {e}")))?;
        crate::propagate(status)?;
        println!(
            "presence: step {} against step {}, {}",
            presence.id,
            room.id,
            options.scenario.describe()
        );
        return presence::run(&release_dir(&ws.root), room, presence, pinning());
    }
    if options.scenario == Scenario::Fanout {
        // Its servers and its client are all binaries of loadgen.
        let status = ws
            .cargo()
            .args(["build", "--release", "--package", "loadgen"])
            .status()
            .map_err(|e| fail(format!("cannot run cargo: {e}")))?;
        crate::propagate(status)?;
        return fanout::run(
            &release_dir(&ws.root),
            options.clients,
            options.seconds,
            options.rounds,
            pinning(),
        );
    }
    let all_steps = steps::discover(&ws.root)?;
    let step = match &options.step {
        Some(query) => steps::resolve_arg(&all_steps, query)?,
        // `discover` fails rather than return no steps.
        None => all_steps.last().ok_or_else(|| fail("no steps"))?,
    };

    // The baselines and the clients are binaries of the loadgen package.
    let status = ws
        .cargo()
        .args(["build", "--release", "--package", "loadgen"])
        .args(["--package", &step.package()])
        .status()
        .map_err(|e| fail(format!("cannot run cargo: {e}")))?;
    crate::propagate(status)?;

    let pin = pinning();
    if options.scenario == Scenario::Jobs {
        println!(
            "jobs: step {} ({}), {}",
            step.id,
            step.dir_name(),
            options.scenario.describe()
        );
        return jobs::run(&release_dir(&ws.root), step);
    }
    if options.scenario == Scenario::Flood {
        println!(
            "flood: step {} ({}) at {}, {} silent members, {} s, {}",
            step.id,
            step.dir_name(),
            options.path,
            options.clients,
            options.seconds,
            options.scenario.describe()
        );
        return flood::run(
            &release_dir(&ws.root),
            step,
            &options.path,
            options.clients,
            options.seconds,
        );
    }
    if options.scenario == Scenario::Idle {
        println!(
            "idle: {} ({}) at {}, {} {}",
            format_args!("step {}", step.id),
            step.dir_name(),
            options.path,
            options.clients,
            options.scenario.describe()
        );
        return idle::run(
            &release_dir(&ws.root),
            step,
            &options.path,
            options.clients,
            pin,
        );
    }
    let bench = Bench {
        release: release_dir(&ws.root),
        step,
        options,
        pin,
    };
    let o = &bench.options;
    let (step_label, baseline_label) = (bench.label(Target::Step), bench.label(Target::Baseline));
    println!(
        "{}: {step_label} ({}) at {}, against a {baseline_label} server",
        o.scenario.name(),
        step.dir_name(),
        o.path
    );
    println!(
        "{} clients, {} s per run, {} round(s), {}",
        o.clients,
        o.seconds,
        o.rounds,
        o.scenario.describe()
    );

    let mut ratios = Vec::new();
    for round in 0..o.rounds {
        let order = if round % 2 == 0 {
            [Target::Baseline, Target::Step]
        } else {
            [Target::Step, Target::Baseline]
        };
        let (mut baseline, mut measured) = (None, None);
        for target in order {
            let report = Some(bench.measure(target)?);
            match target {
                Target::Baseline => baseline = report,
                Target::Step => measured = report,
            }
        }
        let (Some(baseline), Some(measured)) = (baseline, measured) else {
            unreachable!("both targets ran");
        };
        let ratio = measured.rps / baseline.rps;
        ratios.push(ratio);

        println!("\nround {}/{}", round + 1, o.rounds);
        println!(
            "  {:<10} {:>12} {:>12} {:>10} {:>10}",
            "server", "rps", "round trips", "p50 µs", "p99 µs"
        );
        for (label, r) in [(&baseline_label, baseline), (&step_label, measured)] {
            println!(
                "  {label:<10} {:>12.0} {:>12.0} {:>10.0} {:>10.0}",
                r.rps, r.round_trips, r.p50_us, r.p99_us
            );
        }
        println!("  ratio {step_label} / {baseline_label}: {ratio:.2}");
    }
    println!(
        "\n{step_label} / {baseline_label}: {:.2} (median of {} round{})",
        median(&ratios),
        ratios.len(),
        if ratios.len() == 1 { "" } else { "s" }
    );
    Ok(())
}

/// Lifts the inbound budget (200 frames a second per client by default):
/// a load generator's few clients each send far more than a person does,
/// and the bench measures the server's throughput, not its flood defence.
pub(crate) fn unlimited_inbound(cmd: &mut Command) {
    cmd.env("MAX_FRAMES_PER_SECOND", "0")
        .env("MAX_BYTES_PER_SECOND", "0");
}

/// Refuses the first of `stray` that was given: an option that does not
/// apply to the scenario, with `why` saying what the scenario runs instead.
fn refuse_stray(stray: &[(&str, bool)], why: impl FnOnce(&str) -> String) -> Result<(), Error> {
    match stray.iter().find(|(_, given)| *given) {
        Some((name, _)) => Err(Error::Usage(why(name))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::testutil::args;

    #[test]
    fn options_and_defaults() {
        assert_eq!(
            parse_options(args(&[])).unwrap(),
            Options {
                scenario: Scenario::Echo,
                step: None,
                path: "/ws/system".into(),
                seconds: 5,
                rounds: 3,
                clients: 32,
                storm: None,
                scale: None
            }
        );
        assert_eq!(
            parse_options(args(&[
                "echo",
                "--rounds",
                "5",
                "--clients=8",
                "--seconds",
                "2",
                "--step",
                "02",
                "--path=/ws/room/bench"
            ]))
            .unwrap(),
            Options {
                scenario: Scenario::Echo,
                step: Some("02".into()),
                path: "/ws/room/bench".into(),
                seconds: 2,
                rounds: 5,
                clients: 8,
                storm: None,
                scale: None
            }
        );
        assert_eq!(
            parse_options(args(&["fanout"])).unwrap(),
            Options {
                scenario: Scenario::Fanout,
                step: None,
                path: "/ws/system".into(),
                seconds: 5,
                rounds: 3,
                clients: 100,
                storm: None,
                scale: None
            }
        );
        assert_eq!(
            parse_options(args(&["fanout", "--receivers=10", "--rounds", "1"]))
                .unwrap()
                .clients,
            10
        );
        assert!(parse_options(args(&["jobs", "--step", "03"])).is_ok());
        let flood = parse_options(args(&["flood"])).unwrap();
        assert_eq!(
            (flood.clients, flood.seconds, flood.path.as_str()),
            (200, 12, "/ws/room/flood")
        );
        let storm =
            parse_options(args(&["storm", "--connections", "4000", "--in-flight=500"])).unwrap();
        assert_eq!(storm.scenario, Scenario::Storm);
        assert_eq!(storm.clients, 4000);
        assert_eq!(
            storm
                .storm
                .map(|s| (s.connections, s.in_flight, s.room_size)),
            Some((4000, 500, 10))
        );
        for bad in [
            &["--rounds", "0"][..],
            &["--seconds", "x"],
            &["--clients"],
            &["--step"],
            &["--path", "ws/system"],
            &["fanfare"],
            &["idle", "--clients", "0"],
            &["echo", "extra"],
            &["--receivers", "10"],
            &["fanout", "--receivers", "0"],
            &["fanout", "--clients", "10"],
            &["fanout", "--step", "02"],
            &["fanout", "--path", "/ws/room/x"],
            &["storm", "--clients", "10"],
            &["storm", "--seconds", "5"],
            &["storm", "--step", "05"],
            &["storm", "--layers", "queue"],
            &["storm", "--in-flight", "0"],
            &["--connections", "100"],
            &["fanout", "--layers", "memory"],
            &["flood", "--rounds", "2"],
            &["jobs", "--clients", "3"],
            &["jobs", "--seconds", "3"],
            &["scale", "--clients", "10"],
            &["scale", "--layers", "pubsub"],
            &["scale", "--layer", "memory"],
            &["scale", "--curve", "--connections", "10"],
            &["storm", "--rolling"],
            &["echo", "--servers", "2"],
        ] {
            assert!(
                matches!(parse_options(args(bad)), Err(Error::Usage(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_usage_line_matches_the_options() {
        let (synopsis, _) = crate::TASKS
            .iter()
            .find(|(s, _)| s.starts_with("bench "))
            .expect("bench is in TASKS");
        let words: Vec<&str> = synopsis
            .split(|c: char| c.is_whitespace() || "[]|".contains(c))
            .filter(|w| !w.is_empty())
            .collect();
        for option in words.iter().filter(|w| w.starts_with("--")) {
            let value = match *option {
                "--path" => "/ws/x",
                "--layers" => "memory",
                "--layer" => "queue",
                "--connections" => "100",
                "--room-size" => "2",
                _ => "1",
            };
            // The options of one scenario only.
            let scenario = match *option {
                "--receivers" => "fanout",
                "--connections" | "--in-flight" | "--room-size" | "--layers" => "storm",
                "--servers" | "--layer" | "--curve" | "--rolling" | "--no-baseline" => "scale",
                _ => "echo",
            };
            let given: &[&str] = if matches!(*option, "--curve" | "--rolling" | "--no-baseline") {
                &[scenario, option]
            } else {
                &[scenario, option, value]
            };
            assert!(
                parse_options(args(given)).is_ok(),
                "{option} is in the usage but not accepted"
            );
        }
        for scenario in Scenario::ALL {
            assert!(
                words.contains(&scenario.name()),
                "scenario {} missing from the usage",
                scenario.name()
            );
        }
    }

    #[test]
    fn reads_an_http_status() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(&stream);
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            // Read the rest of the request before answering: closing a
            // socket with unread bytes sends a reset, which can reach the
            // client before the answer does.
            let mut header = String::new();
            while reader.read_line(&mut header).unwrap() > 0 && header != "\r\n" {
                header.clear();
            }
            stream
                .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                .unwrap();
            request
        });
        assert_eq!(http_status(port, "/ws/nope"), Ok(404));
        assert_eq!(server.join().unwrap(), "GET /ws/nope HTTP/1.1\r\n");
    }

    #[test]
    fn reads_loadgen_json() {
        let out = "warming up\n{\"round_trips\":40000,\"seconds\":5.0,\"rps\":8000.5,\"p50_us\":3700,\"p99_us\":9000}\n";
        assert_eq!(
            parse_report(out).unwrap(),
            Report {
                rps: 8000.5,
                round_trips: 40000.0,
                p50_us: 3700.0,
                p99_us: 9000.0
            }
        );
        assert_eq!(json_number("{\"rps\" : 1e3 }", "rps"), Some(1000.0));
        assert!(parse_report("{\"rps\":1}").is_err());
        assert!(parse_report("nothing").is_err());
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[0.97]), 0.97);
    }

    #[test]
    fn free_port_is_bindable() {
        let port = free_port().unwrap();
        assert_ne!(port, 0);
        TcpListener::bind(("127.0.0.1", port)).unwrap();
    }
}
