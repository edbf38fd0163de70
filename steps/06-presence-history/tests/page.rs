//! The demo page and its static files, as the browser fetches them.

use axum_channels::testing::TestServer;
use insta::assert_snapshot;

/// One summary line per path: method, path, status and content type.
async fn fetch_all(paths: &[&str]) -> String {
    let server = TestServer::start(step_06_presence_history::app()).await;
    let mut lines = String::new();
    for path in paths {
        lines.push_str(&server.get(path).await.summary(path));
        lines.push('\n');
    }
    lines
}

#[tokio::test]
async fn page_and_assets() {
    let lines = fetch_all(&["/", "/static/css/style.css", "/static/js/main.js"]).await;
    assert_snapshot!("page_and_assets", lines);
}

#[tokio::test]
async fn unknown_paths_are_not_found() {
    let lines = fetch_all(&[
        "/nope",
        "/static/nope.css",
        "/static/../Cargo.toml",
        "/static/%2e%2e/Cargo.toml",
        "/static/",
    ])
    .await;
    assert_snapshot!("unknown_paths_are_not_found", lines);
}

#[tokio::test]
async fn page_shows_every_panel() {
    let server = TestServer::start(step_06_presence_history::app()).await;
    let page = server.get("/").await.text();
    for expected in [
        "<title>Fast Channels · Rust edition</title>",
        "Send Analytics Event",
        "System Messages",
        "Room Chat",
        "Background Job Processing",
        "Showcase",
        "/static/css/style.css",
        "/static/js/main.js",
    ] {
        assert!(page.contains(expected), "the page lacks {expected:?}");
    }
}

/// `/endpoints.json` lists the step's WebSocket routes, and each one is
/// there: a plain `GET` gets a WebSocket route's 400, not a 404.
#[tokio::test]
async fn endpoints_list_the_websocket_routes() {
    let server = TestServer::start(step_06_presence_history::app()).await;
    let listing = server.get("/endpoints.json").await;
    let body = listing.text();
    let mut lines = format!("{}\n{body}\n", listing.summary("/endpoints.json"));
    let paths = body.trim_matches(['[', ']']).split(',');
    for path in paths.filter(|path| !path.is_empty()) {
        let path = path.trim_matches('"').replace("{room_name}", "general");
        lines.push_str(&server.get(&path).await.summary(&path));
        lines.push('\n');
    }
    assert_snapshot!("endpoints_list_the_websocket_routes", lines);
}
