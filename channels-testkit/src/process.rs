//! [`ServerProcess`]: a server binary (a step's, say) run as a real process,
//! for the tests that only a real process can do: stopping it with SIGTERM,
//! killing it, running several of them on one Redis.

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum_channels::testing::{TestClient, Transcript};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long a server may take to say where it listens.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A server binary started on a free port of `127.0.0.1`, killed when
/// dropped. It must log `listening on http://ADDRESS` once it is ready, as
/// every step does.
pub struct ServerProcess {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    output: Arc<Mutex<String>>,
    /// The tasks that read its stdout and stderr into `output`.
    readers: Vec<JoinHandle<()>>,
}

impl ServerProcess {
    /// Starts `binary` (e.g. `env!("CARGO_BIN_EXE_step-01-system-chat")`)
    /// with `HOST=127.0.0.1`, `PORT=0` and the extra environment `envs`, and
    /// waits until it listens.
    ///
    /// Panics (failing the test) if it exits or stays silent instead.
    pub async fn start(binary: &str, envs: &[(&str, &str)]) -> ServerProcess {
        let mut child = Command::new(binary)
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("NO_COLOR", "1")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {binary}: {err}"));
        let pid = child.id().expect("a child that was just started has an id");
        let output = Arc::new(Mutex::new(String::new()));
        let (ready, listening) = oneshot::channel();
        // The log is read by tasks of its own, so a chatty server never
        // blocks on a full pipe while the test awaits something else.
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut readers = vec![
            tokio::spawn(collect(stdout, Arc::clone(&output), Some(ready))),
            tokio::spawn(collect(stderr, Arc::clone(&output), None)),
        ];
        let addr = match tokio::time::timeout(STARTUP_TIMEOUT, listening).await {
            Ok(Ok(addr)) => addr,
            _ => {
                let _ = child.kill().await;
                // The pipes close with the process: let the readers take
                // its last words (a panic message, say) before reporting.
                drain(&mut readers).await;
                let log = output.lock().unwrap().clone();
                panic!("{binary} did not start listening; it said:\n{log}");
            }
        };
        ServerProcess {
            child,
            pid,
            addr,
            output,
            readers,
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://ADDRESS{path}`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Connects a client called `name` that records into `transcript`.
    pub async fn connect_as(&self, name: &str, path: &str, transcript: &Transcript) -> TestClient {
        TestClient::connect_url(&self.ws_url(path), name, path, transcript)
            .await
            .unwrap_or_else(|status| panic!("{path}: handshake refused with HTTP {status}"))
    }

    /// Everything it has logged so far, stdout and stderr.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// The process id, e.g. to signal it.
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Asks it to stop, as `kill` or a container runtime would: SIGTERM.
    /// Returns at once; [`wait`](Self::wait) for it to exit.
    #[cfg(unix)]
    pub fn terminate(&self) {
        // `None` once the child has been reaped, when its pid may already
        // be another process's.
        let pid = self.child.id().expect("terminate a server that has exited");
        let pid = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
        // SAFETY: kill(2) takes plain integers and touches no memory.
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(
            sent,
            0,
            "SIGTERM to {pid}: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Kills it at once (SIGKILL): no goodbye of any kind. Returns once it
    /// is gone, its port with it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Waits until it exits, at most `timeout`; `None` if it is still
    /// running then.
    /// Once it has exited, everything it logged is in
    /// [`output`](Self::output): its last lines included.
    pub async fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()?
            .ok()?;
        drain(&mut self.readers).await;
        Some(status)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // SIGKILL without waiting (tokio reaps it): Drop cannot await.
        let _ = self.child.start_kill();
    }
}

/// Waits (at most a second each) for the readers to reach the end of the
/// pipes of a process that has exited: its last lines are often the ones
/// a test is after.
async fn drain(readers: &mut Vec<JoinHandle<()>>) {
    for reader in readers.drain(..) {
        let _ = tokio::time::timeout(Duration::from_secs(1), reader).await;
    }
}

/// Appends each line of `stream` to `log`; sends the first address a
/// `listening on` line names to `ready`, if given.
async fn collect(
    stream: impl AsyncRead + Unpin,
    log: Arc<Mutex<String>>,
    mut ready: Option<oneshot::Sender<SocketAddr>>,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(addr) = listening_address(&line)
            && let Some(ready) = ready.take()
        {
            let _ = ready.send(addr);
        }
        log.lock().unwrap().push_str(&(line + "\n"));
    }
}

/// The address in a `... listening on http://127.0.0.1:PORT` log line.
fn listening_address(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once("listening on http://")?;
    rest.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_address_in_the_log_line() {
        let line =
            "2026-11-26T09:00:00Z  INFO step_01_system_chat: listening on http://127.0.0.1:41234";
        assert_eq!(
            listening_address(line),
            Some("127.0.0.1:41234".parse().unwrap())
        );
        assert_eq!(listening_address("stopped"), None);
    }
}
