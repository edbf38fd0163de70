//! Step 04 · Showcase: four channel layers side by side, text and JSON
//! consumers, and messages sent to the clients from outside the server.
//!
//! Builds on step 03 by adding four endpoints, each on a layer of its own:
//! `/ws/chat` ([`Chat`], on `"chat"`), `/ws/reliable` ([`ReliableChat`], on
//! `"queue"`), `/ws/notifications` ([`Notifications`], JSON, on
//! `"notifications"`) and `/ws/analytics` ([`Analytics`], on `"analytics"`);
//! and the `external_sender` binary, which sends to their groups through
//! Redis without being a server at all. Without `REDIS_URL` all four layers
//! live in this process; with it, they are the original's Redis layers.
//!
//! Run it with `cargo xtask step 04`, then open <http://127.0.0.1:8080>;
//! `cargo xtask step 04 --redis` runs it on a throwaway Redis with a worker,
//! and prints the command that runs the external sender against them.

mod analytics;
mod assets;
mod background_job;
mod chat;
mod config;
mod jobs;
mod layers;
mod notifications;
mod reliable_chat;
mod room_chat;
mod system_chat;

use axum::routing::get;
use axum::{Extension, Router};
use axum_channels::{Runtime, route};

pub use analytics::{Analytics, AnalyticsEvent};
pub use background_job::{BackgroundJob, JobRequest, MAX_CONTENT};
pub use chat::{Chat, ChatEvent};
pub use config::Config;
pub use jobs::{Backends, Job, JobEvent, JobKind, JobQueue, PushError, run_worker};
pub use layers::setup_redis;
pub use notifications::{Notification, NotificationEvent, NotificationRequest, Notifications};
pub use reliable_chat::{ReliableChat, ReliableChatEvent};
pub use room_chat::{RoomChat, RoomEvent};
pub use system_chat::SystemChat;

// ANCHOR: app
/// The WebSocket paths of the routes below, for the page (`/endpoints.json`).
const ENDPOINTS: &[&str] = &[
    "/ws/system",
    "/ws/room/{room_name}",
    "/ws/backgroundjob",
    "/ws/chat",
    "/ws/reliable",
    "/ws/notifications",
    "/ws/analytics",
];

/// Builds the app: every route this step serves, with the job queue, its
/// workers and the channel layers in this process, and the default settings
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
        .route("/ws/chat", layers.route::<Chat>())
        .route("/ws/reliable", layers.route::<ReliableChat>())
        .route("/ws/notifications", layers.route::<Notifications>())
        .route("/ws/analytics", layers.route::<Analytics>())
        // Every request carries a copy of the queue; the consumer finds it
        // in its `Scope`.
        .layer(Extension(queue))
}
// ANCHOR_END: app
