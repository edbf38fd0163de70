//! [`ServerProcess`]: a server binary (a step's, say) run as a real process,
//! for the tests that only a real process can do: stopping it with SIGTERM,
//! killing it, running several of them on one Redis.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{TestClient, Transcript};

/// How long a server may take to say where it listens.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A server binary started on a free port of `127.0.0.1`, killed when
/// dropped. It must log `listening on http://ADDRESS` once it is ready, as
/// every step does.
pub struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    output: Arc<Mutex<String>>,
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
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {binary}: {err}"));
        let output = Arc::new(Mutex::new(String::new()));
        let (ready, listening) = oneshot::channel();
        let mut ready = Some(ready);
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        // The log is read on threads of its own, so a chatty server never
        // blocks on a full pipe while the test is busy elsewhere.
        let log = Arc::clone(&output);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = listening_address(&line)
                    && let Some(ready) = ready.take()
                {
                    let _ = ready.send(addr);
                }
                log.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let log = Arc::clone(&output);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let addr = match tokio::time::timeout(STARTUP_TIMEOUT, listening).await {
            Ok(Ok(addr)) => addr,
            _ => {
                let _ = child.kill();
                let log = output.lock().unwrap().clone();
                panic!("{binary} did not start listening; it said:\n{log}");
            }
        };
        ServerProcess {
            child,
            addr,
            output,
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
        self.child.id()
    }

    /// Asks it to stop, as `kill` or a container runtime would: SIGTERM.
    #[cfg(unix)]
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Kills it at once (SIGKILL): no goodbye of any kind.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until it exits, at most `timeout`; `None` if it is still
    /// running then.
    pub async fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
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
