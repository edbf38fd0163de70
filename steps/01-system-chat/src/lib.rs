//! Step 01 · System messages: a first WebSocket consumer that echoes.
//!
//! Builds on step 00 by adding `/ws/system`, where the [`SystemChat`]
//! consumer greets each client and answers every message it sends. Each
//! connection is on its own: there is no channel layer yet, so clients never
//! see each other's messages.
//!
//! Run it with `cargo xtask step 01`, then open <http://127.0.0.1:8080>.

mod assets;
mod config;
mod system_chat;

use axum::Router;
use axum::routing::get;
use axum_channels::route;

pub use config::Config;
pub use system_chat::SystemChat;

// ANCHOR: app
/// The WebSocket paths of the routes below, for the page (`/endpoints.json`).
const ENDPOINTS: &[&str] = &["/ws/system"];

/// Builds the app: every route this step serves.
pub fn app() -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/static/{*path}", get(assets::static_file))
        .route("/endpoints.json", assets::endpoints(ENDPOINTS))
        .route("/ws/system", route::<SystemChat>())
}
// ANCHOR_END: app
