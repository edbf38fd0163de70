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
//! Why not redis-rs' `ConnectionManager`: it reconnects too, but a command
//! issued while it reconnects waits for the reconnection and its retries,
//! and it has no hook to run after a reconnection. Failing fast and owning
//! the hook keeps both promises of the layers simple: a bounded time for
//! every call, and subscriptions and memberships restored after a restart.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind,
    RedisError,
};
use tokio::sync::Notify;

use super::wire::{Version, check_server_version};
use crate::layer::{BackendError, LayerError};

/// First and longest wait between reconnection attempts.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(50);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

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
    client: Client,
    resp3: bool,
    response_timeout: Duration,
    push: Option<PushHandler>,
    state: Mutex<LinkState>,
    /// Wakes the supervisor when the connection is lost or the link closed.
    lost: Notify,
    next_id: AtomicU64,
}

#[derive(Default)]
struct LinkState {
    /// The live connection and its id, or `None` while reconnecting.
    conn: Option<(u64, MultiplexedConnection)>,
    closed: bool,
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
            client,
            resp3,
            response_timeout: (command_timeout / 2).max(Duration::from_millis(100)),
            push,
            state: Mutex::default(),
            lost: Notify::new(),
            next_id: AtomicU64::new(1),
        });
        let (id, conn) = link.open().await.map_err(unreachable)?;
        link.lock().conn = Some((id, conn));
        Ok(link)
    }

    /// `host:port` of this link.
    pub(crate) fn host(&self) -> &str {
        &self.host
    }

    /// The client, for the layers' own dedicated connections.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
            // Called by the connection's reader, in order with the replies:
            // a message published before a reply is handled before it.
            config = config.set_push_sender(move |info: PushInfo| -> Result<(), ()> {
                if info.kind == PushKind::Disconnection {
                    if let Some(link) = link.upgrade() {
                        link.lost(id, "the connection closed");
                    }
                } else if let Some(push) = &push {
                    push(info);
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

    /// The live connection, or a `Backend` error at once while there is
    /// none.
    fn current(&self) -> Result<(u64, MultiplexedConnection), LayerError> {
        let state = self.lock();
        match &state.conn {
            Some((id, conn)) => Ok((*id, conn.clone())),
            None if state.closed => Err(BackendError::new("the layer was dropped").into()),
            None => Err(BackendError::new(format!(
                "Redis at {} is unreachable (reconnecting)",
                self.host
            ))
            .into()),
        }
    }

    /// True while the link has a connection.
    pub(crate) fn is_up(&self) -> bool {
        self.lock().conn.is_some()
    }

    /// Runs `commands` on the live connection. A connection error marks the
    /// connection lost (the supervisor reconnects); every error comes back
    /// as `Backend`, naming the host.
    pub(crate) async fn run<T, F, Fut>(&self, commands: F) -> Result<T, LayerError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let (id, conn) = self.current()?;
        commands(conn).await.map_err(|err| {
            if is_connection_error(&err) {
                self.lost(id, &err.to_string());
            }
            BackendError::with_source(format!("Redis at {}", self.host), err).into()
        })
    }

    /// Reports that connection `id` is gone (a no-op if it was already
    /// replaced): logs once, and wakes the supervisor.
    pub(crate) fn lost(&self, id: u64, why: &str) {
        let mut state = self.lock();
        if state
            .conn
            .as_ref()
            .is_some_and(|(current, _)| *current == id)
        {
            state.conn = None;
            drop(state);
            tracing::warn!(
                host = self.host,
                why,
                "lost the connection to Redis; reconnecting"
            );
            self.lost.notify_one();
        }
    }

    /// Reports a failure seen on another connection to the same host (a
    /// popper's): if the command connection is still thought up, check it.
    pub(crate) fn suspect(self: &Arc<Self>) {
        let Ok((id, mut conn)) = self.current() else {
            return;
        };
        let link = Arc::clone(self);
        tokio::spawn(async move {
            let pong: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
            if let Err(err) = pong {
                link.lost(id, &err.to_string());
            }
        });
    }

    /// Stops the supervisor and drops the connection.
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.conn = None;
        drop(state);
        self.lost.notify_one();
    }

    /// Starts the task that reconnects after a loss and then runs
    /// `on_connect`. It ends when the link is closed.
    pub(crate) fn supervise(self: &Arc<Self>, on_connect: OnConnect) {
        let link = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                link.lost.notified().await;
                if link.lock().closed {
                    return;
                }
                let mut delay = BACKOFF_MIN;
                let mut attempts = 0u32;
                loop {
                    if link.lock().closed {
                        return;
                    }
                    attempts += 1;
                    match link.open().await {
                        Ok((id, conn)) => {
                            // Installed before the hook, so calls made from
                            // now on use the new connection; the hook then
                            // restores what was made before.
                            {
                                let mut state = link.lock();
                                if state.closed {
                                    return;
                                }
                                state.conn = Some((id, conn.clone()));
                            }
                            tracing::info!(host = link.host, attempts, "reconnected to Redis");
                            metrics::counter!("axum_channels_redis_reconnects_total").increment(1);
                            if let Err(err) = on_connect(conn).await {
                                tracing::warn!(
                                    host = link.host,
                                    %err,
                                    "could not restore state after reconnecting"
                                );
                                link.lost(id, &err.to_string());
                            }
                            break;
                        }
                        Err(_) => {
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(BACKOFF_MAX);
                        }
                    }
                }
            }
        });
    }
}

/// Whether `err` means the connection itself is gone or stuck (as opposed
/// to an error reply from Redis).
pub(crate) fn is_connection_error(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || err.is_unrecoverable_error()
}
