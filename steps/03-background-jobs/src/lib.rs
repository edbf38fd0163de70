//! Step 03 · Background jobs: slow work leaves the WebSocket handler, and its
//! result comes back through the channel layer.
//!
//! Builds on step 02 by adding `/ws/backgroundjob`, where the
//! [`BackgroundJob`] consumer takes jobs as JSON, puts them in a job queue
//! (apalis), and answers at once. A worker runs each job and sends the
//! result to the channel of the connection that asked, through the `"chat"`
//! layer. Without `REDIS_URL` the queue, the workers and the layer all live
//! in this process; with it, jobs wait in Redis for the `worker` binary.
//!
//! Run it with `cargo xtask step 03`, then open <http://127.0.0.1:8080>;
//! `cargo xtask step 03 --redis` runs it on a throwaway Redis with a worker.

mod assets;
mod background_job;
mod config;
mod jobs;
mod layers;
mod room_chat;
mod system_chat;

use axum::routing::get;
use axum::{Extension, Router};
use axum_channels::{Runtime, route};

pub use background_job::{BackgroundJob, JobRequest, MAX_CONTENT};
pub use config::Config;
pub use jobs::{Backends, Job, JobEvent, JobKind, JobQueue, PushError, run_worker};
pub use room_chat::{RoomChat, RoomEvent};
pub use system_chat::SystemChat;

// ANCHOR: app
/// The WebSocket paths of the routes below, for the page (`/endpoints.json`).
const ENDPOINTS: &[&str] = &["/ws/system", "/ws/room/{room_name}", "/ws/backgroundjob"];

/// Builds the app: every route this step serves, with the job queue, its
/// workers and the channel layer in this process, and the default settings
/// (the original's delays among them).
pub fn app() -> Router {
    app_with(Backends::in_memory(&Config::default(), &Runtime::default()))
}

/// Builds the app on the given layers and job queue (see
/// [`Backends::from_config`]).
pub fn app_with(backends: Backends) -> Router {
    let Backends { layers, queue } = backends;
    Router::new()
        .route("/", get(assets::index))
        .route("/static/{*path}", get(assets::static_file))
        .route("/endpoints.json", assets::endpoints(ENDPOINTS))
        .route("/ws/system", route::<SystemChat>())
        .route("/ws/room/{room_name}", layers.route::<RoomChat>())
        .route("/ws/backgroundjob", layers.route::<BackgroundJob>())
        // Every request carries a copy of the queue; the consumer finds it
        // in its `Scope`.
        .layer(Extension(queue))
}
// ANCHOR_END: app
