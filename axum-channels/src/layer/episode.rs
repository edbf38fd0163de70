//! [`Episode`]: a condition that lasts (a channel that stays full, a Redis
//! that stays away) is reported once when it starts, and maybe once when it
//! ends, rather than once per occurrence, so a log stays readable under
//! load and through an outage.

use std::time::Duration;

use tokio::time::Instant;

/// Whether a lasting condition is going on, and since when.
#[derive(Debug, Default)]
pub(crate) struct Episode {
    since: Option<Instant>,
}

impl Episode {
    /// Records an occurrence of the condition. True when it starts an
    /// episode: the caller reports it then, and only then.
    pub(crate) fn start(&mut self) -> bool {
        if self.since.is_some() {
            return false;
        }
        self.since = Some(Instant::now());
        true
    }

    /// Records that the condition is over. Returns how long it lasted if an
    /// episode was going on (the caller may report its end), else `None`.
    pub(crate) fn end(&mut self) -> Option<Duration> {
        self.since.take().map(|since| since.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_episode_starts_once_and_ends_once() {
        let mut episode = Episode::default();
        assert_eq!(episode.end(), None, "nothing to end yet");
        assert!(episode.start());
        assert!(!episode.start(), "the same episode");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(episode.end(), Some(Duration::from_millis(1500)));
        assert_eq!(episode.end(), None);
        assert!(episode.start(), "a new episode");
    }
}
