//! [`ReverseProxy`]: nginx in front of a test's servers, the way a
//! deployment puts one in front of several processes of an app.
//!
//! The test passes the app's own configuration, written for nginx's `http`
//! block with two placeholders: `@LISTEN@`, which becomes the proxy's
//! address (a free port of 127.0.0.1), and a line that is only `@SERVERS@`,
//! which becomes one `server ADDRESS;` line per server. Everything nginx
//! writes (its pid, temporary files) goes to a temporary directory of its
//! own, removed with the proxy, so it needs no root and touches nothing of
//! the system's.
//!
//! Without nginx installed, [`ReverseProxy::start`] says loudly that the
//! test is skipped and returns `None`; under `CI=true` it panics instead,
//! since CI installs it (`.ci/run`), as [`RedisServer`](crate::RedisServer)
//! does for Redis.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
// The deadline is on the wall clock: nginx starts in real time.
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::{free_port, skip_or_fail, temp_dir};

/// How long nginx may take to listen.
const STARTUP: Duration = Duration::from_secs(10);

/// An nginx of this test's own, killed when dropped.
pub struct ReverseProxy {
    addr: SocketAddr,
    dir: PathBuf,
    child: Child,
}

impl ReverseProxy {
    /// Starts nginx with `template` filled in for `servers`, on a free
    /// port, and waits until it listens. Returns `None`, after a notice on
    /// stderr, when nginx is not installed; panics instead under `CI`, and
    /// when an installed nginx cannot start.
    pub async fn start(template: &str, servers: &[SocketAddr]) -> Option<ReverseProxy> {
        let Some(nginx) = find_nginx() else {
            skip_or_fail(
                "reverse proxy test",
                "nginx is not installed (install it with `apt-get install nginx-light`)",
            );
            return None;
        };
        let dir = temp_dir("nginx");
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|err| panic!("create {}: {err}", dir.display()));
        // Another process may take the free port before nginx binds it:
        // then try another.
        let mut last_error = String::new();
        for _ in 0..5 {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            match spawn(&nginx, &dir, template, addr, servers).await {
                Ok(child) => return Some(ReverseProxy { addr, dir, child }),
                Err(err) => last_error = err,
            }
        }
        panic!("could not start nginx: {last_error}");
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://ADDRESS{path}`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }
}

impl Drop for ReverseProxy {
    fn drop(&mut self) {
        // One process (`master_process off`), so killing it leaves no
        // workers behind. SIGKILL without waiting (tokio reaps it): Drop
        // cannot await.
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `template` with `@LISTEN@` and the `@SERVERS@` line filled in; comment
/// lines are left as they are.
fn fill_in(template: &str, listen: SocketAddr, servers: &[SocketAddr]) -> String {
    let mut out = String::new();
    for line in template.lines() {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
        } else if line.trim() == "@SERVERS@" {
            let indent = &line[..line.len() - line.trim_start().len()];
            for server in servers {
                out.push_str(&format!("{indent}server {server};\n"));
            }
            continue;
        } else {
            out.push_str(&line.replace("@LISTEN@", &listen.to_string()));
        }
        out.push('\n');
    }
    out
}

/// Writes the configuration into `dir`, starts nginx in the foreground as
/// one process, and waits until it listens on `addr`.
async fn spawn(
    nginx: &Path,
    dir: &Path,
    template: &str,
    addr: SocketAddr,
    servers: &[SocketAddr],
) -> Result<Child, String> {
    let d = dir.display();
    let main = format!(
        "pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   client_body_temp_path {d}/body;\n\
         \x20   proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n\
         \x20   uwsgi_temp_path {d}/uwsgi;\n\
         \x20   scgi_temp_path {d}/scgi;\n\
         \x20   include {d}/app.conf;\n\
         }}\n"
    );
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).map_err(|err| format!("write {name}: {err}"))
    };
    write("app.conf", &fill_in(template, addr, servers))?;
    write("nginx.conf", &main)?;
    let log = dir.join("error.log");
    let mut child = Command::new(nginx)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(&log)
        .args(["-g", "daemon off; master_process off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| format!("cannot run {}: {err}", nginx.display()))?;
    let deadline = Instant::now() + STARTUP;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("nginx exited with {status}: {}", log.trim()));
        }
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill().await;
            return Err(format!("nginx did not listen on {addr} within {STARTUP:?}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// nginx on `PATH`, or in `/usr/sbin`, which is not on a normal user's
/// `PATH` on Debian.
fn find_nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_in_the_placeholders_but_not_the_comments() {
        let template =
            "# @SERVERS@ and @LISTEN@\nupstream s {\n    @SERVERS@\n}\nlisten @LISTEN@;\n";
        let servers = [
            "127.0.0.1:9001".parse().unwrap(),
            "127.0.0.1:9002".parse().unwrap(),
        ];
        assert_eq!(
            fill_in(template, "127.0.0.1:9000".parse().unwrap(), &servers),
            "# @SERVERS@ and @LISTEN@\nupstream s {\n    server 127.0.0.1:9001;\n    \
             server 127.0.0.1:9002;\n}\nlisten 127.0.0.1:9000;\n"
        );
    }
}
