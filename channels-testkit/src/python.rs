//! Real Python channel layers for tests: one shared virtualenv, [`Peer`], a
//! running `axum-channels/tests/interop/peer.py`, and [`Python::script`]
//! for the other scripts beside it.
//!
//! The virtualenv holds the pinned PyPI packages of
//! `axum-channels/tests/interop/requirements.txt` (fast-channels,
//! channels_redis and their dependencies). It lives in the target
//! directory, in `tmp/interop-venv` (see [`scratch_dir`] for how that is
//! found), and is built once, then reused by every test of every package
//! and every later run for as long as a marker file in it matches the
//! requirements and the interpreter. Building takes a lock directory, so
//! tests running in parallel, in one process or in several (e.g. under
//! nextest), build it once between them. The scripts and requirements are
//! found under the workspace root ([`workspace_root`]).
//!
//! Without `python3`, without its `venv` module, or when pip cannot install
//! the requirements, [`python`] says so on stderr and returns `None`, so the
//! test passes as skipped; with `CI=true` (any value but empty, `0` or
//! `false`), where `.ci/run` installs all of it, that is a failure instead.
//!
//! ```no_run
//! use channels_testkit::python::python;
//!
//! # async fn demo() {
//! let Some(python) = python("my_test").await else {
//!     return; // skipped, and said so on stderr
//! };
//! let output = python
//!     .script("external_sender.py")
//!     .env("REDIS_URL", "redis://127.0.0.1:6400")
//!     .output()
//!     .await;
//! # let _ = output;
//! # }
//! ```

use std::fmt::Write as _;
use std::fs;
use std::io::{ErrorKind, Write as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{OnceCell, mpsc};
use tokio::task::JoinHandle;

use crate::paths::{scratch_dir, workspace_root};
use crate::skip_or_fail;

/// How long a test waits for one line from a peer before it fails. Generous,
/// because two cores may be busy compiling or running other tests; a peer
/// that works answers in well under a second.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(15);

/// The bound a peer puts on its own run (`--timeout`), so that no Python
/// process outlives a test that forgot it, or died.
const PEER_LIFETIME_SECS: u32 = 30;

/// How long a process waits for another one's virtualenv build.
const BUILD_WAIT: Duration = Duration::from_secs(600);

/// The shared virtualenv, ready to run peers.
#[derive(Debug)]
pub struct Python {
    interpreter: PathBuf,
    /// `axum-channels/tests/interop` of this checkout.
    interop: PathBuf,
}

/// The Python interpreter of the shared virtualenv, building it on first
/// use; or `None`, after a loud notice on stderr, when this machine cannot
/// have one (a failure under `CI=true`). `test` names the caller in that
/// notice.
///
/// The first call of a test process may take minutes (pip installs the
/// pins); the calls of other tests meanwhile wait for it without blocking
/// their runtimes.
pub async fn python(test: &str) -> Option<&'static Python> {
    static VENV: OnceCell<Result<Python, String>> = OnceCell::const_new();
    match VENV.get_or_init(build).await {
        Ok(python) => Some(python),
        Err(reason) => {
            skip_or_fail(&format!("python interop test {test}"), reason);
            None
        }
    }
}

/// Builds the virtualenv unless a matching one is already there.
async fn build() -> Result<Python, String> {
    let interop = workspace_root().join("axum-channels/tests/interop");
    let requirements = interop.join("requirements.txt");
    let venv = scratch_dir().join("interop-venv");
    let python = Python {
        interpreter: venv.join("bin/python"),
        interop,
    };
    let marker = venv.join("interop-ready");

    // What the virtualenv depends on: the pins, and the interpreter it was
    // made from (a new Python breaks the virtualenv's links to it).
    let interpreter = run(Command::new("python3").args([
        "-c",
        "import sys; print(sys.version); print(sys.executable)",
    ]))
    .await
    .map_err(|err| format!("python3 is not usable ({err}); install Python 3.11 or later"))?;
    let pins = fs::read(&requirements)
        .map_err(|err| format!("cannot read {}: {err}", requirements.display()))?;
    let mut hasher = Sha256::new();
    hasher.update(&pins);
    hasher.update(interpreter.as_bytes());
    let fingerprint = format!("{:x}\n", hasher.finalize());
    let is_ready = || {
        fs::read_to_string(&marker).is_ok_and(|found| found == fingerprint)
            && python.interpreter.exists()
    };

    if is_ready() {
        return Ok(python);
    }
    if let Some(parent) = venv.parent() {
        fs::create_dir_all(parent)
            .map_err(|err| format!("cannot create {}: {err}", parent.display()))?;
    }
    let _lock = BuildLock::acquire(&venv.with_extension("lock")).await?;
    if is_ready() {
        return Ok(python); // another process built it while we waited
    }

    let started = Instant::now();
    match fs::remove_dir_all(&venv) {
        Err(err) if err.kind() != ErrorKind::NotFound => {
            return Err(format!("cannot remove the old {}: {err}", venv.display()));
        }
        _ => {}
    }
    let result = async {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
            .await
            .map_err(|err| {
                format!(
                    "python3 cannot create a virtualenv ({err}); on Debian: apt-get install python3-venv"
                )
            })?;
        run(Command::new(&python.interpreter)
            .args(["-m", "pip", "install", "--disable-pip-version-check", "--no-input"])
            .args(["--quiet", "--requirement"])
            .arg(&requirements))
        .await
        .map_err(|err| format!("pip cannot install {}: {err}", requirements.display()))?;
        fs::write(&marker, &fingerprint)
            .map_err(|err| format!("cannot write {}: {err}", marker.display()))
    }
    .await;
    if let Err(reason) = result {
        let _ = fs::remove_dir_all(&venv); // never leave a half-built one behind
        return Err(reason);
    }
    // Said on stderr, uncaptured: the first run of the suite takes this long.
    let note = format!(
        "python interop: built {} in {:.1} s\n",
        venv.display(),
        started.elapsed().as_secs_f64()
    );
    let _ = std::io::stderr().write_all(note.as_bytes());
    Ok(python)
}

/// Runs a command to completion; its stdout, or why it failed (with the end
/// of its stderr).
async fn run(command: &mut Command) -> Result<String, String> {
    let output = command
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|err| format!("cannot run {:?}: {err}", command.as_std().get_program()))?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(12).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(format!("{} with: {}", output.status, tail.join("\n")))
}

/// A lock held by creating a directory (atomic on every filesystem), with
/// the owner's pid inside so that a lock left by a killed build is noticed
/// and taken over.
struct BuildLock {
    dir: PathBuf,
}

impl BuildLock {
    async fn acquire(dir: &Path) -> Result<BuildLock, String> {
        let started = Instant::now();
        loop {
            match fs::create_dir(dir) {
                Ok(()) => {
                    let _ = fs::write(dir.join("pid"), std::process::id().to_string());
                    return Ok(BuildLock {
                        dir: dir.to_owned(),
                    });
                }
                Err(err) if err.kind() == ErrorKind::AlreadyExists => {
                    if Self::is_stale(dir) {
                        let _ = fs::remove_dir_all(dir);
                        continue;
                    }
                    if started.elapsed() > BUILD_WAIT {
                        return Err(format!(
                            "another process has been building the virtualenv for {} s \
                             (remove {} if it is gone)",
                            BUILD_WAIT.as_secs(),
                            dir.display()
                        ));
                    }
                    // Polling is fine here: it only happens while another
                    // process builds, once per machine.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(err) => return Err(format!("cannot create {}: {err}", dir.display())),
            }
        }
    }

    /// The owner is dead (Linux: no `/proc/PID`), or the lock is older than
    /// any build; a lock without a pid yet is being taken right now.
    fn is_stale(dir: &Path) -> bool {
        let age = fs::metadata(dir)
            .and_then(|meta| meta.modified())
            .ok()
            .and_then(|modified| SystemTime::now().duration_since(modified).ok())
            .unwrap_or_default();
        if age > BUILD_WAIT {
            return true;
        }
        match fs::read_to_string(dir.join("pid")) {
            Ok(pid) => Path::new("/proc").exists() && !Path::new("/proc").join(pid.trim()).exists(),
            Err(_) => age > Duration::from_secs(10),
        }
    }
}

impl Drop for BuildLock {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Which Python package provides the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    /// `fast-channels`, built directly.
    Fast,
    /// Django Channels' `channels_redis`, configured through Django settings.
    Django,
}

impl Impl {
    fn arg(self) -> &'static str {
        match self {
            Impl::Fast => "fast",
            Impl::Django => "django",
        }
    }
}

/// Which of the two Redis layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The core layer (`RedisChannelLayer`): sorted sets, `BZPOPMIN`.
    Queue,
    /// The pub/sub layer (`RedisPubSubChannelLayer`).
    PubSub,
}

/// A Python layer's configuration: which package and kind, and the options
/// a Python app would give it. Keep them equal to the Rust layer's, as a
/// deployment must.
#[derive(Debug, Clone)]
pub struct PyLayer {
    /// Package.
    pub implementation: Impl,
    /// Layer kind.
    pub kind: Kind,
    /// Redis URLs, one per shard, in the same order as the Rust layer's.
    pub hosts: Vec<String>,
    /// Key and channel prefix.
    pub prefix: String,
    /// Message expiry in seconds (queue layer only).
    pub expiry: u64,
    /// Group membership expiry in seconds (queue layer only).
    pub group_expiry: u64,
    /// Messages one channel key may hold (queue layer only).
    pub capacity: u64,
}

impl PyLayer {
    /// The Python defaults (spec 1.1) for `kind` on `hosts`.
    pub fn new(implementation: Impl, kind: Kind, hosts: Vec<String>) -> PyLayer {
        PyLayer {
            implementation,
            kind,
            hosts,
            prefix: "asgi".to_owned(),
            expiry: 60,
            group_expiry: 86400,
            capacity: 100,
        }
    }

    /// The same configuration with another prefix.
    pub fn prefix(mut self, prefix: &str) -> PyLayer {
        prefix.clone_into(&mut self.prefix);
        self
    }

    /// The Python class this configuration must produce, as `peer.py` reports
    /// it: the test checks it, so a wrong import cannot pass unnoticed.
    pub fn class(&self) -> &'static str {
        match (self.implementation, self.kind) {
            (Impl::Fast, Kind::Queue) => "fast_channels.layers.redis.core.RedisChannelLayer",
            (Impl::Fast, Kind::PubSub) => {
                "fast_channels.layers.redis.pubsub.RedisPubSubChannelLayer"
            }
            (Impl::Django, Kind::Queue) => "channels_redis.core.RedisChannelLayer",
            (Impl::Django, Kind::PubSub) => "channels_redis.pubsub.RedisPubSubChannelLayer",
        }
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--impl={}", self.implementation.arg()),
            format!(
                "--kind={}",
                match self.kind {
                    Kind::Queue => "queue",
                    Kind::PubSub => "pubsub",
                }
            ),
            format!("--prefix={}", self.prefix),
            format!("--expiry={}", self.expiry),
            format!("--group-expiry={}", self.group_expiry),
            format!("--capacity={}", self.capacity),
            format!("--timeout={PEER_LIFETIME_SECS}"),
        ];
        args.extend(self.hosts.iter().map(|url| format!("--url={url}")));
        args
    }

    /// Starts a listener: `channels` new channels (`new_channel()`), each
    /// added to every group in `groups`, that prints the first `count`
    /// messages to arrive on any of them. Wait for [`Peer::ready`] before
    /// sending.
    pub fn listen(&self, python: &Python, groups: &[&str], channels: usize, count: usize) -> Peer {
        let mut args = self.args();
        args.push("listen".into());
        args.extend(groups.iter().map(|group| format!("--group={group}")));
        args.push(format!("--channels={channels}"));
        args.push(format!("--count={count}"));
        python.spawn(&args, self.label("listen"))
    }

    /// Starts a listener on the named (plain) channel `channel` instead of a
    /// new one.
    pub fn listen_on(&self, python: &Python, channel: &str, count: usize) -> Peer {
        let mut args = self.args();
        args.push("listen".into());
        args.push(format!("--channel={channel}"));
        args.push(format!("--count={count}"));
        python.spawn(&args, self.label("listen"))
    }

    /// `layer.send(channel, message)` in a new Python process; returns once
    /// it has returned there.
    pub async fn send(&self, python: &Python, channel: &str, message: &Value) {
        let args = self.command_args("send", channel, message);
        self.finish_sending(python.spawn(&args, self.label("send")))
            .await;
    }

    /// `layer.group_send(group, message)` in a new Python process; returns
    /// once it has returned there.
    pub async fn group_send(&self, python: &Python, group: &str, message: &Value) {
        let args = self.command_args("group_send", group, message);
        self.finish_sending(python.spawn(&args, self.label("group_send")))
            .await;
    }

    fn command_args(&self, command: &str, target: &str, message: &Value) -> Vec<String> {
        let mut args = self.args();
        args.push(command.into());
        args.push("--".into()); // a name is never taken for an option
        args.push(target.into());
        args.push(message.to_string());
        args
    }

    async fn finish_sending(&self, mut peer: Peer) {
        let sent = peer.expect("sent").await;
        assert_eq!(
            sent["layer"],
            self.class(),
            "{}: wrong Python layer",
            peer.label
        );
        peer.exited().await;
    }

    fn label(&self, command: &str) -> String {
        format!("python {} {command}", self.class())
    }
}

impl Python {
    /// A command that runs the Python script at `path` (an app's own, say)
    /// with the virtualenv's interpreter, isolated and in UTF-8 as
    /// [`script`](Self::script) runs those of `tests/interop`.
    pub fn script_at(&self, path: &Path) -> Command {
        let mut command = Command::new(&self.interpreter);
        command
            // Isolated (-I: no PYTHON* variables, no user site-packages) and
            // UTF-8 whatever the locale, so only the virtualenv counts.
            .args(["-I", "-X", "utf8"])
            .arg(path)
            .stdin(Stdio::null())
            // A test that fails while the script runs leaves no Python behind.
            .kill_on_drop(true);
        command
    }

    /// A command that runs the script `name` of `axum-channels/tests/interop`
    /// with the virtualenv's interpreter, isolated from the environment's
    /// Python settings (`-I`) and in UTF-8 whatever the locale. Add its
    /// arguments and environment, then run it as any `tokio::process`
    /// command: `.output().await`.
    pub fn script(&self, name: &str) -> Command {
        self.script_at(&self.interop.join(name))
    }

    /// The package's own `consistent_hash(name, n)` for every name and ring
    /// size: `(name, n, index)` triples, names outermost.
    pub async fn consistent_hash(
        &self,
        implementation: Impl,
        names: &[&str],
        ring_sizes: &[usize],
    ) -> Vec<(String, usize, usize)> {
        let sizes: Vec<String> = ring_sizes.iter().map(usize::to_string).collect();
        let mut args = vec![
            format!("--impl={}", implementation.arg()),
            "hash".to_owned(),
            format!("--ring-sizes={}", sizes.join(",")),
            "--".to_owned(),
        ];
        args.extend(names.iter().map(|name| (*name).to_owned()));
        let mut peer = self.spawn(&args, format!("python {} hash", implementation.arg()));
        let answer = peer.expect("hash").await;
        peer.exited().await;
        answer["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|result| {
                (
                    result["name"].as_str().expect("name").to_owned(),
                    result["ring_size"].as_u64().expect("ring_size") as usize,
                    result["index"].as_u64().expect("index") as usize,
                )
            })
            .collect()
    }

    /// Starts `peer.py` with `args`. Its output is read by tasks of the
    /// test's runtime, and the process is killed when the [`Peer`] is
    /// dropped.
    fn spawn(&self, args: &[String], label: String) -> Peer {
        let mut child = self
            .script_at(&self.interop.join("peer.py"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("{label}: cannot start: {err}"));
        let (sender, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("piped stdout");
        tokio::spawn(async move {
            let mut stdout = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = stdout.next_line().await {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("piped stderr");
        let collected = Arc::clone(&stderr);
        let stderr_read = tokio::spawn(async move {
            let mut buffer = [0; 4096];
            while let Ok(read @ 1..) = pipe.read(&mut buffer).await {
                collected
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..read]));
            }
        });
        Peer {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
            stderr_read,
            label,
        }
    }
}

/// What a listener says once it listens: its layer class and channel names.
#[derive(Debug)]
pub struct Ready {
    /// The Python class, e.g. `channels_redis.core.RedisChannelLayer`.
    pub layer: String,
    /// Its channels, in `new_channel()` order.
    pub channels: Vec<String>,
}

/// A running `peer.py`: its JSON lines, one by one, with a timeout each.
pub struct Peer {
    child: Child,
    // Held open while the peer runs: a listener stops when it closes.
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
    stderr: Arc<Mutex<String>>,
    /// The task that fills `stderr`; done once the peer has closed it.
    stderr_read: JoinHandle<()>,
    label: String,
}

impl Peer {
    /// The next line, parsed; fails the test on timeout, on a line that is
    /// not JSON, or when the peer ends first.
    pub async fn next(&mut self) -> Value {
        let line = match tokio::time::timeout(PEER_TIMEOUT, self.lines.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => self.fail("ended without saying more").await,
            Err(_) => {
                let what = format!("said nothing for {} s", PEER_TIMEOUT.as_secs());
                self.fail(&what).await
            }
        };
        match serde_json::from_str(&line) {
            Ok(value) => value,
            Err(err) => self.fail(&format!("said {line:?}: {err}")).await,
        }
    }

    /// The next line, which must be the event `event`.
    pub async fn expect(&mut self, event: &str) -> Value {
        let line = self.next().await;
        if line["event"] != event {
            self.fail(&format!("said {line} where {event:?} was expected"))
                .await;
        }
        line
    }

    /// Waits until the listener listens; only then may a test send to it.
    pub async fn ready(&mut self) -> Ready {
        let line = self.expect("ready").await;
        Ready {
            layer: line["layer"].as_str().expect("layer").to_owned(),
            channels: line["channels"]
                .as_array()
                .expect("channels")
                .iter()
                .map(|name| name.as_str().expect("a channel name").to_owned())
                .collect(),
        }
    }

    /// The next message a listener received: `(channel, message)`.
    pub async fn message(&mut self) -> (String, Value) {
        let mut line = self.expect("message").await;
        let channel = line["channel"].as_str().expect("channel").to_owned();
        (channel, line["message"].take())
    }

    /// Waits for the peer to end, which must be with status 0 and with
    /// nothing more said than `done`.
    pub async fn exited(&mut self) {
        loop {
            match tokio::time::timeout(PEER_TIMEOUT, self.lines.recv()).await {
                Ok(Some(line)) if line.contains(r#""event": "done""#) => {}
                Ok(Some(line)) => self.fail(&format!("said {line:?} before its end")).await,
                Ok(None) => break,
                Err(_) => {
                    let what = format!("still running after {} s", PEER_TIMEOUT.as_secs());
                    self.fail(&what).await
                }
            }
        }
        // stdout is closed: the process is at its end, so waiting is short.
        match self.child.wait().await {
            Ok(status) if status.success() => {}
            Ok(status) => self.fail(&format!("ended with {status}")).await,
            Err(err) => self.fail(&format!("cannot be waited for: {err}")).await,
        }
    }

    /// Fails the test with the peer's name and everything it wrote to
    /// stderr.
    async fn fail(&mut self, what: &str) -> ! {
        // A traceback written just before the process ended may still be
        // in the pipe: wait (boundedly, the peer may still run) until the
        // reader has seen the end of it.
        let _ = tokio::time::timeout(Duration::from_millis(500), &mut self.stderr_read).await;
        let stderr = self.stderr.lock().unwrap();
        let mut report = format!("{}: {what}", self.label);
        if !stderr.is_empty() {
            let _ = write!(report, "\n--- its stderr ---\n{stderr}");
        }
        panic!("{report}");
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // Closing stdin ends a listener; SIGKILL ends anything else. Drop
        // cannot await the exit: tokio reaps the process.
        drop(self.stdin.take());
        let _ = self.child.start_kill();
    }
}
