//! [`Layers`]: the app's channel layers under aliases, built once at start.
//!
//! Routing a consumer with its layer ([`Layers::route`]) is the runner's
//! business, so that method lives in [`runner`](crate::runner).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{ChannelLayer, LayerError};

/// The channel layers an app uses, by alias: the Rust counterpart of a
/// `setup_layers()` function. Cheap to clone: clones share the layers.
///
/// ```
/// use axum_channels::layer::{InMemoryLayer, Layers};
///
/// let layers = Layers::new().with("chat", InMemoryLayer::default());
/// assert!(layers.get("chat").is_ok());
/// assert!(layers.get("chta").is_err()); // a typo is an error, with the known aliases
/// ```
#[derive(Clone, Default)]
pub struct Layers {
    layers: BTreeMap<String, Arc<dyn ChannelLayer>>,
}

impl Layers {
    /// No layers yet.
    pub fn new() -> Self {
        Layers::default()
    }

    /// Registers `layer` under `alias` (replacing any layer there).
    pub fn with(mut self, alias: &str, layer: impl ChannelLayer) -> Self {
        self.layers.insert(alias.to_owned(), Arc::new(layer));
        self
    }

    /// Registers a layer that is already shared, e.g. one alias for two names.
    pub fn with_shared(mut self, alias: &str, layer: Arc<dyn ChannelLayer>) -> Self {
        self.layers.insert(alias.to_owned(), layer);
        self
    }

    /// The layer registered under `alias`.
    pub fn get(&self, alias: &str) -> Result<Arc<dyn ChannelLayer>, LayerError> {
        self.layers
            .get(alias)
            .cloned()
            .ok_or_else(|| LayerError::UnknownAlias {
                alias: alias.to_owned(),
                known: self.layers.keys().cloned().collect(),
            })
    }
}
