//! [`Logs`]: what `tracing` writes during a test, captured to count lines.
//!
//! Many of the library's promises are about its log: one warning per
//! outage, not one per call; one line per episode of a full channel. A test
//! checks them by capturing the lines its code writes and counting them.

use std::io::Write;
use std::sync::{Arc, Mutex};

use tracing::Level;
use tracing::subscriber::DefaultGuard;

/// The lines `tracing` wrote on this thread since [`Logs::capture`].
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Captures this thread's log lines at `level` and above, until the
    /// guard drops. On a single-threaded test runtime (`#[tokio::test]`'s
    /// default), the tasks the code under test spawns log here too.
    pub fn capture(level: Level) -> (Logs, DefaultGuard) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(level)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    /// Every line captured so far.
    pub fn lines(&self) -> Vec<String> {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// How many lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines()
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// How many lines of `level` (`"WARN"`, `"INFO"`, ...) contain `needle`.
    pub fn count_at(&self, level: &str, needle: &str) -> usize {
        let level = format!(" {level} ");
        self.lines()
            .iter()
            .filter(|line| line.contains(&level) && line.contains(needle))
            .count()
    }
}
