//! [`serve`]: run an app until Ctrl+C or SIGTERM, then close every
//! WebSocket politely.
//!
//! `axum::serve(...).with_graceful_shutdown(...)` stops accepting and waits
//! for HTTP requests, but a WebSocket stops being an HTTP request the moment
//! it is upgraded, so plain axum would end the process with every WebSocket
//! cut off mid-sentence: no close frame, no `disconnect`, groups never left
//! (in Redis, other processes would keep sending to them). `serve` does
//! what a careful server does instead: on the signal it refuses new
//! handshakes, sends every open WebSocket a close frame 1001 ("server
//! shutting down"), lets each consumer run `disconnect` and leave its
//! groups, and waits for all of that, HTTP requests included, at most
//! [`Settings::shutdown_timeout`] from the signal, so a client that never
//! answers cannot keep the process alive.

use std::future::Future;
use std::io;

use axum::Router;
use tokio::net::TcpListener;

use crate::http::{HttpLimits, default_max_sockets, serve_http};
use crate::runtime::Runtime;
#[cfg(doc)]
use crate::settings::Settings;

/// Serves `app` on `listener` with the [`Settings`] read from the
/// environment, until Ctrl+C or SIGTERM; then shuts down gracefully, as the
/// module documentation describes. With `METRICS=1` it also serves
/// `/metrics` (needs the crate's `metrics` feature). The same as
/// `Runtime::from_env()?.serve(listener, app)`.
///
/// # Errors
///
/// A bad setting in the environment, with the variable named, before
/// anything is served; or the error that stopped the server.
pub async fn serve(listener: TcpListener, app: Router) -> io::Result<()> {
    let runtime =
        Runtime::from_env().map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
    runtime.serve(listener, app).await
}

/// Serves `app` with `runtime` until `signal` resolves, then shuts down
/// within the runtime's `shutdown_timeout`, counted from the signal.
pub(crate) async fn serve_with(
    runtime: Runtime,
    listener: TcpListener,
    app: Router,
    signal: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let settings = runtime.settings();
    let app = if settings.metrics {
        app.merge(metrics_route()?)
    } else {
        app
    };
    let app = runtime.attach(app);
    widen_backlog(&listener);
    let limits = HttpLimits {
        header_read_timeout: settings.header_read_timeout,
        max_sockets: socket_cap(settings.max_sockets, settings.max_connections),
    };
    let signalled = async {
        signal.await;
        tracing::info!("shutting down: closing every WebSocket with 1001");
        runtime.start_shutting_down();
        // The accept loop sees the shutdown and returns by the deadline.
        std::future::pending::<()>().await
    };
    let deadline = {
        let runtime = runtime.clone();
        move || runtime.start_shutting_down()
    };
    let token = runtime.shutting_down_token().clone();
    tokio::select! {
        served = serve_http(listener, app, limits, token, deadline) => served?,
        () = signalled => {}
    }
    // The WebSockets and background tasks, within the same deadline.
    runtime.shut_down().await;
    Ok(())
}

/// How many connections the kernel may hold for us before we accept them.
const LISTEN_BACKLOG: i32 = 4096;

/// Raises the listener's backlog from the 128 that `TcpListener::bind` asks
/// for (the standard library's figure) to [`LISTEN_BACKLOG`] (the kernel
/// caps it at `net.core.somaxconn`, 4096 on current Linux). With 2,000
/// handshakes arriving at once, a queue of 128 overflows as soon as the
/// server falls behind by a few milliseconds, and every handshake the
/// kernel drops waits for the client to resend its SYN: 1 s, then 3 s.
/// Calling `listen` again on a listening socket only changes its backlog.
#[cfg(unix)]
fn widen_backlog(listener: &TcpListener) {
    use std::os::fd::AsRawFd;
    // SAFETY: listen() on a valid socket only changes its backlog; the fd
    // stays owned by `listener`.
    if unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
        tracing::debug!(err = %io::Error::last_os_error(), "cannot widen the listen backlog");
    }
}

#[cfg(not(unix))]
fn widen_backlog(_listener: &TcpListener) {}

/// The most sockets to hold open: `MAX_SOCKETS` if set, never more than
/// the open-file limit allows; with a warning when the WebSocket limit
/// could not be reached under it.
fn socket_cap(configured: Option<usize>, max_connections: Option<usize>) -> usize {
    let budget = default_max_sockets();
    let cap = match configured {
        Some(max) if max > budget.max_sockets => {
            tracing::warn!(
                max_sockets = max,
                allowed = budget.max_sockets,
                file_limit = budget.file_limit,
                "MAX_SOCKETS is above what the open-file limit allows; using the lower figure"
            );
            budget.max_sockets
        }
        Some(max) => max,
        None => budget.max_sockets,
    };
    if let Some(websockets) = max_connections.filter(|&websockets| websockets > cap) {
        tracing::warn!(
            max_connections = websockets,
            max_sockets = cap,
            file_limit = budget.file_limit,
            "MAX_CONNECTIONS is above the socket limit, which the open-file limit sets: \
             at most {cap} connections can be open"
        );
    }
    cap
}

/// Resolves on Ctrl+C or, on Unix, SIGTERM (what `kill` and container
/// runtimes send). If no handler can be installed, it never resolves, and
/// the server runs until it is killed. Public for processes that stop the
/// same way without serving, such as a job worker.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// `/metrics` in Prometheus text format, from the counters and gauges this
/// crate records with the `metrics` facade: open connections, accepted and
/// refused handshakes (by reason), frames in and out, layer sends, full
/// channels, Redis reconnects. [`serve`] mounts it when `METRICS=1`; an app
/// that serves itself can merge it into its router.
///
/// # Errors
///
/// If another metrics recorder is already installed in this process.
#[cfg(feature = "metrics")]
pub fn metrics_route() -> io::Result<Router> {
    use axum::routing::get;
    use metrics_exporter_prometheus::PrometheusBuilder;

    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|err| io::Error::other(format!("cannot serve /metrics: {err}")))?;
    let render = move || {
        let handle = handle.clone();
        async move { handle.render() }
    };
    Ok(Router::new().route("/metrics", get(render)))
}

#[cfg(not(feature = "metrics"))]
fn metrics_route() -> io::Result<Router> {
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        "METRICS=1 needs axum-channels' `metrics` feature: add it to the app's Cargo.toml",
    ))
}

#[cfg(all(test, unix))]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpStream;

    use super::*;

    /// 600 clients arriving before the server accepts any: each one's
    /// connect completes once the kernel has queued it, which with the
    /// default backlog of 128 stops at about 129 (the rest wait for SYN
    /// retransmits, a second and more).
    #[tokio::test]
    async fn the_kernel_queues_a_burst_of_handshakes_for_us() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        widen_backlog(&listener);
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for n in 0..600 {
            let connected =
                tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr))
                    .await
                    .unwrap_or_else(|_| panic!("connection {n} was not queued by the kernel"));
            clients.push(connected.unwrap());
        }
        drop(listener);
    }
}
