//! Reads the configuration, then serves this step's app until Ctrl+C.

use std::process::ExitCode;

use step_02_room_chat::{Config, app};
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

    let server = axum::serve(listener, app()).with_graceful_shutdown(ctrl_c());
    if let Err(err) = server.await {
        eprintln!("error: the server stopped: {err}");
        return ExitCode::FAILURE;
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
// ANCHOR_END: main

/// Resolves when the user presses Ctrl+C.
async fn ctrl_c() {
    // If the signal handler cannot be installed, serve until killed.
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}
