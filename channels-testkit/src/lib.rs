//! The harnesses this workspace's tests use to run real programs beside
//! them: a server binary as a process of its own ([`ServerProcess`]), a
//! throwaway `redis-server` ([`RedisServer`]) or Redis Cluster of six
//! ([`RedisCluster`]), nginx in front of several
//! servers ([`ReverseProxy`]), and the real Python channel layers in a
//! pinned virtualenv ([`python`]).
//!
//! It is a workspace crate that is never published (`publish = false`):
//! it starts programs of this machine and runs scripts of this repository,
//! which a user of `axum-channels` does not have. What such a user needs to
//! test a consumer, an app served in-process and clients that record a
//! transcript, is `axum_channels::testing` (feature `testing`), and
//! [`ServerProcess`] hands out that module's `TestClient`s.
//!
//! # Waiting
//!
//! Everything that waits is `async` and waits on the test's own runtime:
//! children are `tokio::process` children, ports and `PING`s are polled
//! with `tokio::net` and `tokio::time::sleep`, exits are awaited. So a
//! constructor that waits for its program is an `async fn`
//! (`RedisServer::start().await`), and a test's clients and servers keep
//! running while it waits. `Drop` still kills every child, synchronously
//! and without waiting for it (as tokio's `kill_on_drop` does; tokio reaps
//! it), so a test that panics leaves nothing running.
//!
//! # Missing programs
//!
//! Whatever a harness needs and the machine lacks (`redis-server`, nginx,
//! `python3` and its `venv` module) makes it say so on stderr and return
//! `None`, so the test passes as skipped; with `CI` set (to anything but
//! empty, `0` or `false`), where `.ci/run` installs all of it, that is a
//! failure instead ([`skip_or_fail`]).
//!
//! # Paths, found at run time
//!
//! Nothing here is compiled in, so the crate works from any checkout, any
//! target directory, and a test binary run by hand:
//!
//! - The workspace root ([`paths::workspace_root`]) is `CHANNELS_TESTKIT_ROOT`
//!   when set; otherwise the first directory, walking up from the current
//!   one, whose `Cargo.toml` has a `[workspace]` table (cargo runs each test
//!   in its package's directory, which is below the root).
//! - The Python scripts ([`python::Python::script`]) and their pinned
//!   requirements are `axum-channels/tests/interop/` under that root.
//! - The scratch directory for what outlives one run, the virtualenv
//!   ([`paths::scratch_dir`]), is `CARGO_TARGET_TMPDIR` when it is in the
//!   environment; otherwise `tmp/` in `CARGO_TARGET_DIR` (relative to the
//!   root if relative), in the target directory the running test binary
//!   lives in (`<target>/<profile>/deps/`), or in `<root>/target`, in that
//!   order. (Cargo gives `CARGO_TARGET_TMPDIR` to integration tests only
//!   when it compiles them, for `env!`, not when it runs them; a library
//!   cannot see that, so under plain `cargo test` it is the test binary's
//!   own target directory that counts.)
//! - Each program's own files (a redis-server's log, nginx's configuration)
//!   go to a fresh directory under the system's temporary directory,
//!   removed with the harness.
//!
//! # Why the layers stay in `axum-channels`
//!
//! The channel layers use nothing of axum, and `layer/` imports nothing
//! else of the crate, so they could be a crate of their own that a worker
//! or an external sender builds without axum. Not yet: here those binaries
//! live in the step packages, whose server needs axum anyway, so the split
//! would save no build, and it would add a second published crate whose
//! `LayerEvent`, `LayerError` and membership guard must change in lockstep
//! with the runner's. Since the move stays mechanical, it is worth doing
//! when someone ships a sender or worker as a package of its own.

use std::path::PathBuf;

pub mod cluster_recipe;
mod logs;
mod nginx;
pub mod paths;
mod process;
pub mod python;
mod redis_cluster;
mod redis_server;

pub use logs::Logs;
pub use nginx::ReverseProxy;
pub use process::ServerProcess;
pub use redis_cluster::{NodeInfo, RedisCluster};
pub use redis_server::RedisServer;

/// Whether `CI` is set (`.ci/run` sets `CI=true`) to anything but empty,
/// `0` or `false`: then whatever a test needs (a redis-server, Python,
/// nginx) must be there, and a missing one is a failure rather than a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| !matches!(value.as_str(), "" | "0" | "false"))
}

/// A test that cannot run on this machine says so loudly, or fails under
/// `CI`. `what` names the tests (e.g. "Redis test"), `reason` says what is
/// missing and how to get it.
pub fn skip_or_fail(what: &str, reason: &str) {
    if in_ci() {
        panic!("{what} cannot run in CI: {reason}");
    }
    // Straight to stderr: the harness captures `eprintln!` of passing
    // tests, and a skip must not pass unnoticed.
    let note = format!("{what} skipped: {reason}; with CI=true this is a failure\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), note.as_bytes());
}

/// A port of 127.0.0.1 that was free a moment ago (the OS picks it for
/// port 0). Another process may take it before the caller binds it, so
/// the harnesses that use it retry with another.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind a free port on 127.0.0.1")
}

/// A directory of its own for one harness's files, e.g. one redis-server's;
/// the caller creates it and removes it when done.
fn temp_dir(kind: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "channels-testkit-{kind}-{}-{n}",
        std::process::id()
    ))
}
