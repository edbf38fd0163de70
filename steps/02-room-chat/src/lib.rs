//! Step 02 · Room chat: clients talk to each other through a channel layer.
//!
//! Builds on step 01 by adding `/ws/room/{room_name}`, where the
//! [`RoomChat`] consumer puts every connection to the same room in one group
//! of the `"chat"` channel layer. What one member says, the group delivers to
//! all of them; rooms with different names never hear each other.
//!
//! Run it with `cargo xtask step 02`, then open <http://127.0.0.1:8080> in
//! two browser tabs.

mod assets;
mod config;
mod layers;
mod room_chat;
mod system_chat;

use axum::Router;
use axum::routing::get;
use axum_channels::route;

pub use config::Config;
pub use room_chat::{RoomChat, RoomEvent};
pub use system_chat::SystemChat;

// ANCHOR: app
/// The WebSocket paths of the routes below, for the page (`/endpoints.json`).
const ENDPOINTS: &[&str] = &["/ws/system", "/ws/room/{room_name}"];

/// Builds the app: every route this step serves.
pub fn app() -> Router {
    let layers = layers::setup();
    Router::new()
        .route("/", get(assets::index))
        .route("/static/{*path}", get(assets::static_file))
        .route("/endpoints.json", assets::endpoints(ENDPOINTS))
        .route("/ws/system", route::<SystemChat>())
        .route("/ws/room/{room_name}", layers.route::<RoomChat>())
}
// ANCHOR_END: app
