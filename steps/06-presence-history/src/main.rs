//! Reads the configuration and the library's production settings, then
//! serves this step's app until Ctrl+C (or SIGTERM), and closes every
//! WebSocket politely on the way out.

use std::process::ExitCode;

use axum_channels::Runtime;
use step_06_presence_history::{Backends, Config, app_with};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

// ANCHOR: main
#[tokio::main]
async fn main() -> ExitCode {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    // ANCHOR: settings
    // The library's production settings (ALLOWED_ORIGINS, MAX_CONNECTIONS,
    // METRICS, ...): read now, so that a bad value stops the server here,
    // and logged, so that each server of a cluster says what it runs with.
    let runtime = match Runtime::from_env() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let settings = runtime.settings();
    tracing::info!(
        max_connections = ?settings.max_connections,
        allowed_origins = ?settings.connection.allowed_origins,
        ping_interval = ?settings.connection.ping_interval,
        write_timeout = ?settings.connection.write_timeout,
        metrics = settings.metrics,
        "production settings"
    );
    // ANCHOR_END: settings
    // In this process, or in Redis if REDIS_URL says so.
    let backends = match Backends::from_config(&config, &runtime).await {
        Ok(backends) => backends,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let address = format!("{}:{}", config.host, config.port);
    let listener = match TcpListener::bind(&address).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!(
                "error: cannot listen on {address}: {err} (is another step still running? try --port)"
            );
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        // The process id tells the servers of a cluster apart in one terminal.
        Ok(bound) => tracing::info!(pid = std::process::id(), "listening on http://{bound}"),
        Err(_) => tracing::info!("listening on http://{address}"),
    }

    // Unlike `axum::serve`, this also closes each WebSocket with a close
    // frame on the way out, and lets its consumer's `disconnect` run.
    if let Err(err) = runtime.serve(listener, app_with(backends)).await {
        eprintln!("error: {err}");
        return ExitCode::FAILURE;
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
// ANCHOR_END: main
