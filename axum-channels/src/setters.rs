//! `setters!`: the `with_*` methods of the configuration structs.
//!
//! The configuration structs ([`Settings`](crate::Settings),
//! [`MemoryConfig`](crate::layer::MemoryConfig), `RedisConfig`, ...) are
//! `#[non_exhaustive]`, so that a new setting is not a breaking change:
//! outside this crate they cannot be written as struct literals, only
//! built from their `Default` (or a constructor such as `RedisConfig::new`)
//! and then changed. Their fields stay public, to read and to assign; the
//! `with_*` methods written here let a configuration be built in one
//! expression, as `Scope::with_param` and `Layers::with` do:
//!
//! ```
//! # use std::time::Duration;
//! # use axum_channels::Settings;
//! let settings = Settings::default()
//!     .with_max_connections(Some(500))
//!     .with_shutdown_timeout(Duration::from_secs(30));
//! # assert_eq!(settings.max_connections, Some(500));
//! ```
//!
//! One macro writes them all, so that every setter has the same shape and
//! the same documentation. A field whose setter converts its argument (a
//! `String` taken as `impl Into<String>`, a list of patterns added one at a
//! time) has a hand-written method beside its struct instead.

/// `setters!(Config { with_field(field: Type), ... })` writes
/// `Config::with_field`, which sets `field` and returns the config.
macro_rules! setters {
    ($config:ty { $($setter:ident($field:ident: $value:ty)),* $(,)? }) => {
        impl $config {
            $(
                #[doc = concat!(
                    "Sets [`", stringify!($field), "`](Self::", stringify!($field),
                    ") and returns the configuration."
                )]
                #[must_use]
                pub fn $setter(mut self, $field: $value) -> Self {
                    self.$field = $field;
                    self
                }
            )*
        }
    };
}
