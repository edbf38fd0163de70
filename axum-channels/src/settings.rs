//! [`Settings`]: what a WebSocket server on the internet needs, with safe
//! defaults, read once when the process starts.
//!
//! The settings come in two parts. [`ConnectionSettings`] are the options of
//! one connection (buffers, pings, timeouts, the origin check, the inbound
//! budget): every route applies the process's, and a route can have its own
//! with [`route_with`](crate::runner::route_with). The rest belong to the
//! process as a whole and are kept by its [`Runtime`](crate::Runtime): the
//! connection limits, the header timeout and the shutdown.
//!
//! | setting | default | environment variable | what it protects against |
//! |---|---|---|---|
//! | [`read_buffer_size`](ConnectionSettings::read_buffer_size) | 2 KiB | | idle connections costing 130 kB each |
//! | [`ping_interval`](ConnectionSettings::ping_interval) | 20 s | `PING_INTERVAL` (seconds, `0` = off) | half-open connections nobody notices |
//! | [`pong_timeout`](ConnectionSettings::pong_timeout) | 20 s | | a peer that stopped answering |
//! | [`write_timeout`](ConnectionSettings::write_timeout) | 10 s | `WRITE_TIMEOUT` (seconds) | a client that stops reading holding its consumer forever |
//! | [`close_timeout`](ConnectionSettings::close_timeout) | 5 s | `CLOSE_TIMEOUT` (seconds) | a client that never answers a close frame |
//! | [`allowed_origins`](ConnectionSettings::allowed_origins) | the page's own origin | `ALLOWED_ORIGINS` (comma-separated, or `*`) | cross-site WebSocket hijacking |
//! | [`inbound`](ConnectionSettings::inbound) | 200 frames/s and 1 MiB/s | `MAX_FRAMES_PER_SECOND`, `MAX_BYTES_PER_SECOND` (`0` = off) | one client flooding the others |
//! | [`max_connections`](Settings::max_connections) | 10,000 | `MAX_CONNECTIONS` | running out of memory |
//! | [`max_sockets`](Settings::max_sockets) | the file limit, less a reserve | `MAX_SOCKETS` | one client holding every file the process may open |
//! | [`header_read_timeout`](Settings::header_read_timeout) | 10 s | `HEADER_READ_TIMEOUT` (seconds) | requests that never finish arriving |
//! | [`shutdown_timeout`](Settings::shutdown_timeout) | 10 s | `SHUTDOWN_TIMEOUT` (seconds) | a shutdown that waits forever on a silent client |
//! | [`release_memory`](Settings::release_memory) | on | | a server that keeps its peak memory forever |
//! | [`metrics`](Settings::metrics) | off | `METRICS=1` | (serves `/metrics` for Prometheus) |
//!
//! The structs are `#[non_exhaustive]`, so that a new setting is not a
//! breaking change: start from `Default` (or [`Settings::from_env`]) and
//! change what you need, by assigning a field or with its `with_*` method:
//!
//! ```
//! # use std::time::Duration;
//! # use axum_channels::{ConnectionSettings, Settings};
//! let settings = Settings::default()
//!     .with_max_connections(Some(500))
//!     .with_connection(ConnectionSettings::default().with_write_timeout(Duration::from_secs(3)));
//! # assert!(settings.validate().is_ok());
//! ```
//!
//! Every value is checked when it is read, and again by
//! [`Runtime::new`](crate::Runtime::new) for settings written in code: a
//! value out of its range is an error that names it, before anything is
//! served.

use std::num::NonZeroU32;
use std::time::Duration;

pub use crate::origin::AllowedOrigins;

/// The settings of a server process: the options every connection gets by
/// default, and the limits of the process as a whole.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Settings {
    /// The options of each connection, unless its route has its own.
    pub connection: ConnectionSettings,
    /// The most WebSocket connections open at once (default 10,000, `None`
    /// for no limit). Past it, a handshake gets HTTP 503 with `Retry-After`.
    pub max_connections: Option<usize>,
    /// The most TCP connections open at once, WebSockets and plain HTTP
    /// together (`None`, the default: the process's open-file limit less a
    /// reserve for its other files). At the limit the connections that have
    /// not finished sending a request are closed first, so that one client
    /// holding many sockets cannot lock everyone else out.
    pub max_sockets: Option<usize>,
    /// How long a client may take to send a request's headers (default
    /// 10 s); past it the connection is closed.
    pub header_read_timeout: Duration,
    /// How long a graceful shutdown may take, from the signal to the exit:
    /// HTTP requests, WebSockets and background tasks together (default
    /// 10 s).
    pub shutdown_timeout: Duration,
    /// Whether to hand freed memory back to the operating system after a
    /// wave of connections has closed (default on). glibc's allocator keeps
    /// what a program frees for later, so without this a server that once
    /// held 10,000 connections keeps their memory after they are gone. On
    /// Linux with glibc, once the open connections have fallen to half
    /// their peak, the library calls `malloc_trim` on a blocking thread;
    /// elsewhere this does nothing.
    pub release_memory: bool,
    /// Whether [`serve`](crate::serve) adds a `/metrics` endpoint (default
    /// off).
    pub metrics: bool,
}

/// The options of one WebSocket connection.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectionSettings {
    /// Bytes read from the socket at a time, per connection (default 2 KiB).
    /// The WebSocket library's default, 128 KiB, is what makes an idle
    /// connection cost about 130 kB; with 2 KiB one costs about 6.5 kB in
    /// all. A message larger than the buffer is still read whole, in
    /// several reads.
    pub read_buffer_size: usize,
    /// Bytes of outgoing frames gathered before writing (default 16 KiB).
    /// A frame sent on its own is written at once, whatever this is; it
    /// matters when the runner hands a connection several layer messages in
    /// one turn: their frames are gathered, up to this many bytes, and
    /// written together. `0` writes each frame on its own (a system call
    /// each). It also bounds what waits for a client that stops reading:
    /// this, plus one frame.
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
    /// How long the server waits, from the moment it sends its close frame,
    /// for the client to answer it (default 5 s). A client that keeps
    /// talking instead is dropped at the same moment.
    pub close_timeout: Duration,
    /// Which pages may open WebSockets to this server.
    pub allowed_origins: AllowedOrigins,
    /// How much one client may send.
    pub inbound: InboundBudget,
}

/// How much one client may send, as a token bucket: a steady rate, and a
/// burst of twice that (so a client may send 400 frames at once, then 200 a
/// second). `None` in a field means no limit on it.
///
/// Every frame a client sends costs work elsewhere (a job queued, a message
/// to every member of a room), so without a budget one client can keep the
/// server busy for everyone. A client over its budget is closed with 1008
/// and a reason that says the limit, unless its consumer chooses otherwise
/// (see [`Consumer::too_fast`](crate::Consumer::too_fast)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct InboundBudget {
    /// Frames per second (default 200).
    pub frames_per_second: Option<NonZeroU32>,
    /// Bytes per second (default 1 MiB). The burst is at least one message
    /// of the consumer's largest size, so one allowed message always fits.
    pub bytes_per_second: Option<NonZeroU32>,
}

impl InboundBudget {
    /// No limit at all.
    pub const UNLIMITED: InboundBudget = InboundBudget {
        frames_per_second: None,
        bytes_per_second: None,
    };
}

impl Default for InboundBudget {
    fn default() -> Self {
        InboundBudget {
            frames_per_second: NonZeroU32::new(200),
            bytes_per_second: NonZeroU32::new(1024 * 1024),
        }
    }
}

// ANCHOR: defaults
impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            read_buffer_size: 2 * 1024,
            write_buffer_size: 16 * 1024,
            ping_interval: Some(Duration::from_secs(20)),
            pong_timeout: Duration::from_secs(20),
            write_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            allowed_origins: AllowedOrigins::SameHostAnd(Vec::new()),
            inbound: InboundBudget::default(),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            connection: ConnectionSettings::default(),
            max_connections: Some(10_000),
            max_sockets: None,
            header_read_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(10),
            release_memory: true,
            metrics: false,
        }
    }
}
// ANCHOR_END: defaults

setters!(Settings {
    with_connection(connection: ConnectionSettings),
    with_max_connections(max_connections: Option<usize>),
    with_max_sockets(max_sockets: Option<usize>),
    with_header_read_timeout(header_read_timeout: Duration),
    with_shutdown_timeout(shutdown_timeout: Duration),
    with_release_memory(release_memory: bool),
    with_metrics(metrics: bool),
});

setters!(ConnectionSettings {
    with_read_buffer_size(read_buffer_size: usize),
    with_write_buffer_size(write_buffer_size: usize),
    with_ping_interval(ping_interval: Option<Duration>),
    with_pong_timeout(pong_timeout: Duration),
    with_write_timeout(write_timeout: Duration),
    with_close_timeout(close_timeout: Duration),
    with_allowed_origins(allowed_origins: AllowedOrigins),
    with_inbound(inbound: InboundBudget),
});

setters!(InboundBudget {
    with_frames_per_second(frames_per_second: Option<NonZeroU32>),
    with_bytes_per_second(bytes_per_second: Option<NonZeroU32>),
});

/// The longest timeout or interval a setting may have: anything longer is
/// surely a typo (milliseconds written as seconds), and would mean "never".
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// The largest buffer a setting may ask for, per connection.
const MAX_BUFFER: usize = 64 * 1024 * 1024;

/// Checks that `value` is at most [`MAX_DURATION`] (and at least `min`).
fn check_duration(name: &str, value: Duration, min: Duration) -> Result<(), String> {
    if value < min || value > MAX_DURATION {
        return Err(format!(
            "{name} must be between {min:?} and {} s, not {value:?}",
            MAX_DURATION.as_secs()
        ));
    }
    Ok(())
}

impl ConnectionSettings {
    /// Checks every value against its range.
    ///
    /// # Errors
    ///
    /// The first value out of range, named.
    pub fn validate(&self) -> Result<(), String> {
        let some = Duration::from_millis(1);
        if let Some(interval) = self.ping_interval {
            check_duration("ping_interval (PING_INTERVAL)", interval, some)?;
        }
        check_duration("pong_timeout", self.pong_timeout, some)?;
        check_duration("write_timeout (WRITE_TIMEOUT)", self.write_timeout, some)?;
        check_duration(
            "close_timeout (CLOSE_TIMEOUT)",
            self.close_timeout,
            Duration::ZERO,
        )?;
        for (name, size) in [
            ("read_buffer_size", self.read_buffer_size),
            ("write_buffer_size", self.write_buffer_size),
        ] {
            if size > MAX_BUFFER {
                return Err(format!(
                    "{name} must be at most {MAX_BUFFER} bytes, not {size}"
                ));
            }
        }
        if self.read_buffer_size == 0 {
            return Err("read_buffer_size must be at least 1 byte".to_owned());
        }
        Ok(())
    }
}

impl Settings {
    /// Checks every value against its range.
    ///
    /// # Errors
    ///
    /// The first value out of range, named.
    pub fn validate(&self) -> Result<(), String> {
        self.connection.validate()?;
        check_duration(
            "header_read_timeout (HEADER_READ_TIMEOUT)",
            self.header_read_timeout,
            Duration::from_millis(1),
        )?;
        check_duration(
            "shutdown_timeout (SHUTDOWN_TIMEOUT)",
            self.shutdown_timeout,
            Duration::ZERO,
        )?;
        if self.max_sockets == Some(0) {
            return Err("max_sockets (MAX_SOCKETS) must be at least 1".to_owned());
        }
        Ok(())
    }

    /// The defaults, changed by whichever of `PING_INTERVAL`,
    /// `WRITE_TIMEOUT`, `CLOSE_TIMEOUT`, `ALLOWED_ORIGINS`,
    /// `MAX_FRAMES_PER_SECOND`, `MAX_BYTES_PER_SECOND`, `MAX_CONNECTIONS`,
    /// `MAX_SOCKETS`, `HEADER_READ_TIMEOUT`, `SHUTDOWN_TIMEOUT` and `METRICS`
    /// are set.
    ///
    /// # Errors
    ///
    /// A bad value, with the variable named.
    pub fn from_env() -> Result<Settings, String> {
        Settings::from_lookup(|name| std::env::var(name).ok())
    }

    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Settings, String> {
        let mut settings = Settings::default();
        let connection = &mut settings.connection;
        let number = |name: &str, value: &str, max: u64| -> Result<u64, String> {
            match value.trim().parse::<u64>() {
                Ok(number) if number <= max => Ok(number),
                _ => Err(format!(
                    "{name} must be a whole number from 0 to {max}, not {value:?}"
                )),
            }
        };
        let max_secs = MAX_DURATION.as_secs();
        let seconds = |name: &str, value: &str| number(name, value, max_secs);
        let positive_seconds = |name: &str, value: &str| match seconds(name, value)? {
            0 => Err(format!("{name} must be at least 1 second")),
            secs => Ok(Duration::from_secs(secs)),
        };
        if let Some(value) = lookup("PING_INTERVAL") {
            connection.ping_interval = match seconds("PING_INTERVAL", &value)? {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            };
        }
        if let Some(value) = lookup("WRITE_TIMEOUT") {
            connection.write_timeout = positive_seconds("WRITE_TIMEOUT", &value)?;
        }
        if let Some(value) = lookup("CLOSE_TIMEOUT") {
            connection.close_timeout = Duration::from_secs(seconds("CLOSE_TIMEOUT", &value)?);
        }
        if let Some(value) = lookup("ALLOWED_ORIGINS") {
            connection.allowed_origins = AllowedOrigins::parse(&value)?;
        }
        let rate = |name: &str, value: &str| -> Result<Option<NonZeroU32>, String> {
            let rate = number(name, value, u64::from(u32::MAX))?;
            Ok(NonZeroU32::new(u32::try_from(rate).unwrap_or(u32::MAX)))
        };
        if let Some(value) = lookup("MAX_FRAMES_PER_SECOND") {
            connection.inbound.frames_per_second = rate("MAX_FRAMES_PER_SECOND", &value)?;
        }
        if let Some(value) = lookup("MAX_BYTES_PER_SECOND") {
            connection.inbound.bytes_per_second = rate("MAX_BYTES_PER_SECOND", &value)?;
        }
        let count = |name: &str, value: &str| -> Result<Option<usize>, String> {
            let count = number(name, value, 100_000_000)?;
            Ok(usize::try_from(count).ok().filter(|&count| count > 0))
        };
        if let Some(value) = lookup("MAX_CONNECTIONS") {
            settings.max_connections = count("MAX_CONNECTIONS", &value)?;
        }
        if let Some(value) = lookup("MAX_SOCKETS") {
            settings.max_sockets = count("MAX_SOCKETS", &value)?;
        }
        if let Some(value) = lookup("HEADER_READ_TIMEOUT") {
            settings.header_read_timeout = positive_seconds("HEADER_READ_TIMEOUT", &value)?;
        }
        if let Some(value) = lookup("SHUTDOWN_TIMEOUT") {
            settings.shutdown_timeout = Duration::from_secs(seconds("SHUTDOWN_TIMEOUT", &value)?);
        }
        if let Some(value) = lookup("METRICS") {
            settings.metrics = match value.trim() {
                "1" | "true" | "on" | "yes" => true,
                "0" | "false" | "off" | "no" | "" => false,
                _ => return Err(format!("METRICS must be 1 or 0, not {value:?}")),
            };
        }
        settings.validate()?;
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
        assert_eq!(defaults.connection.read_buffer_size, 2048);
        assert_eq!(
            defaults.connection.ping_interval,
            Some(Duration::from_secs(20))
        );
        assert_eq!(defaults.max_connections, Some(10_000));
        assert_eq!(defaults.header_read_timeout, Duration::from_secs(10));
        assert_eq!(
            defaults.connection.allowed_origins,
            AllowedOrigins::SameHostAnd(vec![])
        );
        assert_eq!(defaults.connection.inbound, InboundBudget::default());
        assert!(!defaults.metrics);
        defaults.validate().unwrap();
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
            ("MAX_SOCKETS", "500"),
            ("MAX_FRAMES_PER_SECOND", "0"),
            ("MAX_BYTES_PER_SECOND", "4096"),
            ("HEADER_READ_TIMEOUT", "3"),
            ("SHUTDOWN_TIMEOUT", "0"),
            ("METRICS", "1"),
        ])
        .unwrap();
        let connection = &read.connection;
        assert_eq!(connection.ping_interval, None);
        assert_eq!(connection.write_timeout, Duration::from_secs(3));
        assert_eq!(connection.close_timeout, Duration::from_secs(1));
        assert_eq!(connection.inbound.frames_per_second, None);
        assert_eq!(connection.inbound.bytes_per_second, NonZeroU32::new(4096));
        assert_eq!(read.max_connections, None);
        assert_eq!(read.max_sockets, Some(500));
        assert_eq!(read.header_read_timeout, Duration::from_secs(3));
        assert_eq!(read.shutdown_timeout, Duration::ZERO);
        assert!(read.metrics);
        assert_eq!(
            connection.allowed_origins,
            AllowedOrigins::parse("https://app.example.com,http://localhost:3000").unwrap()
        );
        for (name, value) in [
            ("PING_INTERVAL", "soon"),
            ("PING_INTERVAL", "18446744073709551615"),
            ("WRITE_TIMEOUT", "0"),
            ("CLOSE_TIMEOUT", "86401"),
            ("MAX_CONNECTIONS", "-1"),
            ("MAX_SOCKETS", "1e9"),
            ("MAX_FRAMES_PER_SECOND", "4294967296"),
            ("HEADER_READ_TIMEOUT", "0"),
            ("SHUTDOWN_TIMEOUT", "forever"),
            ("METRICS", "maybe"),
            ("ALLOWED_ORIGINS", "example.com"),
        ] {
            let err = settings(&[(name, value)]).unwrap_err();
            assert!(err.contains(name), "{name}={value}: {err}");
        }
    }

    #[test]
    fn settings_written_in_code_are_checked_too() {
        let mut far = Settings::default();
        far.connection.close_timeout = Duration::MAX;
        assert!(far.validate().unwrap_err().contains("close_timeout"));
        let mut never = Settings::default();
        never.connection.ping_interval = Some(Duration::from_secs(u64::MAX));
        assert!(never.validate().unwrap_err().contains("ping_interval"));
        let none = Settings {
            max_sockets: Some(0),
            ..Settings::default()
        };
        assert!(none.validate().unwrap_err().contains("max_sockets"));
    }

    proptest! {
        /// Whatever the environment says, reading it returns settings or an
        /// error; it never panics, and what it returns is in range.
        #[test]
        fn no_value_in_the_environment_panics(
            name in prop::sample::select(vec![
                "PING_INTERVAL", "WRITE_TIMEOUT", "CLOSE_TIMEOUT", "ALLOWED_ORIGINS",
                "MAX_FRAMES_PER_SECOND", "MAX_BYTES_PER_SECOND", "MAX_CONNECTIONS",
                "MAX_SOCKETS", "HEADER_READ_TIMEOUT", "SHUTDOWN_TIMEOUT", "METRICS",
            ]),
            value in prop_oneof![
                any::<u64>().prop_map(|n| n.to_string()),
                any::<i64>().prop_map(|n| n.to_string()),
                "\\PC{0,40}",
            ],
        ) {
            if let Ok(read) = settings(&[(name, &value)]) {
                prop_assert!(read.validate().is_ok());
            }
        }
    }
}
