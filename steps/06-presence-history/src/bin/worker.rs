//! The worker: takes jobs from the Redis queue, runs them, and sends each
//! result through Redis to the server that holds the client's connection.
//!
//! Only needed with `REDIS_URL`: without it, the server runs its own workers.
//! Start as many as you like, each in its own terminal, after the server:
//!
//! ```console
//! $ REDIS_URL=redis://127.0.0.1:6379 cargo run -p step-06-presence-history --bin step-06-presence-history-worker
//! ```
//!
//! `cargo xtask step 06 --redis` starts Redis, the server and one worker for
//! you. The worker reads the same settings as the server (`config.rs`).

use std::process::ExitCode;

use step_06_presence_history::{Config, run_worker};
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
    match run_worker(&config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
// ANCHOR_END: main
