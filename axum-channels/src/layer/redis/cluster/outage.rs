//! [`Outage`]: the log of a cluster that refuses a layer's calls, one
//! warning when it starts and one line when it ends, however many calls
//! fail in between.
//!
//! A Redis Cluster refuses calls for a while in several ordinary moments:
//! `CLUSTERDOWN` while a slot has no live master (a master died and its
//! replica is not promoted yet, or both died), `TRYAGAIN` while a slot's
//! keys are half moved, `MASTERDOWN`, a node that no longer answers. Each
//! call is retried with backoff until the layer's `command_timeout`
//! (`cluster::retrying`); what is left is to say so once, not once per
//! call.
//!
//! On one Redis, an outage is one host's link going down and up. A cluster
//! has no such moment: calls to healthy slots keep succeeding while calls to
//! a refusing slot fail. So an episode starts at the first failed call and
//! ends at the first success that comes [`QUIET`] after the last failure: a
//! success on another slot in between does not end it, and the log stays at
//! two lines for a refusal that lasts.

use std::time::Duration;

use tokio::time::Instant;

use crate::layer::episode::Episode;
use crate::layer::{LayerError, Locked};

/// How long without a failed call before a success ends the episode.
pub(crate) const QUIET: Duration = Duration::from_secs(1);

/// One layer's record of the cluster refusing its calls.
pub(crate) struct Outage {
    /// Which layer, in the log lines: `"queue"` or `"pub/sub"`.
    layer: &'static str,
    /// Its prefix, which tells an app's layers apart in the log.
    prefix: String,
    state: Locked<State>,
}

#[derive(Default)]
struct State {
    episode: Episode,
    last_failure: Option<Instant>,
    failed: u64,
}

impl Outage {
    pub(crate) fn new(layer: &'static str, prefix: &str) -> Self {
        Outage {
            layer,
            prefix: prefix.to_owned(),
            state: Locked::default(),
        }
    }

    /// Records how a call to the cluster ended. A backend error (refused,
    /// unreachable, or no answer within `command_timeout`) counts; another
    /// error (a full channel, a bad name) says nothing of the cluster.
    pub(crate) fn observe<T>(&self, result: &Result<T, LayerError>) {
        let mut state = self.state.lock();
        match result {
            Err(LayerError::Backend(err)) => {
                state.failed += 1;
                state.last_failure = Some(Instant::now());
                if state.episode.start() {
                    tracing::warn!(
                        layer = self.layer,
                        prefix = self.prefix,
                        error = %err,
                        "the Redis Cluster refuses or does not answer this layer's calls; \
                         each is retried with backoff and fails after command_timeout, \
                         until the cluster serves again"
                    );
                }
            }
            Err(_) => {}
            Ok(_) => {
                let quiet = state
                    .last_failure
                    .is_none_or(|last| last.elapsed() >= QUIET);
                if quiet && let Some(lasted) = state.episode.end() {
                    tracing::info!(
                        layer = self.layer,
                        prefix = self.prefix,
                        ?lasted,
                        failed = state.failed,
                        "the Redis Cluster serves this layer's calls again"
                    );
                    state.failed = 0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::BackendError;
    use channels_testkit::Logs;
    use tracing::Level;

    fn refused() -> Result<(), LayerError> {
        Err(BackendError::new("CLUSTERDOWN The cluster is down".to_owned()).into())
    }

    #[tokio::test(start_paused = true)]
    async fn one_warning_and_one_line_per_episode() {
        let (logs, _guard) = Logs::capture(Level::INFO);
        let outage = Outage::new("queue", "asgi");
        for _ in 0..20 {
            outage.observe(&refused());
            // Another slot still answers: not the end of the episode.
            outage.observe(&Ok(()));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let full: Result<(), LayerError> = Err(LayerError::ChannelFull {
            channel: "x".to_owned(),
        });
        outage.observe(&full);
        tokio::time::sleep(QUIET).await;
        outage.observe(&Ok(()));
        outage.observe(&Ok(()));
        assert_eq!(logs.count_at("WARN", "refuses"), 1, "{:?}", logs.lines());
        assert_eq!(logs.count_at("INFO", "serves"), 1, "{:?}", logs.lines());
        assert_eq!(logs.count("failed=20"), 1, "{:?}", logs.lines());
        // A second episode is reported again.
        outage.observe(&refused());
        assert_eq!(logs.count_at("WARN", "refuses"), 2);
    }
}
