//! Step 00 · Preparation: an axum app that serves the tutorial's demo page.
//!
//! This is where the tutorial starts: a web server with one page and its
//! styles and script, all embedded in the binary. The page already has every
//! panel of the finished app; the panels whose WebSocket endpoints do not
//! exist yet say which step adds them.
//!
//! Run it with `cargo xtask step 00`, then open <http://127.0.0.1:8080>.

mod assets;
mod config;

use axum::Router;
use axum::routing::get;

pub use config::Config;

// ANCHOR: app
/// The WebSocket paths of the routes below, for the page (`/endpoints.json`).
const ENDPOINTS: &[&str] = &[];

/// Builds the app: every route this step serves.
pub fn app() -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/static/{*path}", get(assets::static_file))
        .route("/endpoints.json", assets::endpoints(ENDPOINTS))
}
// ANCHOR_END: app
