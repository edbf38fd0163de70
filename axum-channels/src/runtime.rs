//! [`Runtime`]: what every connection of one process shares, passed to the
//! routes explicitly.
//!
//! A server process has one connection limit, one shutdown and one set of
//! tasks to wait for, whatever its routes look like. They live here, in one
//! value that [`Runtime::serve`] hands to every request of the app (as an
//! axum [`Extension`]), in the way tokio's mini-redis hands
//! its `Shutdown` to every connection handler:
//!
//! - the WebSocket limit is a [`Semaphore`]: a connection holds a permit from
//!   its handshake to its end, so no two handshakes can both take the last
//!   place, and a place is given back even if the connection's task is
//!   dropped;
//! - the shutdown is a [`CancellationToken`] that every connection watches;
//! - the connections, and whatever the app runs beside them
//!   ([`spawn_background`](Runtime::spawn_background)), are counted by a
//!   [`TaskTracker`], so a shutdown knows what to wait for.
//!
//! Routes keep only per-connection options ([`ConnectionSettings`]); they
//! find the runtime in the request. A route served without one (plain
//! `axum::serve`) refuses its handshakes with one clear log line instead of
//! running without a limit or a shutdown.
//!
//! [`ConnectionSettings`]: crate::settings::ConnectionSettings

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::{Extension, Router};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::settings::{ConnectionSettings, Settings};
use tokio_util::task::task_tracker::TaskTrackerToken;

/// The connection limit, the shutdown and the tasks of one server process.
/// Cheap to clone: clones share all three.
#[derive(Debug, Clone)]
pub struct Runtime {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    settings: Settings,
    /// The connection settings of routes that have none of their own.
    connection: Arc<ConnectionSettings>,
    /// One permit per open WebSocket; `None` without a limit.
    websockets: Option<Arc<Semaphore>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// When a shutdown that has begun must be over.
    deadline: Mutex<Option<Instant>>,
    open: AtomicUsize,
    /// The most connections open at once since memory was last released.
    peak: AtomicUsize,
    /// Closes and finished clean-ups so far: a release waits until this
    /// stops moving (see [`ConnectionPermit`]'s drop).
    activity: AtomicUsize,
    /// A release is waiting for the server to settle.
    release_pending: AtomicBool,
    /// Releases done, for tests.
    releases: AtomicUsize,
}

impl Default for Runtime {
    /// A runtime with the default [`Settings`].
    fn default() -> Self {
        Runtime::build(Settings::default())
    }
}

impl Runtime {
    /// A runtime for `settings`, after checking them.
    ///
    /// # Errors
    ///
    /// A setting out of its range, named (see [`Settings::validate`]).
    pub fn new(settings: Settings) -> Result<Runtime, String> {
        settings.validate()?;
        Ok(Runtime::build(settings))
    }

    /// A runtime with the settings read from the environment (see
    /// [`Settings::from_env`]).
    ///
    /// # Errors
    ///
    /// A bad variable, named.
    pub fn from_env() -> Result<Runtime, String> {
        Runtime::new(Settings::from_env()?)
    }

    fn build(settings: Settings) -> Runtime {
        let websockets = settings
            .max_connections
            .map(|max| Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))));
        Runtime {
            shared: Arc::new(Shared {
                connection: Arc::new(settings.connection.clone()),
                settings,
                websockets,
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
                deadline: Mutex::new(None),
                open: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
                activity: AtomicUsize::new(0),
                release_pending: AtomicBool::new(false),
                releases: AtomicUsize::new(0),
            }),
        }
    }

    /// The settings this runtime was built with.
    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    /// Gives `app`'s routes this runtime. [`serve`](Runtime::serve) does it;
    /// call it yourself only to serve the app some other way.
    pub fn attach(&self, app: Router) -> Router {
        app.layer(Extension(self.clone()))
    }

    /// Serves `app` on `listener` until Ctrl+C or SIGTERM, then shuts down
    /// gracefully: see [`serve`](crate::serve).
    ///
    /// # Errors
    ///
    /// The error that stopped the server.
    pub async fn serve(self, listener: TcpListener, app: Router) -> io::Result<()> {
        crate::server::serve_with(self, listener, app, crate::server::shutdown_signal()).await
    }

    /// Asks every connection to close (code 1001, "server shutting down"),
    /// refuses new ones with 503, and waits until they have all run
    /// `disconnect` and left their groups, and the background tasks have
    /// ended. Waits at most until [`Settings::shutdown_timeout`] after the
    /// shutdown began. Returns how many tasks were still running when it
    /// gave up.
    pub async fn shut_down(&self) -> usize {
        let deadline = self.start_shutting_down();
        let tasks = &self.shared.tasks;
        tasks.close();
        let open = self.open_connections();
        if open > 0 {
            tracing::info!(open, "closing the open connections");
        }
        if tokio::time::timeout_at(deadline, tasks.wait())
            .await
            .is_err()
        {
            let left = tasks.len();
            tracing::warn!(left, "tasks still running after the shutdown timeout");
            return left;
        }
        0
    }

    /// Starts the shutdown (once) and returns when it must be over.
    pub(crate) fn start_shutting_down(&self) -> Instant {
        let mut deadline = self
            .shared
            .deadline
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let deadline = *deadline
            .get_or_insert_with(|| after(Instant::now(), self.settings().shutdown_timeout));
        self.shared.shutdown.cancel();
        deadline
    }

    /// Runs `task` beside the server, and makes a graceful shutdown wait for
    /// it, as it waits for the connections: e.g. a pool of workers in the
    /// server's process that should finish the jobs it runs rather than be
    /// cut off. The task should end once
    /// [`shutting_down`](Runtime::shutting_down) resolves.
    pub fn spawn_background(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.spawn_cleanup(task);
    }

    /// Spawns `task` on the current tokio runtime, as `tokio::spawn` does,
    /// and makes a graceful shutdown wait for it: e.g. each job an
    /// in-process worker runs (`.parallelize(move |job| runtime.spawn(job))`
    /// with apalis), so that a job in hand is finished, not cut off, when
    /// the server stops.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, as `tokio::spawn` does.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.shared.tasks.spawn(task)
    }

    /// Resolves when a graceful shutdown begins.
    pub fn shutting_down(&self) -> impl Future<Output = ()> + Send + use<> {
        self.shared.shutdown.clone().cancelled_owned()
    }

    /// Whether a shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutdown.is_cancelled()
    }

    /// How many WebSocket connections are open right now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }

    pub(crate) fn connection_settings(&self) -> Arc<ConnectionSettings> {
        self.shared.connection.clone()
    }

    /// Makes a shutdown wait for as long as the token lives.
    pub(crate) fn task_token(&self) -> TaskTrackerToken {
        self.shared.tasks.token()
    }

    pub(crate) fn shutting_down_token(&self) -> &CancellationToken {
        &self.shared.shutdown
    }

    /// Spawns a task that a shutdown waits for. Works from a `Drop` too, as
    /// long as a tokio runtime is current; without one the task is dropped.
    pub(crate) fn spawn_cleanup(&self, task: impl Future<Output = ()> + Send + 'static) {
        let shared = Arc::clone(&self.shared);
        let task = self.shared.tasks.track_future(async move {
            task.await;
            // What the clean-up freed is worth waiting for before a release.
            shared.activity.fetch_add(1, Ordering::Relaxed);
        });
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(task);
            }
            Err(_) => tracing::debug!("no tokio runtime: a cleanup task was dropped"),
        }
    }

    /// Takes a place among the open WebSockets, or `None` at the limit.
    pub(crate) fn admit(&self) -> Option<ConnectionPermit> {
        let place = match &self.shared.websockets {
            Some(semaphore) => Some(semaphore.clone().try_acquire_owned().ok()?),
            None => None,
        };
        let open = self.shared.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.shared.peak.fetch_max(open, Ordering::Relaxed);
        metrics::gauge!("axum_channels_connections_open").increment(1.0);
        Some(ConnectionPermit {
            runtime: self.clone(),
            _place: place,
        })
    }
}

/// A place among [`Settings::max_connections`], given back when dropped.
#[derive(Debug)]
pub(crate) struct ConnectionPermit {
    runtime: Runtime,
    _place: Option<OwnedSemaphorePermit>,
}

/// Below this many connections at the peak, there is too little memory at
/// stake to be worth a `malloc_trim`.
const RELEASE_FROM_PEAK: usize = 256;

/// A release waits until nothing has closed or finished cleaning up for
/// this long...
const SETTLED: Duration = Duration::from_secs(1);
/// ...but no longer than this, on a server whose connections never stop
/// coming and going.
const SETTLE_AT_MOST: Duration = Duration::from_secs(10);

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let shared = &self.runtime.shared;
        let open = shared.open.fetch_sub(1, Ordering::Relaxed) - 1;
        shared.activity.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("axum_channels_connections_open").decrement(1.0);
        let peak = shared.peak.load(Ordering::Relaxed);
        if shared.settings.release_memory
            && peak >= RELEASE_FROM_PEAK
            && open <= peak / 2
            // Only the connection that wins this swap releases.
            && shared
                .peak
                .compare_exchange(peak, open, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.runtime.release_when_settled();
        }
    }
}

impl Runtime {
    /// Hands freed memory back once the wave of closes that asked for it
    /// has settled: no close and no finished clean-up for [`SETTLED`].
    ///
    /// Releasing at once, when the open connections fall to half their
    /// peak, returned too little: the other half were still closing, and
    /// every closed connection's channel is left on the layer by a
    /// clean-up task after it (network calls to Redis), whose memory came
    /// free only after the release. 10,000 `/ws/analytics` connections of
    /// step 05 on Redis, closed at once, left 13% of their memory behind
    /// with the release at once, and a `malloc_trim` by hand once all was
    /// done still gave back a third of that; with the release once settled
    /// (and the queue layer's maps shrinking, which came with it) 8%.
    /// One release at a time: a wave asks many times, and gets one.
    fn release_when_settled(&self) {
        let shared = &self.shared;
        if shared.release_pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            shared.release_pending.store(false, Ordering::Release);
            return;
        };
        let shared = Arc::clone(shared);
        handle.spawn(async move {
            let give_up = Instant::now() + SETTLE_AT_MOST;
            loop {
                let seen = shared.activity.load(Ordering::Relaxed);
                tokio::time::sleep(SETTLED).await;
                if shared.activity.load(Ordering::Relaxed) == seen || Instant::now() >= give_up {
                    break;
                }
            }
            shared.release_pending.store(false, Ordering::Release);
            shared.releases.fetch_add(1, Ordering::Relaxed);
            release_memory();
        });
    }
}

/// `now + duration`, or a time too far away to matter when that does not
/// fit in an `Instant`: a configured hour-long timeout and a `Duration::MAX`
/// both mean "not soon", and neither may panic.
pub(crate) fn after(now: Instant, duration: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
    now.checked_add(duration.min(FAR))
        .unwrap_or_else(|| now + Duration::from_secs(24 * 60 * 60))
}

/// Asks the allocator to give its free pages back to the operating system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_memory() {
    // It walks every arena, which takes milliseconds with a large heap: not
    // something to do on a thread that serves connections.
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn_blocking(|| {
            // SAFETY: malloc_trim has no preconditions; it only returns
            // whole free pages of glibc's own heaps to the kernel.
            unsafe { libc::malloc_trim(0) };
        });
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_memory() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_shutdown_waits_for_background_work() {
        let runtime = Runtime::new(Settings {
            shutdown_timeout: Duration::from_secs(5),
            ..Settings::default()
        })
        .unwrap();
        let (finished, done) = tokio::sync::oneshot::channel();
        let shutdown = runtime.shutting_down();
        runtime.spawn_background(async move {
            shutdown.await;
            // The work in hand takes a while longer to finish.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = finished.send(());
        });
        assert_eq!(runtime.shut_down().await, 0, "nothing left running");
        assert!(
            done.await.is_ok(),
            "the task finished before shut_down returned"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_gives_up_at_its_deadline() {
        let runtime = Runtime::new(Settings {
            shutdown_timeout: Duration::from_secs(3),
            ..Settings::default()
        })
        .unwrap();
        runtime.spawn_background(std::future::pending());
        let started = Instant::now();
        assert_eq!(runtime.shut_down().await, 1, "the stuck task is left");
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[test]
    fn the_connection_limit_gives_places_back() {
        let runtime = Runtime::new(Settings {
            max_connections: Some(2),
            ..Settings::default()
        })
        .unwrap();
        let first = runtime.admit().expect("room for one");
        let _second = runtime.admit().expect("room for two");
        assert!(runtime.admit().is_none(), "the third is refused");
        assert_eq!(runtime.open_connections(), 2);
        drop(first);
        assert!(runtime.admit().is_some(), "a place came free");
    }

    /// A wave of closes gets one release, once it has settled: not while
    /// connections are still closing (their clean-ups free more).
    #[tokio::test(start_paused = true)]
    async fn memory_is_released_once_when_a_wave_of_closes_has_settled() {
        let runtime = Runtime::default();
        let releases = || runtime.shared.releases.load(Ordering::Relaxed);
        let mut permits: Vec<_> = (0..300).map(|_| runtime.admit().unwrap()).collect();
        permits.truncate(150); // half the peak: a release is asked for
        tokio::time::sleep(Duration::from_millis(500)).await;
        permits.truncate(10); // still closing, and asking again
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert_eq!(releases(), 0, "the last close was 0.5 s ago");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(releases(), 1, "settled for 1 s: one release for the wave");
        permits.clear();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(releases(), 1, "the peak is now 10: nothing worth releasing");
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_never_settles_still_releases() {
        let runtime = Runtime::default();
        let releases = || runtime.shared.releases.load(Ordering::Relaxed);
        let mut permits: Vec<_> = (0..1_000).map(|_| runtime.admit().unwrap()).collect();
        permits.truncate(500);
        for _ in 0..100 {
            // A connection comes and goes every 200 ms.
            drop(runtime.admit());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(releases(), 1, "after at most {SETTLE_AT_MOST:?}");
    }

    #[test]
    fn times_too_far_away_do_not_panic() {
        let now = Instant::now();
        assert!(after(now, Duration::MAX) > now);
        assert_eq!(
            after(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }
}
