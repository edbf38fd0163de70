//! Reads the configuration, then serves this step's app until Ctrl+C (or
//! SIGTERM), and closes every WebSocket politely on the way out.

use std::process::ExitCode;

use axum_channels::Runtime;
use step_03_background_jobs::{Backends, Config, app_with};
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
    // The library's production settings (MAX_CONNECTIONS, ...), read now
    // so that a bad value stops the server here. The runtime they make is
    // shared by every connection and by the in-process workers.
    let runtime = match Runtime::from_env() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
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
        Ok(bound) => tracing::info!("listening on http://{bound}"),
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
