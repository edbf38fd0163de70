//! `/metrics` scraped after real traffic (and a real Redis restart): the
//! counters the library records reach Prometheus' text format.
//!
//! One test in its own binary, because a process has one metrics recorder.
#![cfg(feature = "metrics")]

use std::sync::Arc;

use axum::Router;
use axum_channels::layer::redis::{RedisConfig, RedisPubSubLayer};
use axum_channels::layer::{InMemoryLayer, Layers};
use axum_channels::server::metrics_route;
use axum_channels::testing::TestServer;
use axum_channels::{Consumer, Frame, LayerEvent, Result, Scope, Socket};
use channels_testkit::RedisServer;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    Said { text: String },
}

impl LayerEvent for Event {}

/// Says what it hears to the group `all`.
struct Parrot;

impl Consumer for Parrot {
    type Event = Event;
    const LAYER: Option<&'static str> = Some("all");

    fn new(_scope: &Scope) -> Self {
        Parrot
    }

    fn groups(&self) -> Vec<String> {
        vec!["all".to_owned()]
    }

    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        socket.accept().await
    }

    async fn receive(&mut self, socket: &mut Socket, frame: Frame) -> Result<()> {
        if let Frame::Text(text) = frame {
            socket.group_send("all", &Event::Said { text }).await?;
        }
        Ok(())
    }

    async fn event(&mut self, socket: &mut Socket, event: Event) -> Result<()> {
        let Event::Said { text } = event;
        socket.send_text(text).await
    }
}

/// The value of a metric line that starts with `name` and holds `label`.
fn value(scrape: &str, name: &str, label: &str) -> Option<f64> {
    scrape
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| line.starts_with(name) && line.contains(label))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test]
async fn metrics_count_connections_handshakes_frames_and_layer_sends() {
    let layers = Layers::new().with_shared("all", Arc::new(InMemoryLayer::default()));
    let app = Router::new()
        .route("/parrot", layers.route::<Parrot>())
        .merge(metrics_route().expect("the only recorder in this process"));
    let server = TestServer::start(app).await;

    let mut alice = server.connect("/parrot").await;
    alice.send_text("hello").await;
    assert_eq!(alice.recv_text().await, "hello");
    let refused = server
        .try_connect_as("", "/parrot", &Default::default())
        .await;
    assert!(refused.is_ok(), "no Origin header: allowed");

    let scrape = server.get("/metrics").await.text();
    let metric = |name, label| {
        value(&scrape, name, label).unwrap_or_else(|| panic!("no {name} in:\n{scrape}"))
    };
    assert!(metric("axum_channels_connections_open", "") >= 1.0);
    assert!(metric("axum_channels_handshakes_accepted_total", "") >= 2.0);
    assert!(metric("axum_channels_frames_in_total", "") >= 1.0);
    assert!(metric("axum_channels_frames_out_total", "") >= 1.0);
    assert!(metric("axum_channels_layer_sends_total", "to=\"group\"") >= 1.0);

    // A Redis restart under a live layer is counted too.
    let Some(mut redis) = RedisServer::start().await else {
        return; // skipped loudly by RedisServer (a failure under CI=true)
    };
    let _layer = RedisPubSubLayer::connect(RedisConfig::new(redis.url()))
        .await
        .expect("connect to redis-server");
    redis.kill().await;
    redis.restart().await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let scrape = server.get("/metrics").await.text();
        if value(&scrape, "axum_channels_redis_reconnects_total", "").is_some_and(|n| n >= 1.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reconnect counted within 5 s:\n{scrape}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
