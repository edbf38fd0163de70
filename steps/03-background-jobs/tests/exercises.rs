//! The solution to chapter 3's exercise, checked: a client in Rust that
//! queues a job and waits for its result, as the page does in JavaScript.
//! The chapter shows it folded, below its hints.

use std::time::Duration;

use axum_channels::Runtime;
use axum_channels::testing::TestServer;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use step_03_background_jobs::{Backends, Config, app_with};
use tokio_tungstenite::tungstenite::Message;

/// What can go wrong, as text: this is an example, not a library.
type Error = Box<dyn std::error::Error>;

// ANCHOR: client
/// Queues a `kind` job with `content` on the server at `url` (e.g.
/// `ws://127.0.0.1:8080/ws/backgroundjob`) and returns its result.
async fn run_job(url: &str, kind: &str, content: &str) -> Result<String, Error> {
    let (mut socket, _response) = tokio_tungstenite::connect_async(url).await?;
    let request = json!({ "type": kind, "content": content });
    socket.send(Message::text(request.to_string())).await?;

    // Frames arrive in this order: connected, queuing, queued (with the
    // job's id), then, when a worker is done, the result with that id.
    let mut job_id = None;
    while let Some(frame) = socket.next().await {
        let Message::Text(text) = frame? else {
            continue;
        };
        let reply: Value = serde_json::from_str(&text)?;
        if reply["status"] == "error" {
            return Err(reply["message"].as_str().unwrap_or("error").into());
        }
        if reply["status"] == "queued" {
            job_id = reply["job_id"].as_str().map(str::to_owned);
        }
        if reply["type"] == "job_result" && reply["job_id"].as_str() == job_id.as_deref() {
            return Ok(reply["message"].as_str().unwrap_or_default().to_owned());
        }
    }
    Err("the server closed the connection before the result came".into())
}
// ANCHOR_END: client

async fn server() -> TestServer {
    let config = Config {
        job_delay: Some(Duration::ZERO),
        ..Config::default()
    };
    let backends = Backends::in_memory(&config, &Runtime::default());
    TestServer::start(app_with(backends)).await
}

#[tokio::test]
async fn a_rust_client_gets_its_result() {
    let server = server().await;
    let url = server.ws_url("/ws/backgroundjob");
    let result = run_job(&url, "translate", "hello").await.unwrap();
    assert_eq!(result, "🌍 Translated: 'hello' → 'hola'");
}

#[tokio::test]
async fn a_refused_job_is_an_error() {
    let server = server().await;
    let url = server.ws_url("/ws/backgroundjob");
    let err = run_job(&url, "bogus", "x").await.unwrap_err();
    assert!(err.to_string().contains("Unknown job type"), "{err}");
}
