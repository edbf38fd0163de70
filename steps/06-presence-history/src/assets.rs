//! The demo page and its static files, embedded in the binary.
//!
//! `rust-embed` copies the workspace's `static/` folder into the executable
//! at compile time, so a step runs from any directory and needs no files
//! beside it. Only files that were embedded can be served: a path such as
//! `/static/../Cargo.toml` names no embedded file and gets a 404.

use axum::Json;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use rust_embed::RustEmbed;

// ANCHOR: embed
#[derive(RustEmbed)]
#[folder = "../../static/"]
struct StaticFiles;
// ANCHOR_END: embed

/// `GET /`: the demo page.
pub async fn index() -> Response {
    serve("index.html")
}

/// `GET /static/{*path}`: a style sheet, a script, ...
pub async fn static_file(Path(path): Path<String>) -> Response {
    serve(&path)
}

// ANCHOR: endpoints
/// `GET /endpoints.json`: the WebSocket paths this step serves, as a JSON
/// list. The page reads it to know which panels to connect, and which to
/// label "arrives in step NN", without trying each endpoint.
pub fn endpoints(paths: &'static [&'static str]) -> MethodRouter {
    get(move || async move { Json(paths) })
}
// ANCHOR_END: endpoints

// ANCHOR: serve
fn serve(path: &str) -> Response {
    let Some(file) = StaticFiles::get(path) else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    // Say the charset, so the page's emoji survive whatever the browser's default.
    let mut content_type = file.metadata.mimetype().to_owned();
    if content_type.starts_with("text/") {
        content_type.push_str("; charset=utf-8");
    }
    ([(header::CONTENT_TYPE, content_type)], file.data).into_response()
}
// ANCHOR_END: serve
