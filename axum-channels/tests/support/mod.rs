//! Helpers shared by integration tests that need more than the library's own
//! `testing` module: for now, the real Python peers of the interop tests.
//!
//! Cargo builds each file directly under `tests/` as its own test crate and
//! ignores subdirectories, so this module is compiled only into the tests
//! that say `mod support;`.

pub mod python;
