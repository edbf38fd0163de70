//! [`RedisServer`]: a throwaway `redis-server` for tests.
//!
//! Each test starts its own server on a free port of 127.0.0.1 (never 6379,
//! never a fixed port), with no persistence and a temporary directory of its
//! own, so tests run in parallel without seeing each other's keys. The
//! server is killed when the value is dropped, also when the test panics.
//!
//! Without `redis-server` on `PATH`, [`RedisServer::start`] says loudly that
//! the test is skipped and returns `None`, so `cargo test` works on any
//! machine; under `CI=true` it panics instead, since CI installs Redis.
//!
//! ```no_run
//! use channels_testkit::RedisServer;
//!
//! # async fn demo() {
//! let Some(mut redis) = RedisServer::start().await else {
//!     return; // skipped, and said so on stderr
//! };
//! let url = redis.url(); // redis://127.0.0.1:PORT
//! redis.kill().await; // as if it crashed
//! redis.restart().await; // the same port again, empty
//! # let _ = url;
//! # }
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
// Deadlines are on the wall clock: a program starts in real time, whatever
// the test's runtime clock says.
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::{sleep, timeout};

use crate::{free_port, skip_or_fail, temp_dir};

/// How long a starting server may take to answer `PING`.
const STARTUP: Duration = Duration::from_secs(10);

/// How long a polite `SHUTDOWN` may take before the server is killed.
const SHUTDOWN: Duration = Duration::from_secs(5);

/// A `redis-server` process of this test's own, killed on drop.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Arguments beyond the ones every test server gets (a cluster node's).
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts `redis-server` on a free port and waits until it answers
    /// `PING`. Returns `None`, after a notice on stderr, when `redis-server`
    /// is not installed; panics instead when `CI` is set (other than to
    /// `false` or `0`), and when an installed server cannot be started.
    pub async fn start() -> Option<RedisServer> {
        Self::start_with(&[]).await
    }

    /// [`start`](Self::start), with more arguments for `redis-server`
    /// (e.g. `["--cluster-enabled", "yes"]`).
    pub async fn start_with(extra: &[&str]) -> Option<RedisServer> {
        if !installed().await {
            skip_or_fail(
                "Redis test",
                "redis-server is not installed (install it with `apt-get install redis-server`)",
            );
            return None;
        }
        let dir = temp_dir("redis");
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|err| panic!("create {}: {err}", dir.display()));
        let mut server = RedisServer {
            port: 0,
            dir,
            child: None,
            extra: extra.iter().map(|arg| (*arg).to_owned()).collect(),
        };
        // Another test may take the free port between our probe and the
        // server's bind: then try another.
        let mut last_error = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.spawn().await {
                Ok(()) => return Some(server),
                Err(err) => last_error = err,
            }
        }
        panic!("could not start redis-server: {last_error}");
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server at once (`SIGKILL`), as a crash would: clients see
    /// their connections reset. Returns once the process is gone. The port
    /// stays this server's, for [`restart`](Self::restart).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Stops the server politely (`SHUTDOWN NOSAVE`), or kills it if it
    /// does not stop within 5 s. Returns once the process is gone.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = command(self.port, "SHUTDOWN NOSAVE").await;
        if timeout(SHUTDOWN, child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
    }

    /// Starts the server again on the same port, empty (it persists
    /// nothing), after killing it if it still runs. Waits until it answers
    /// `PING`; panics if it cannot start within 10 s.
    pub async fn restart(&mut self) {
        self.kill().await;
        let deadline = Instant::now() + STARTUP;
        loop {
            match self.spawn().await {
                Ok(()) => return,
                Err(err) if Instant::now() >= deadline => {
                    panic!(
                        "could not restart redis-server on port {}: {err}",
                        self.port
                    )
                }
                // The old socket may take a moment to be released.
                Err(_) => sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// True while the server process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Starts the process on `self.port` and waits for `PING`.
    async fn spawn(&mut self) -> Result<(), String> {
        let log = self.dir.join("redis.log");
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| format!("cannot run redis-server: {err}"))?;
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(3).collect();
                return Err(format!(
                    "redis-server exited with {status} on port {}: {}",
                    self.port,
                    tail.join(" | ")
                ));
            }
            if command(self.port, "PING")
                .await
                .is_ok_and(|reply| reply.starts_with("+PONG"))
            {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill().await;
                return Err(format!(
                    "no answer to PING on port {} within {STARTUP:?}",
                    self.port
                ));
            }
            sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL without waiting (tokio reaps it): Drop cannot await.
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn installed() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|status| status.success())
}

/// Sends one inline command and reads the first bytes of the reply, within
/// a fraction of a second, so a poll never hangs on a server that accepts
/// but does not answer.
async fn command(port: u16, line: &str) -> std::io::Result<String> {
    let exchange = async {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(format!("{line}\r\n").as_bytes()).await?;
        let mut reply = [0u8; 64];
        let n = stream.read(&mut reply).await?;
        Ok(String::from_utf8_lossy(&reply[..n]).into_owned())
    };
    timeout(Duration::from_millis(700), exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}
