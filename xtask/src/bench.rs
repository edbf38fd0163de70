//! The `bench` task: how much does step 01 cost compared with the simplest
//! possible WebSocket echo server?
//!
//! Each round starts each server in turn (a bare tokio-tungstenite echo, then
//! step 01, alternating the order every round so neither always runs on a
//! warmer machine), drives it with the `loadgen` binary, and compares the
//! round trips per second. Server and load generator are pinned to different
//! CPUs with `taskset` when available, so they don't compete for one core.
//! The result is the median ratio over the rounds, which is less sensitive to
//! one noisy round than the mean.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Args, Error, Result, Workspace, fail, steps};

/// How long a server may take to start accepting connections.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Message size the load generator sends, in bytes.
const MESSAGE_SIZE: &str = "32";

#[derive(Debug, PartialEq)]
struct Options {
    seconds: u32,
    rounds: u32,
    clients: u32,
}

fn parse_options(mut args: Args) -> Result<Options> {
    let positive = |name: &str, value: Option<u32>, default: u32| match value {
        Some(0) => Err(Error::Usage(format!("{name} must be at least 1"))),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    let seconds = positive("--seconds", args.value("--seconds")?, 5)?;
    let rounds = positive("--rounds", args.value("--rounds")?, 3)?;
    let clients = positive("--clients", args.value("--clients")?, 32)?;
    args.positionals(0, 0)?;
    Ok(Options {
        seconds,
        rounds,
        clients,
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

/// A port nobody listens on right now. There is a small race (another
/// process could take it before the server binds), acceptable for a
/// benchmark run by hand.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| fail(format!("cannot find a free port: {e}")))?;
    let port = listener
        .local_addr()
        .map_err(|e| fail(format!("cannot find a free port: {e}")))?
        .port();
    Ok(port)
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

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Baseline,
    Step01,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::Baseline => "bare echo",
            Target::Step01 => "step 01",
        }
    }
}

struct Bench {
    release: PathBuf,
    step_binary: String,
    options: Options,
    pin: bool,
}

impl Bench {
    /// Starts the server, runs the load generator against it, stops it.
    fn measure(&self, target: Target) -> Result<Report> {
        let port = free_port()?;
        let mut cmd = match target {
            Target::Baseline => {
                let mut cmd = command(&self.release.join(exe("bare-echo")), "0", self.pin);
                cmd.args(["--port", &port.to_string()]);
                cmd
            }
            Target::Step01 => {
                let mut cmd = command(&self.release.join(exe(&self.step_binary)), "0", self.pin);
                // HOST too, in case the user's environment sets another one.
                cmd.env("HOST", "127.0.0.1")
                    .env("PORT", port.to_string())
                    .env("RUST_LOG", "warn");
                cmd
            }
        };
        // The server's stdout (its "listening on" line) would clutter the
        // table; its stderr stays visible in case it fails.
        cmd.stdout(Stdio::null());
        let child = cmd
            .spawn()
            .map_err(|e| fail(format!("cannot start {}: {e}", target.label())))?;
        let mut server = Server { child };
        wait_for_port(&mut server, port, target.label())?;

        // Step 01 greets every new connection; the load generator must read
        // and discard that message before it starts timing echoes.
        let skip_first = if target == Target::Step01 { "1" } else { "0" };
        let o = &self.options;
        let output = command(&self.release.join(exe("loadgen")), "1", self.pin)
            .args(["--url", &format!("ws://127.0.0.1:{port}/ws/system")])
            .args(["--clients", &o.clients.to_string()])
            .args(["--seconds", &o.seconds.to_string()])
            .args(["--size", MESSAGE_SIZE])
            .args(["--skip-first", skip_first])
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| fail(format!("cannot run loadgen: {e}")))?;
        drop(server);
        if !output.status.success() {
            return Err(fail(format!(
                "loadgen against {} failed ({})",
                target.label(),
                output.status
            )));
        }
        parse_report(&String::from_utf8_lossy(&output.stdout))
            .map_err(|e| fail(format!("against {}: {e}", target.label())))
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

/// `cargo xtask bench [--seconds S] [--rounds R] [--clients C]`
pub fn run(ws: &Workspace, args: Args) -> Result<()> {
    let options = parse_options(args)?;
    let all_steps = steps::discover(&ws.root)?;
    let step = steps::resolve_arg(&all_steps, "1")?;

    let status = ws
        .cargo()
        .args(["build", "--release", "--package", "loadgen"])
        .args(["--package", &step.package()])
        .status()
        .map_err(|e| fail(format!("cannot run cargo: {e}")))?;
    crate::propagate(status)?;

    let pin = can_pin();
    if !pin {
        println!("note: taskset unavailable or CPUs 0/1 not allowed; running unpinned (noisier)");
    }
    let bench = Bench {
        release: release_dir(&ws.root),
        step_binary: step.package(),
        options,
        pin,
    };
    println!(
        "{} clients, {} s per run, {} round(s), {MESSAGE_SIZE}-byte messages",
        bench.options.clients, bench.options.seconds, bench.options.rounds
    );

    let mut ratios = Vec::new();
    for round in 0..bench.options.rounds {
        let order = if round % 2 == 0 {
            [Target::Baseline, Target::Step01]
        } else {
            [Target::Step01, Target::Baseline]
        };
        let mut baseline = None;
        let mut step01 = None;
        for target in order {
            let report = bench.measure(target)?;
            match target {
                Target::Baseline => baseline = Some(report),
                Target::Step01 => step01 = Some(report),
            }
        }
        let (Some(baseline), Some(step01)) = (baseline, step01) else {
            unreachable!("both targets ran");
        };
        let ratio = step01.rps / baseline.rps;
        ratios.push(ratio);

        println!("\nround {}/{}", round + 1, bench.options.rounds);
        println!(
            "  {:<10} {:>12} {:>12} {:>10} {:>10}",
            "server", "rps", "round trips", "p50 µs", "p99 µs"
        );
        for (target, r) in [(Target::Baseline, baseline), (Target::Step01, step01)] {
            println!(
                "  {:<10} {:>12.0} {:>12.0} {:>10.0} {:>10.0}",
                target.label(),
                r.rps,
                r.round_trips,
                r.p50_us,
                r.p99_us
            );
        }
        println!("  ratio step 01 / bare echo: {ratio:.2}");
    }
    println!(
        "\nstep 01 / bare echo: {:.2} (median of {} round{})",
        median(&ratios),
        ratios.len(),
        if ratios.len() == 1 { "" } else { "s" }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::args;

    #[test]
    fn options_and_defaults() {
        assert_eq!(
            parse_options(args(&[])).unwrap(),
            Options {
                seconds: 5,
                rounds: 3,
                clients: 32
            }
        );
        assert_eq!(
            parse_options(args(&["--rounds", "5", "--clients=8", "--seconds", "2"])).unwrap(),
            Options {
                seconds: 2,
                rounds: 5,
                clients: 8
            }
        );
        for bad in [
            &["--rounds", "0"][..],
            &["--seconds", "x"],
            &["--clients"],
            &["extra"],
        ] {
            assert!(
                matches!(parse_options(args(bad)), Err(Error::Usage(_))),
                "{bad:?}"
            );
        }
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
