//! [`Link`]: the command connection to one Redis host, kept alive by a
//! supervisor task, so that the layers never hang on a Redis that went away
//! and pick up again by themselves when it comes back.
//!
//! One multiplexed connection per host carries every command of a layer
//! (blocking pops have connections of their own, see `queue.rs`). While it
//! is up, [`Link::run`] uses it; while it is down, `run` fails at once with
//! [`LayerError::Backend`] instead of waiting, and a supervisor reconnects
//! with backoff (50 ms doubling to 1 s). A lost connection is noticed as
//! soon as it closes: on RESP3 the client library reports it with a
//! `Disconnection` push, and any command that fails with a connection error
//! reports it too. After each reconnection the layer's `on_connect` hook
//! runs (the pub/sub layer resubscribes there, the queue layer restores its
//! live group memberships).
//!
//! An outage is one [`Episode`] per link: the first failure on a healthy
//! host is one warning ("Redis at HOST is unreachable: ..."), every failure
//! after it a debug line, and the host working again one info line ("Redis
//! at HOST is back after 1.5 s"). Failures of the layers' own connections
//! (a popper's) report here too, so a host costs two lines per outage
//! however many calls, poppers and groups it has.
//!
//! A reply that does not come within the response timeout is not taken for
//! a lost connection: a slow Redis (a long `KEYS`, a fork, `CLIENT PAUSE`)
//! answers a new connection no faster, and replacing the connection drops
//! every subscription and loses what is published until they are back.
//! The call fails (the caller has a bounded time), and one `PING` probe
//! with a longer deadline decides: an answer keeps the connection, none (or
//! a connection error) declares it lost. A probe whose deadline this
//! process noticed late (its own tasks kept every thread busy, as 100,000
//! connections on two cores do) proves nothing, since the answer may be
//! waiting unread in the socket: the same `PING` is given more time, up to
//! three times. Every connection has an id, and
//! the pushes of one that was replaced are dropped, so a connection that
//! lingers (clones of it still in flight) cannot deliver a message the new
//! one delivers too.
//!
//! After each successful reconnection (state restored), a [`Reconnected`]
//! event goes to whoever listens (see `supervise_announcing`): the layers
//! hand it to applications, which may want to fetch what they missed.
//!
//! Why not redis-rs' `ConnectionManager` (1.8 read for this): it reconnects
//! by itself, replays its own subscriptions (`set_automatic_resubscription`)
//! and takes a push sender, but
//! - a command issued while it reconnects awaits the reconnection and its
//!   retries, where the layers promise to fail within their timeout;
//! - its replay is the subscriptions it saw confirmed, sent in a pipeline
//!   whose failure it ignores, not what the layer holds now (a channel
//!   closed during the outage would be subscribed again, and a failed
//!   replay goes unnoticed, with nobody subscribed);
//! - pushes reach the push sender through a channel from a second task, so
//!   they are no longer in order with the replies (the pub/sub `flush`
//!   barrier needs that), and they carry no trace of the connection they
//!   came on, so a replaced connection's cannot be told apart and dropped;
//! - there is no hook after a reconnection (the queue layer restores its
//!   memberships there), no event, and nothing that tells when a host is
//!   back, which the outage reporting needs.
//!
//! Owning the loop keeps every promise in one place, at about 400 lines.

use std::fmt::Display;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind,
    RedisError,
};
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;

use super::task::{panic_message, spawn_supervised};
use super::wire::{Version, check_server_version};
use crate::layer::buffers::Locked;
use crate::layer::episode::Episode;
use crate::layer::{BackendError, LayerError};

/// First and longest wait between reconnection attempts.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(50);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The wait after `backoff`: twice as long, up to [`BACKOFF_MAX`].
pub(crate) fn doubled(backoff: Duration) -> Duration {
    doubled_up_to(backoff, BACKOFF_MAX)
}

/// Twice `wait`, up to `max`.
pub(crate) fn doubled_up_to(wait: Duration, max: Duration) -> Duration {
    wait.saturating_mul(2).min(max)
}

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a `PING` probe after a response timeout may take before the
/// connection counts as lost: at least this, or the command timeout if
/// longer. Longer than the response timeout, since the question is no
/// longer "is it quick" but "is it there".
const PROBE_TIMEOUT_MIN: Duration = Duration::from_secs(1);

/// How many times, at most, a probe's wait is extended because its
/// deadline was seen late (see [`Link::ping`]).
const BUSY_EXTENSIONS: u32 = 3;

/// A deadline seen this much past (or more) says this process was busy: a
/// timer in tokio fires within a millisecond of its deadline otherwise.
const BUSY_LATENESS: Duration = Duration::from_millis(50);

/// How many [`Reconnected`] events a slow listener may fall behind by
/// before it sees `Lagged` (which still means "reconnected").
pub(crate) const RECONNECTED_BACKLOG: usize = 64;

/// A Redis host a layer lost came back, and the layer has restored what it
/// had there (subscriptions, group memberships). Messages published to
/// this process meanwhile were lost on the pub/sub layer; an application
/// may want to fetch what it missed (the state of a room, say).
///
/// From [`RedisPubSubLayer::reconnected`](super::RedisPubSubLayer::reconnected).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reconnected {
    /// `host:port` (never the URL, which may hold a password).
    pub host: String,
    /// From when the connection was found lost to when the layer's state
    /// was restored on the new one.
    pub down_for: Duration,
    /// How many times this host was reconnected, this one included.
    pub generation: u64,
}

/// What a layer does with the push messages (pub/sub messages) of a link.
pub(crate) type PushHandler = Arc<dyn Fn(PushInfo) + Send + Sync>;

/// Runs after every reconnection, with the new connection.
pub(crate) type OnConnect = Arc<
    dyn Fn(MultiplexedConnection) -> Pin<Box<dyn Future<Output = Result<(), RedisError>> + Send>>
        + Send
        + Sync,
>;

/// The supervised command connection to one Redis host.
pub(crate) struct Link {
    /// `host:port`, for messages (never the URL, which may hold a password).
    host: String,
    /// What the server said it was when the link was made, if it said.
    version: Option<Version>,
    client: Client,
    resp3: bool,
    response_timeout: Duration,
    push: Option<PushHandler>,
    state: Locked<LinkState>,
    /// Wakes the supervisor when the connection is lost or the link closed.
    lost: Notify,
    next_id: AtomicU64,
    /// The id of the installed connection, 0 while there is none: its
    /// reader hands pushes over, any other connection's are dropped. Read
    /// per push, so kept out of the state's lock.
    live: AtomicU64,
    /// Set while a `PING` probe runs, so a burst of timeouts costs one.
    probing: std::sync::atomic::AtomicBool,
    probe_timeout: Duration,
}

#[derive(Default)]
struct LinkState {
    /// The live connection and its id, or `None` while reconnecting.
    conn: Option<(u64, MultiplexedConnection)>,
    closed: bool,
    /// Set while `on_connect` restores state on a new connection: the
    /// host is not back for the layer until that is done.
    restoring: bool,
    /// Going on from the first failure on a healthy host until the host
    /// works again.
    outage: Episode,
    /// When the installed connection was lost, for [`Reconnected`].
    lost_at: Option<Instant>,
    /// Successful reconnections so far.
    generation: u64,
}

impl Link {
    /// Connects to `url`, refusing a server older than `needed` (with
    /// `because` saying what for). RESP3 is used where the server has it
    /// (Redis 6+); `require_resp3` refuses a server without it.
    pub(crate) async fn connect(
        url: &str,
        needed: Version,
        because: &str,
        require_resp3: bool,
        command_timeout: Duration,
        push: Option<PushHandler>,
    ) -> Result<Arc<Link>, LayerError> {
        let info = url.into_connection_info().map_err(|err| {
            LayerError::invalid_config("hosts", format!("has an invalid Redis URL {url:?}: {err}"))
        })?;
        let host = info.addr().to_string();
        let unreachable = |err: RedisError| {
            LayerError::Backend(BackendError::with_source(
                format!("cannot connect to Redis at {}", info.addr()),
                err,
            ))
        };
        let probe_client = Client::open(info.clone()).map_err(unreachable)?;
        let probe_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(command_timeout));
        let connected = tokio::time::timeout(
            command_timeout.saturating_add(CONNECT_TIMEOUT),
            probe_client.get_multiplexed_async_connection_with_config(&probe_config),
        )
        .await
        .map_err(|elapsed| {
            BackendError::with_source(
                format!("cannot connect to Redis at {host}: no answer"),
                elapsed,
            )
        })?;
        let mut probe = connected.map_err(unreachable)?;
        let server_info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut probe)
            .await
            .map_err(unreachable)?;
        let version = check_server_version(&server_info, &host, needed, because)
            .map_err(BackendError::new)?;
        let resp3 = version.is_none_or(|version| version >= Version(6, 0));
        if require_resp3 && !resp3 {
            // Only reached for a server that reports 5.x.
            return Err(BackendError::new(format!(
                "Redis at {host} is older than 6.0, but the pub/sub layer needs Redis 6.0 or newer \
                 (it receives over RESP3); upgrade Redis or use the queue layer"
            ))
            .into());
        }
        drop(probe);

        let protocol = if resp3 {
            ProtocolVersion::RESP3
        } else {
            ProtocolVersion::RESP2
        };
        let settings = info.redis_settings().clone().set_protocol(protocol);
        let client =
            Client::open(info.clone().set_redis_settings(settings)).map_err(unreachable)?;
        let link = Arc::new(Link {
            host,
            version,
            client,
            resp3,
            response_timeout: (command_timeout / 2).max(Duration::from_millis(100)),
            push,
            state: Locked::default(),
            lost: Notify::new(),
            next_id: AtomicU64::new(1),
            live: AtomicU64::new(0),
            probing: std::sync::atomic::AtomicBool::new(false),
            probe_timeout: command_timeout.max(PROBE_TIMEOUT_MIN),
        });
        let (id, conn) = link.open().await.map_err(unreachable)?;
        link.install(&mut link.state.lock(), id, conn);
        Ok(link)
    }

    /// `host:port` of this link.
    pub(crate) fn host(&self) -> &str {
        &self.host
    }

    /// The server's version when the link was made, if it said.
    pub(crate) fn version(&self) -> Option<Version> {
        self.version
    }

    /// The client, for the layers' own dedicated connections.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Opens a new connection, with a push sender that reports its loss.
    async fn open(self: &Arc<Self>) -> Result<(u64, MultiplexedConnection), RedisError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(self.response_timeout));
        if self.resp3 {
            let link: Weak<Link> = Arc::downgrade(self);
            let push = self.push.clone();
            let host = self.host.clone();
            // Called by the connection's reader, in order with the replies:
            // a message published before a reply is handled before it.
            config = config.set_push_sender(move |info: PushInfo| -> Result<(), ()> {
                let Some(live) = link.upgrade() else {
                    return Ok(());
                };
                if info.kind == PushKind::Disconnection {
                    live.lost(id, &"the connection closed");
                } else if live.live.load(Ordering::Acquire) != id {
                    // A replaced connection that lingers: the new one is
                    // subscribed to the same names and delivers this too.
                    tracing::trace!(host, "dropped a push from a replaced connection");
                } else if let Some(push) = &push {
                    // The reader is the client library's task: a panic here
                    // would end the connection, and with it every
                    // subscription. Drop the one message instead.
                    if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| push(info))) {
                        metrics::counter!("axum_channels_layer_task_panics_total").increment(1);
                        tracing::error!(
                            task = "reader",
                            host,
                            "channel layer task reader of Redis at {host} panicked: {}; \
                             dropped the message it was handing over",
                            panic_message(&*panic)
                        );
                    }
                }
                Ok(())
            });
        }
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok((id, conn))
    }

    /// Makes `conn` (id `id`) the connection calls use and whose pushes
    /// are handed over.
    fn install(&self, state: &mut LinkState, id: u64, conn: MultiplexedConnection) {
        state.conn = Some((id, conn));
        self.live.store(id, Ordering::Release);
    }

    /// The live connection, or a `Backend` error at once while there is
    /// none.
    fn current(&self) -> Result<(u64, MultiplexedConnection), LayerError> {
        let state = self.state.lock();
        match &state.conn {
            Some((id, conn)) => Ok((*id, conn.clone())),
            None if state.closed => Err(BackendError::new("the layer was dropped").into()),
            None => {
                drop(state);
                self.failed(&"no connection (reconnecting)");
                Err(BackendError::new(format!(
                    "Redis at {} is unreachable (reconnecting)",
                    self.host
                ))
                .into())
            }
        }
    }

    /// Reports a failure to reach this host (a call's, a popper's): a
    /// warning if it starts an outage, a debug line while one goes on.
    pub(crate) fn failed(&self, why: &dyn Display) {
        if self.state.lock().outage.start() {
            tracing::warn!(
                host = self.host,
                "Redis at {} is unreachable: {why}; calls fail fast until it is back",
                self.host
            );
        } else {
            tracing::debug!(host = self.host, %why, "Redis is still unreachable");
        }
    }

    /// Reports that this host answered: ends an outage (one info line),
    /// once the command connection is up again and its state restored too
    /// (a popper or a call may get through before, while subscriptions or
    /// memberships are still missing).
    pub(crate) fn worked(&self) {
        let ended = {
            let mut state = self.state.lock();
            if state.conn.is_none() || state.restoring {
                return;
            }
            state.outage.end()
        };
        if let Some(lasted) = ended {
            tracing::info!(
                host = self.host,
                "Redis at {} is back after {:.1} s",
                self.host,
                lasted.as_secs_f64()
            );
        }
    }

    /// True while the link has a connection.
    pub(crate) fn is_up(&self) -> bool {
        self.state.lock().conn.is_some()
    }

    /// Runs `commands` on the live connection. A connection error marks the
    /// connection lost (the supervisor reconnects); a response timeout has
    /// it probed (see the module doc); every error comes back as `Backend`,
    /// naming the host.
    pub(crate) async fn run<T, F, Fut>(self: &Arc<Self>, commands: F) -> Result<T, LayerError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let (id, conn) = self.current()?;
        match commands(conn.clone()).await {
            Ok(value) => {
                self.worked();
                Ok(value)
            }
            Err(err) => {
                if err.is_timeout() {
                    self.probe(id, conn, err.to_string());
                } else if is_connection_error(&err) {
                    self.lost(id, &err);
                } else {
                    // An error reply: the host is there; the caller gets
                    // the error and says what it means.
                    tracing::debug!(host = self.host, %err, "Redis answered with an error");
                }
                Err(BackendError::with_source(format!("Redis at {}", self.host), err).into())
            }
        }
    }

    /// Reports that connection `id` is gone (a no-op if it was already
    /// replaced): an outage starts, and the supervisor reconnects.
    pub(crate) fn lost(&self, id: u64, why: &dyn Display) {
        let mut state = self.state.lock();
        if state
            .conn
            .as_ref()
            .is_some_and(|(current, _)| *current == id)
        {
            state.conn = None;
            state.restoring = false;
            state.lost_at = Some(Instant::now());
            self.live.store(0, Ordering::Release);
            drop(state);
            self.failed(why);
            self.lost.notify_one();
        }
    }

    /// Declares the installed connection lost, as a failed probe would,
    /// and returns it: for tests that need it to linger (kept alive by its
    /// caller) while the supervisor replaces it.
    pub(crate) fn abandon(&self, why: &str) -> Option<MultiplexedConnection> {
        let (id, conn) = self.state.lock().conn.clone()?;
        self.lost(id, &why);
        Some(conn)
    }

    /// Reports a failure seen on another connection to the same host (a
    /// popper's): if the command connection is still thought up, check it.
    pub(crate) fn suspect(self: &Arc<Self>) {
        let Ok((id, conn)) = self.current() else {
            return;
        };
        self.probe(id, conn, "another connection to it failed".to_owned());
    }

    /// Checks connection `id` with one `PING` (one probe at a time): it is
    /// declared lost only if that fails too, or gets no answer within the
    /// probe timeout. `why` is what made it suspect.
    fn probe(self: &Arc<Self>, id: u64, conn: MultiplexedConnection, why: String) {
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let link = Arc::clone(self);
        spawn_supervised(
            format!("health check of Redis at {}", self.host),
            move |_| {
                let link = Arc::clone(&link);
                let mut conn = conn.clone();
                let why = why.clone();
                async move {
                    // The probe's own deadlines decide (see `ping`), not
                    // the clone's response timeout.
                    conn.set_response_timeout(link.probe_timeout * (2 + 2 * BUSY_EXTENSIONS));
                    let answer = link.ping(&mut conn).await;
                    link.probing.store(false, Ordering::Release);
                    match answer {
                        Some(Ok(_)) => {
                            metrics::counter!("axum_channels_redis_slow_replies_total")
                                .increment(1);
                            tracing::debug!(
                                host = link.host,
                                why,
                                "Redis was slow to answer but its connection is fine; kept"
                            );
                        }
                        Some(Err(err)) => link.lost(id, &format!("{why}, then PING failed: {err}")),
                        None => link.lost(
                            id,
                            &format!(
                                "{why}, then no answer to PING within {:?}",
                                link.probe_timeout
                            ),
                        ),
                    }
                }
            },
        );
    }

    /// One `PING`, and its answer if one comes within the probe timeout;
    /// `None` if none does.
    ///
    /// A deadline this process notices late proves nothing: its own tasks
    /// kept every thread busy (100,000 connections on two cores do), and
    /// the answer may be waiting unread in the socket, its reader task
    /// queued behind the same work. Then the same `PING` is given more
    /// time, twice what the lateness was and at least half the probe
    /// timeout, up to [`BUSY_EXTENSIONS`] times. A Redis that does not
    /// answer is still found out, later by those extensions.
    async fn ping(&self, conn: &mut MultiplexedConnection) -> Option<Result<String, RedisError>> {
        let ping = redis::cmd("PING");
        let mut answer = std::pin::pin!(ping.query_async::<String>(conn));
        let mut deadline = Instant::now() + self.probe_timeout;
        let mut extended = 0;
        loop {
            if let Ok(answer) = tokio::time::timeout_at(deadline, answer.as_mut()).await {
                return Some(answer);
            }
            let late = Instant::now().saturating_duration_since(deadline);
            if late < BUSY_LATENESS || extended == BUSY_EXTENSIONS {
                return None;
            }
            extended += 1;
            tracing::debug!(
                host = self.host,
                ?late,
                "this process was too busy to read Redis's answer in time; waiting longer"
            );
            deadline = Instant::now() + (late * 2).max(self.probe_timeout / 2);
        }
    }

    /// Stops the supervisor and drops the connection.
    pub(crate) fn close(&self) {
        let mut state = self.state.lock();
        state.closed = true;
        state.conn = None;
        self.live.store(0, Ordering::Release);
        drop(state);
        self.lost.notify_one();
    }

    /// Starts the task that reconnects after a loss and then runs
    /// `on_connect`. It ends when the link is closed. It runs supervised: if
    /// it panics (in `on_connect`, say), it is started again, and then
    /// reconnects at once, since the panic may have come between a new
    /// connection and the state `on_connect` restores on it.
    pub(crate) fn supervise(self: &Arc<Self>, on_connect: OnConnect) {
        // Nobody listens: each event is dropped as it is sent.
        self.supervise_announcing(on_connect, broadcast::channel(1).0);
    }

    /// [`supervise`](Self::supervise), and after each reconnection whose
    /// `on_connect` succeeded, sends a [`Reconnected`] to `announce` (one
    /// sender may serve every host of a layer).
    pub(crate) fn supervise_announcing(
        self: &Arc<Self>,
        on_connect: OnConnect,
        announce: broadcast::Sender<Reconnected>,
    ) {
        let link = Arc::clone(self);
        spawn_supervised(
            format!("supervisor of Redis at {}", self.host),
            move |restarts| {
                let link = Arc::clone(&link);
                let on_connect = Arc::clone(&on_connect);
                let announce = announce.clone();
                async move {
                    if restarts > 0 {
                        let current = link.state.lock().conn.as_ref().map(|(id, _)| *id);
                        if let Some(id) = current {
                            link.lost(id, &"its supervisor restarted after a panic");
                        }
                    }
                    link.keep_connected(on_connect, announce).await;
                }
            },
        );
    }

    /// The supervisor's loop: waits for a loss, reconnects with backoff,
    /// runs `on_connect`; returns once the link is closed.
    async fn keep_connected(
        self: Arc<Self>,
        on_connect: OnConnect,
        announce: broadcast::Sender<Reconnected>,
    ) {
        let mut delay = BACKOFF_MIN;
        loop {
            let (closed, up) = {
                let state = self.state.lock();
                (state.closed, state.conn.is_some())
            };
            if closed {
                return;
            }
            if up {
                // `lost` and `close` store a wake-up if nobody waits yet, so
                // one that came since the check is not missed.
                self.lost.notified().await;
                continue;
            }
            match self.open().await {
                Ok((id, conn)) => {
                    // Installed before the hook, so calls made from now on
                    // use the new connection; the hook then restores what
                    // was made before.
                    {
                        let mut state = self.state.lock();
                        if state.closed {
                            return;
                        }
                        self.install(&mut state, id, conn.clone());
                        state.restoring = true;
                    }
                    metrics::counter!("axum_channels_redis_reconnects_total").increment(1);
                    match on_connect(conn).await {
                        Ok(()) => {
                            delay = BACKOFF_MIN;
                            let event = {
                                let mut state = self.state.lock();
                                state.restoring = false;
                                state.generation += 1;
                                Reconnected {
                                    host: self.host.clone(),
                                    down_for: state
                                        .lost_at
                                        .take()
                                        .map_or(Duration::ZERO, |at| at.elapsed()),
                                    generation: state.generation,
                                }
                            };
                            self.worked();
                            // No listener is fine: an app need not care.
                            let _ = announce.send(event);
                            continue;
                        }
                        Err(err) => {
                            let why = format!("restoring state after reconnecting failed: {err}");
                            self.lost(id, &why);
                        }
                    }
                }
                Err(err) => self.failed(&err),
            }
            tokio::time::sleep(delay).await;
            delay = doubled(delay);
        }
    }
}

/// Whether `err` means the connection itself is gone (as opposed to an
/// error reply from Redis). A response timeout counts too, for callers that
/// do not probe; `Link::run` sorts timeouts out first.
pub(crate) fn is_connection_error(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || err.is_unrecoverable_error()
}
