//! Step 05 · Scaling out: the app of step 04, run as several server
//! processes and workers on one Redis, or several.
//!
//! The endpoints are step 04's. What changes is how the app is run: any
//! number of servers and workers share `REDIS_URL`, which may list several
//! Redis servers (shards) separated by commas; a room, the chat and the
//! notifications span every server; a job's result finds its connection
//! whichever worker ran it. The library's production settings are read and
//! logged at start, `/metrics` is there with `METRICS=1`, and
//! `deploy/nginx.conf` is a reverse proxy that spreads connections over the
//! servers.
//!
//! Run one server with `cargo xtask step 06` (or `--redis`), and a whole
//! cluster with `cargo xtask cluster`: two servers, two workers, a Redis
//! (`--shards 2`: two) and nginx in front when it is installed.

mod analytics;
mod assets;
mod background_job;
mod chat;
mod config;
mod jobs;
mod layers;
mod notifications;
mod presence_room;
mod reliable_chat;
mod room_chat;
mod rooms;
mod system_chat;

use axum::routing::get;
use axum::{Extension, Router};
use axum_channels::{Runtime, route};

pub use analytics::{Analytics, AnalyticsEvent};
pub use background_job::{BackgroundJob, JobRequest, MAX_CONTENT};
pub use chat::{Chat, ChatEvent};
pub use config::{Config, redis_hosts};
pub use jobs::{Backends, Job, JobEvent, JobKind, JobQueue, PushError, run_worker};
pub use layers::setup_redis;
pub use notifications::{Notification, NotificationEvent, NotificationRequest, Notifications};
pub use presence_room::{ClientMessage, PresenceRoom, PresenceRoomEvent};
pub use reliable_chat::{ReliableChat, ReliableChatEvent};
pub use room_chat::{RoomChat, RoomEvent};
pub use rooms::Rooms;
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
    "/ws/presence/{room_name}",
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
    let Backends {
        layers,
        queue,
        rooms,
    } = backends;
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
        .route("/ws/presence/{room_name}", layers.route::<PresenceRoom>())
        // Every request carries a copy of the queue and the rooms; the
        // consumers find them in their `Scope`.
        .layer(Extension(queue))
        .layer(Extension(rooms))
}
// ANCHOR_END: app
