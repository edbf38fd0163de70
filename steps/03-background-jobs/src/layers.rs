//! The channel layers this app uses, each under an alias, built once when
//! the app is built.
//!
//! Consumers name the alias they need (`const LAYER: Option<&str> =
//! Some("chat")`), never a concrete layer, so moving a room from this
//! in-memory layer to Redis later changes this file and nothing else.

use axum_channels::layer::redis::{RedisConfig, RedisPubSubLayer};
use axum_channels::layer::{InMemoryLayer, Layers};

// ANCHOR: setup
/// Every layer of the app, by alias.
pub fn setup() -> Layers {
    Layers::new().with("chat", InMemoryLayer::default())
}
// ANCHOR_END: setup

// ANCHOR: setup_redis
/// The same alias in Redis, where every process on it shares it: the
/// server that holds a connection and the workers that send it results.
/// As in the original, `"chat"` is a pub/sub layer with the prefix `chat`.
pub async fn setup_redis(url: &str) -> Result<Layers, String> {
    let config = RedisConfig::new(url).with_prefix("chat");
    let chat = RedisPubSubLayer::connect(config)
        .await
        .map_err(|err| err.to_string())?;
    Ok(Layers::new().with("chat", chat))
}
// ANCHOR_END: setup_redis
