//! The channel layers this app uses, each under an alias, built once when
//! the app is built.
//!
//! Consumers name the alias they need (`const LAYER: Option<&str> =
//! Some("chat")`), never a concrete layer, so moving a room from this
//! in-memory layer to Redis later changes this file and nothing else.

use axum_channels::layer::{InMemoryLayer, Layers};

// ANCHOR: setup
/// Every layer of the app, by alias.
pub fn setup() -> Layers {
    Layers::new().with("chat", InMemoryLayer::default())
}
// ANCHOR_END: setup
