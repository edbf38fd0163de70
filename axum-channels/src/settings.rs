//! [`Settings`]: what a WebSocket server on the internet needs, with safe
//! defaults.
//!
//! Every route the [runner](crate::runner) builds applies these settings to
//! each connection, so the steps get them without a line of their own code:
//!
//! | setting | default | environment variable | what it protects against |
//! |---|---|---|---|
//! | [`read_buffer_size`](Settings::read_buffer_size) | 2 KiB | | idle connections costing 130 kB each |
//! | [`release_memory`](Settings::release_memory) | on | | a server that keeps its peak memory forever |
//! | [`ping_interval`](Settings::ping_interval) | 20 s | `PING_INTERVAL` (seconds, `0` = off) | half-open connections nobody notices |
//! | [`pong_timeout`](Settings::pong_timeout) | 20 s | | a peer that stopped answering |
//! | [`write_timeout`](Settings::write_timeout) | 10 s | `WRITE_TIMEOUT` (seconds) | a client that stops reading holding its consumer forever |
//! | [`allowed_origins`](Settings::allowed_origins) | the page's own origin | `ALLOWED_ORIGINS` (comma-separated, or `*`) | cross-site WebSocket hijacking |
//! | [`max_connections`](Settings::max_connections) | 10,000 | `MAX_CONNECTIONS` | running out of memory or file descriptors |
//! | [`close_timeout`](Settings::close_timeout) | 5 s | `CLOSE_TIMEOUT` (seconds) | a client that never answers a close frame |
//! | [`shutdown_timeout`](Settings::shutdown_timeout) | 10 s | | a shutdown that waits forever on a silent client |
//! | [`metrics`](Settings::metrics) | off | `METRICS=1` | (serves `/metrics` for Prometheus) |
//!
//! The process-wide settings are read from the environment once, by
//! [`serve`](crate::serve) or at the first connection. A route can have its
//! own with [`route_with`](crate::runner::route_with), which is also how tests
//! use short intervals without touching the environment.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Settings applied to every connection of a route. Cheap to clone: clones
/// share the connection count and the shutdown signal.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Bytes read from the socket at a time, per connection (default 2 KiB).
    /// The WebSocket library's default, 128 KiB, is what makes an idle
    /// connection cost about 130 kB; with 2 KiB one costs about 6.5 kB in
    /// all. A message larger than the buffer is still read whole, in
    /// several reads.
    pub read_buffer_size: usize,
    /// Whether to hand freed memory back to the operating system after a
    /// wave of connections has closed (default on). glibc's allocator keeps
    /// what a program frees for later, so without this a server that once
    /// held 10,000 connections keeps their memory after they are gone. On
    /// Linux with glibc, once the open connections have fallen to half
    /// their peak, the library calls `malloc_trim` on a blocking thread;
    /// elsewhere this does nothing.
    pub release_memory: bool,
    /// Bytes of outgoing frames gathered before writing (default 0: each
    /// frame is written at once, and no buffer is kept per connection).
    pub write_buffer_size: usize,
    /// How long a connection may be silent before the server pings it
    /// (default 20 s, `None` never pings).
    pub ping_interval: Option<Duration>,
    /// How long the server waits for any answer to its ping before it
    /// treats the peer as gone (default 20 s).
    pub pong_timeout: Duration,
    /// How long one send to a client may take (default 10 s). A client that
    /// stops reading fills the socket's buffers, and then a send waits; past
    /// this timeout the connection is closed instead, with code 1008.
    pub write_timeout: Duration,
    /// Which pages may open WebSockets to this server.
    pub allowed_origins: AllowedOrigins,
    /// The most WebSocket connections open at once (default 10,000, `None`
    /// for no limit). Past it, a handshake gets HTTP 503 with `Retry-After`.
    pub max_connections: Option<usize>,
    /// How long the server waits for the client to answer its close frame
    /// before it drops the connection anyway (default 5 s).
    pub close_timeout: Duration,
    /// How long a graceful shutdown waits for connections to close (default
    /// 10 s).
    pub shutdown_timeout: Duration,
    /// Whether [`serve`](crate::serve) adds a `/metrics` endpoint (default
    /// off).
    pub metrics: bool,
    /// The connections that use these settings: how many are open, and the
    /// signal that closes them. Each `Settings::default()` starts a fresh
    /// set; clones of one `Settings` share it.
    pub connections: Connections,
}

/// Which origins may open a WebSocket.
///
/// Browsers send the page's origin in the `Origin` header of a WebSocket
/// handshake, and unlike `fetch`, WebSockets are not bound by the same-origin
/// policy: without a check, any site a user visits could open a WebSocket to
/// this server with the user's cookies. Clients that are not browsers send
/// no `Origin`, and are let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// Any origin (`ALLOWED_ORIGINS=*`).
    Any,
    /// The server's own origin (the `Origin` names the same host and port as
    /// the request's `Host` header), plus these, e.g.
    /// `https://app.example.com`.
    SameHostAnd(Vec<String>),
}

/// The connections of every route that shares one [`Settings`]: how many
/// are open, the signal to close them, and the tasks to wait for. Cheap to
/// clone: clones share them.
#[derive(Debug, Clone, Default)]
pub struct Connections(Arc<ConnectionState>);

#[derive(Debug, Default)]
struct ConnectionState {
    open: AtomicUsize,
    /// The most connections open at once since memory was last released.
    peak: AtomicUsize,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// A place among [`Settings::max_connections`], given back when dropped.
#[derive(Debug)]
pub(crate) struct ConnectionPermit {
    connections: Connections,
    release_memory: bool,
}

/// Below this many connections at the peak, there is too little memory at
/// stake to be worth a `malloc_trim`.
const RELEASE_FROM_PEAK: usize = 256;

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let state = &self.connections.0;
        let open = state.open.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!("axum_channels_connections_open").decrement(1.0);
        let peak = state.peak.load(Ordering::Relaxed);
        if self.release_memory
            && peak >= RELEASE_FROM_PEAK
            && open <= peak / 2
            // Only the connection that wins this swap releases.
            && state
                .peak
                .compare_exchange(peak, open, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            release_memory();
        }
    }
}

/// Asks the allocator to give its free pages back to the operating system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_memory() {
    // It walks every arena, which takes milliseconds with a large heap: not
    // something to do on a thread that serves connections.
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn_blocking(|| {
            // SAFETY: malloc_trim has no preconditions; it only returns
            // whole free pages of glibc's own heaps to the kernel.
            unsafe { libc::malloc_trim(0) };
        });
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_memory() {}

// ANCHOR: defaults
impl Default for Settings {
    fn default() -> Self {
        Settings {
            read_buffer_size: 2 * 1024,
            release_memory: true,
            write_buffer_size: 0,
            ping_interval: Some(Duration::from_secs(20)),
            pong_timeout: Duration::from_secs(20),
            write_timeout: Duration::from_secs(10),
            allowed_origins: AllowedOrigins::SameHostAnd(Vec::new()),
            max_connections: Some(10_000),
            close_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(10),
            metrics: false,
            connections: Connections::default(),
        }
    }
}
// ANCHOR_END: defaults

static PROCESS: OnceLock<Settings> = OnceLock::new();

impl Settings {
    /// The defaults, changed by whichever of `PING_INTERVAL`,
    /// `WRITE_TIMEOUT`, `CLOSE_TIMEOUT`, `ALLOWED_ORIGINS`, `MAX_CONNECTIONS`
    /// and `METRICS` are set. A bad value is an error that names the variable.
    pub fn from_env() -> Result<Settings, String> {
        Settings::from_lookup(|name| std::env::var(name).ok())
    }

    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Settings, String> {
        let mut settings = Settings::default();
        let seconds = |name: &str, value: String| {
            value
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("{name} must be a whole number of seconds, not {value:?}"))
        };
        if let Some(value) = lookup("PING_INTERVAL") {
            settings.ping_interval = match seconds("PING_INTERVAL", value)? {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            };
        }
        if let Some(value) = lookup("WRITE_TIMEOUT") {
            match seconds("WRITE_TIMEOUT", value)? {
                0 => return Err("WRITE_TIMEOUT must be at least 1 second".to_owned()),
                secs => settings.write_timeout = Duration::from_secs(secs),
            }
        }
        if let Some(value) = lookup("CLOSE_TIMEOUT") {
            settings.close_timeout = Duration::from_secs(seconds("CLOSE_TIMEOUT", value)?);
        }
        if let Some(value) = lookup("ALLOWED_ORIGINS") {
            settings.allowed_origins = AllowedOrigins::parse(&value)?;
        }
        if let Some(value) = lookup("MAX_CONNECTIONS") {
            settings.max_connections = match value.trim().parse::<usize>() {
                Ok(0) => None,
                Ok(max) => Some(max),
                Err(_) => {
                    return Err(format!(
                        "MAX_CONNECTIONS must be a number (0 for no limit), not {value:?}"
                    ));
                }
            };
        }
        if let Some(value) = lookup("METRICS") {
            settings.metrics = match value.trim() {
                "1" | "true" | "on" | "yes" => true,
                "0" | "false" | "off" | "no" | "" => false,
                _ => return Err(format!("METRICS must be 1 or 0, not {value:?}")),
            };
        }
        Ok(settings)
    }

    /// The process's settings: those given to [`Settings::install`], or else
    /// read from the environment at first use (a bad value is logged once,
    /// and the defaults are used).
    pub fn process() -> &'static Settings {
        PROCESS.get_or_init(|| {
            Settings::from_env().unwrap_or_else(|err| {
                tracing::error!("{err}; using the default settings");
                Settings::default()
            })
        })
    }

    /// Makes `self` the process's settings, unless a connection has already
    /// used them; returns the settings in force.
    pub fn install(self) -> &'static Settings {
        PROCESS.get_or_init(|| self)
    }

    /// Asks every connection that uses these settings to close (code 1001,
    /// "server shutting down"), refuses new ones with 503, and waits until
    /// they have all run `disconnect` and left their groups, or
    /// [`shutdown_timeout`](Settings::shutdown_timeout) has passed. Returns
    /// how many connections were still open when it gave up.
    pub async fn shut_down(&self) -> usize {
        let connections = &self.connections.0;
        self.begin_shutdown();
        connections.tasks.close();
        let open = connections.open.load(Ordering::Relaxed);
        if open > 0 {
            tracing::info!(open, "closing the open connections");
        }
        if tokio::time::timeout(self.shutdown_timeout, connections.tasks.wait())
            .await
            .is_err()
        {
            let left = connections.tasks.len();
            tracing::warn!(left, "connections still open after the shutdown timeout");
            return left;
        }
        0
    }

    /// Refuses new handshakes and tells every open connection to close,
    /// without waiting for them.
    pub(crate) fn begin_shutdown(&self) {
        self.connections.0.shutdown.cancel();
    }

    /// Runs `task` beside the server, and makes a graceful shutdown wait for
    /// it, as it waits for the connections: e.g. a pool of workers in the
    /// server's process that should finish the jobs it runs rather than be
    /// cut off. The task should end once
    /// [`shutdown_started`](Settings::shutdown_started) resolves; the
    /// shutdown waits at most [`shutdown_timeout`](Settings::shutdown_timeout)
    /// for it and the connections together.
    pub fn spawn_background(&self, task: impl Future<Output = ()> + Send + 'static) {
        tokio::spawn(self.track(task));
    }

    /// Resolves when a graceful shutdown begins (see
    /// [`shut_down`](Settings::shut_down)).
    pub fn shutdown_started(&self) -> impl Future<Output = ()> + Send + 'static {
        self.connections.0.shutdown.clone().cancelled_owned()
    }

    /// How many WebSocket connections are open right now.
    pub fn open_connections(&self) -> usize {
        self.connections.0.open.load(Ordering::Relaxed)
    }

    /// Resolves once [`shut_down`](Settings::shut_down) has been called.
    pub(crate) async fn shutting_down(&self) {
        self.connections.0.shutdown.cancelled().await;
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.connections.0.shutdown.is_cancelled()
    }

    /// Takes a place among the open connections, or `None` at the limit.
    pub(crate) fn admit(&self) -> Option<ConnectionPermit> {
        let open = self.connections.0.open.fetch_add(1, Ordering::Relaxed) + 1;
        if self.max_connections.is_some_and(|max| open > max) {
            self.connections.0.open.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        self.connections.0.peak.fetch_max(open, Ordering::Relaxed);
        metrics::gauge!("axum_channels_connections_open").increment(1.0);
        Some(ConnectionPermit {
            connections: self.connections.clone(),
            release_memory: self.release_memory,
        })
    }

    /// Runs `connection` as a task that [`shut_down`](Settings::shut_down)
    /// waits for.
    pub(crate) fn track<F>(&self, connection: F) -> impl Future<Output = ()> + use<F>
    where
        F: Future<Output = ()>,
    {
        self.connections.0.tasks.track_future(connection)
    }
}

impl AllowedOrigins {
    /// Reads `*`, or a comma-separated list of origins such as
    /// `https://app.example.com, http://localhost:3000`.
    pub fn parse(value: &str) -> Result<AllowedOrigins, String> {
        if value.trim() == "*" {
            return Ok(AllowedOrigins::Any);
        }
        let mut origins = Vec::new();
        for origin in value.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let valid = origin.split_once("://").is_some_and(|(scheme, rest)| {
                matches!(scheme, "http" | "https") && !rest.is_empty() && !rest.contains('/')
            });
            if !valid {
                return Err(format!(
                    "ALLOWED_ORIGINS: {origin:?} is not an origin: write it as \
                     scheme://host[:port], e.g. https://app.example.com, or use *"
                ));
            }
            origins.push(origin.to_ascii_lowercase());
        }
        Ok(AllowedOrigins::SameHostAnd(origins))
    }

    /// Whether a handshake with this `Origin` header, sent to this `Host`,
    /// may proceed.
    pub fn allows(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return true; // not a browser: no page to protect
        };
        let AllowedOrigins::SameHostAnd(extra) = self else {
            return true;
        };
        let origin = origin.trim().to_ascii_lowercase();
        if extra.contains(&origin) {
            return true;
        }
        // `http://127.0.0.1:8080` is the page's own origin when the request
        // was sent to `Host: 127.0.0.1:8080`.
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        match (authority, host) {
            (Some(authority), Some(host)) => authority == host.trim().to_ascii_lowercase(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, String> {
        Settings::from_lookup(|name| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_string())
        })
    }

    #[test]
    fn defaults_are_safe_for_the_internet() {
        let defaults = settings(&[]).unwrap();
        assert_eq!(defaults.read_buffer_size, 2048);
        assert_eq!(defaults.ping_interval, Some(Duration::from_secs(20)));
        assert_eq!(defaults.max_connections, Some(10_000));
        assert_eq!(
            defaults.allowed_origins,
            AllowedOrigins::SameHostAnd(vec![])
        );
        assert!(!defaults.metrics);
    }

    #[test]
    fn reads_the_environment_and_names_a_bad_variable() {
        let read = settings(&[
            ("PING_INTERVAL", "0"),
            ("WRITE_TIMEOUT", "3"),
            ("CLOSE_TIMEOUT", "1"),
            (
                "ALLOWED_ORIGINS",
                "https://App.example.com, http://localhost:3000",
            ),
            ("MAX_CONNECTIONS", "0"),
            ("METRICS", "1"),
        ])
        .unwrap();
        assert_eq!(read.ping_interval, None);
        assert_eq!(read.write_timeout, Duration::from_secs(3));
        assert_eq!(read.close_timeout, Duration::from_secs(1));
        assert_eq!(read.max_connections, None);
        assert!(read.metrics);
        assert_eq!(
            read.allowed_origins,
            AllowedOrigins::SameHostAnd(vec![
                "https://app.example.com".into(),
                "http://localhost:3000".into()
            ])
        );
        for (name, value) in [
            ("PING_INTERVAL", "soon"),
            ("WRITE_TIMEOUT", "0"),
            ("MAX_CONNECTIONS", "-1"),
            ("METRICS", "maybe"),
            ("ALLOWED_ORIGINS", "example.com"),
        ] {
            let err = settings(&[(name, value)]).unwrap_err();
            assert!(err.contains(name), "{err}");
        }
        assert_eq!(
            settings(&[("ALLOWED_ORIGINS", "*")])
                .unwrap()
                .allowed_origins,
            AllowedOrigins::Any
        );
    }

    #[test]
    fn the_pages_own_origin_is_allowed_and_others_are_not() {
        let same = AllowedOrigins::SameHostAnd(vec!["https://app.example.com".into()]);
        let host = Some("127.0.0.1:8080");
        assert!(same.allows(None, host), "no Origin: not a browser");
        assert!(same.allows(Some("http://127.0.0.1:8080"), host));
        assert!(same.allows(Some("HTTP://127.0.0.1:8080"), host));
        assert!(same.allows(Some("https://app.example.com"), host));
        assert!(!same.allows(Some("http://evil.example"), host));
        assert!(!same.allows(Some("http://127.0.0.1:9999"), host));
        assert!(!same.allows(Some("null"), host));
        assert!(!same.allows(Some("http://127.0.0.1:8080"), None));
        assert!(AllowedOrigins::Any.allows(Some("http://evil.example"), host));
    }

    #[tokio::test]
    async fn a_shutdown_waits_for_background_work() {
        let settings = Settings {
            shutdown_timeout: Duration::from_secs(5),
            ..Settings::default()
        };
        let (finished, done) = tokio::sync::oneshot::channel();
        let shutdown = settings.shutdown_started();
        settings.spawn_background(async move {
            shutdown.await;
            // The work in hand takes a while longer to finish.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = finished.send(());
        });
        assert_eq!(settings.shut_down().await, 0, "nothing left running");
        assert!(
            done.await.is_ok(),
            "the task finished before shut_down returned"
        );
    }

    #[test]
    fn the_connection_limit_gives_places_back() {
        let settings = Settings {
            max_connections: Some(2),
            ..Settings::default()
        };
        let first = settings.admit().expect("room for one");
        let _second = settings.admit().expect("room for two");
        assert!(settings.admit().is_none(), "the third is refused");
        assert_eq!(settings.open_connections(), 2);
        drop(first);
        assert!(settings.admit().is_some(), "a place came free");
    }
}
