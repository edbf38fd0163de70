//! [`spawn_supervised`]: every task the Redis layers start runs under it,
//! so a panic in one (a bug) is logged loudly and the task started again,
//! with backoff, rather than silently ending what it did: a popper's
//! deliveries, a link's reconnections.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use tokio::time::Instant;

use super::link::{BACKOFF_MAX, BACKOFF_MIN};

/// Spawns `task(0)`, and if it panics, logs an error naming `name` and the
/// panic, waits (50 ms doubling to 1 s, reset once a run lasted longer than
/// that), and runs `task(restarts)` again. A task that returns is done.
///
/// The task gets how many times it was restarted, so it can set right what
/// a panic may have left half-done (the link supervisor reconnects).
/// Catching the unwind is sound here: the layers' state sits behind mutexes
/// whose every update leaves it consistent, and which carry on after a
/// panic (`Locked`, in `layer/buffers.rs`).
pub(crate) fn spawn_supervised<F, Fut>(name: String, mut task: F)
where
    F: FnMut(u32) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut delay = BACKOFF_MIN;
        let mut restarts = 0u32;
        loop {
            let started = Instant::now();
            // The call is inside the catch too: a closure may panic before
            // its future exists.
            let run = AssertUnwindSafe(async { task(restarts).await });
            let Err(panic) = run.catch_unwind().await else {
                return;
            };
            metrics::counter!("axum_channels_layer_task_panics_total").increment(1);
            tracing::error!(
                task = name,
                "channel layer task {name} panicked: {}; restarting it",
                panic_message(&*panic)
            );
            if started.elapsed() > BACKOFF_MAX {
                delay = BACKOFF_MIN;
            }
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2).min(BACKOFF_MAX);
            restarts = restarts.saturating_add(1);
        }
    });
}

/// The text of a panic: what `panic!` was given, when it was a string.
pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> &str {
    if let Some(text) = panic.downcast_ref::<&'static str>() {
        text
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text
    } else {
        "(a panic without a message)"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_is_restarted_until_it_returns() {
        let runs = Arc::new(AtomicU32::new(0));
        let (done, finished) = tokio::sync::oneshot::channel();
        let mut done = Some(done);
        let counter = Arc::clone(&runs);
        spawn_supervised("test".into(), move |restarts| {
            let run = counter.fetch_add(1, Ordering::SeqCst);
            assert_eq!(run, restarts);
            let done = if run == 2 { done.take() } else { None };
            async move {
                match done {
                    Some(done) => {
                        let _ = done.send(());
                    }
                    None => panic!("failure {run}"),
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .expect("restarted twice")
            .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }
}
