//! The Redis layers of the Python tutorial's sandbox, built from `REDIS_URL`,
//! and one group message through each kind.
//!
//! Run it against a Redis of your own (it leaves nothing behind):
//!
//! ```sh
//! REDIS_URL=redis://127.0.0.1:6379 cargo run -p axum-channels --features redis --example redis_layers
//! ```

use std::time::Duration;

use axum_channels::layer::redis::{RedisConfig, RedisLayer, RedisPubSubLayer};
use axum_channels::layer::{LayerError, LayerMessage, Layers};
use serde_json::json;

// ANCHOR: setup
/// The sandbox's four Redis layers, under the aliases and with the settings
/// the Python sandbox registers them with, so both share them on one Redis.
async fn setup(url: &str) -> Result<Layers, LayerError> {
    let on = |prefix: &str| RedisConfig::new(url).with_prefix(prefix);
    // The queue layers keep a message for `expiry`, up to `capacity` a channel.
    let keeping = |prefix: &str, expiry: Duration, capacity: usize| {
        on(prefix).with_expiry(expiry).with_capacity(capacity)
    };
    let minutes = |n: u64| Duration::from_secs(60 * n);
    let chat = RedisPubSubLayer::connect(on("chat")).await?;
    let queue = RedisLayer::connect(keeping("queue", minutes(15), 1000)).await?;
    let notifications = RedisPubSubLayer::connect(on("notify")).await?;
    let analytics = RedisLayer::connect(keeping("analytics", minutes(60), 5000)).await?;
    Ok(Layers::new()
        .with("chat", chat)
        .with("queue", queue)
        .with("notifications", notifications)
        .with("analytics", analytics))
}
// ANCHOR_END: setup

#[tokio::main]
async fn main() -> Result<(), LayerError> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let layers = setup(&url).await?;
    for alias in ["chat", "queue"] {
        let layer = layers.get(alias)?;
        let channel = layer.new_channel("specific").await?;
        layer.group_add("demo", &channel).await?;
        let hello: LayerMessage = json!({"type": "demo.message", "text": "hello"})
            .as_object()
            .cloned()
            .unwrap_or_default();
        layer.group_send("demo", hello).await?;
        let got = layer.receive(&channel).await?;
        println!("{alias}: {channel} got {}", serde_json::Value::Object(got));
        layer.group_discard("demo", &channel).await?;
        layer.close_channel(&channel).await?;
    }
    Ok(())
}
