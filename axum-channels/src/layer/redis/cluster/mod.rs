//! What the Redis layers need to run on a Redis Cluster (`connect_cluster`):
//! the cluster client, built from the same [`RedisConfig`] whose `hosts`
//! are then seed nodes rather than shards, and the hash slot of a name.
//!
//! On a cluster the single-host machinery (`link.rs`, `host.rs`) is not
//! used: redis-rs's cluster connection already keeps one connection per
//! node, follows `MOVED`/`ASK`, refreshes its slot map and reconnects, so a
//! second supervisor on top would fight it. What redis-rs does not do,
//! following a sharded subscription to a slot's new owner, is done in
//! `subscriber.rs`. The busiest calls take a shorter way when they can,
//! straight to the slot's owner ([`routed`], `direct.rs`), and fall back
//! to the cluster connection whenever that way fails.
//!
//! One thing redis-rs 1.8 gets wrong is mended here, by [`Renewing`]: after
//! a master dies, its connection refreshes the slot map only while the
//! refreshes fail, which is while every node still names the dead master
//! as the owner; from then on it only tries to reconnect to the dead node,
//! and calls to its slots go nowhere for good. It has no public way to
//! force a refresh, and no periodic topology check. So when calls to one
//! slot keep failing towards a node for longer than [`STALE`], the layer
//! opens a new cluster connection, which reads the slot map afresh from the
//! live nodes.

mod direct;
mod outage;
mod queue;
mod subscriber;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use redis::aio::{AsyncPushSender, ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, ErrorKind, Pipeline, ProtocolVersion, RedisError, RedisFuture, ServerErrorKind, Value,
};

pub(crate) use direct::Direct;
pub(crate) use outage::Outage;
pub use queue::RedisClusterLayer;
pub(crate) use subscriber::ClusterSubscriber;

use super::config::RedisConfig;
use super::link::{BACKOFF_MIN, doubled, doubled_up_to};
use super::wire::{Version, check_server_version};
use crate::layer::episode::Episode;
use crate::layer::{BackendError, LayerError, Locked};

/// How many times redis-rs retries one command (a `MOVED` or `ASK` it
/// follows, a node that refuses with `TRYAGAIN`/`CLUSTERDOWN`, a lost
/// connection) before the call fails.
const RETRIES: u32 = 6;

/// The least and most redis-rs waits between two of those tries, in
/// milliseconds: short, so that a refusal reaches the layer within half a
/// second. The layer's own [`retrying`] then backs off from 50 ms to 1 s
/// until `command_timeout`, so a short `command_timeout` fails with the
/// cluster's reason (`CLUSTERDOWN`), not with "did not answer", and a long
/// one carries a call through a failover.
const RETRY_WAIT_MIN_MS: u64 = 10;
const RETRY_WAIT_MAX_MS: u64 = 100;

/// A cluster client for `config`'s seed nodes. With `pushes`, the
/// connections speak RESP3 and hand every push (sharded messages,
/// subscription confirmations, disconnections) to it.
pub(crate) fn client(
    config: &RedisConfig,
    pushes: Option<impl AsyncPushSender>,
) -> Result<ClusterClient, LayerError> {
    let mut builder = ClusterClientBuilder::new(config.hosts.iter().map(String::as_str))
        .connection_timeout(config.command_timeout)
        .response_timeout(config.command_timeout)
        .retries(RETRIES)
        .min_retry_wait(RETRY_WAIT_MIN_MS)
        .max_retry_wait(RETRY_WAIT_MAX_MS);
    if let Some(pushes) = pushes {
        builder = builder
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(pushes);
    }
    builder.build().map_err(|err| {
        LayerError::invalid_config("hosts", format!("not a usable Redis Cluster: {err}"))
    })
}

/// Connects `client` and checks that every master runs at least `needed`
/// (sharded pub/sub is Redis 7.0); the connection is then renewed as
/// [`Renewing`] says, `what` naming it in the log.
pub(crate) async fn connect(
    client: ClusterClient,
    needed: Version,
    because: &str,
    what: &'static str,
    within: Duration,
) -> Result<(Renewing, Option<Version>), LayerError> {
    let conn = client
        .get_async_connection()
        .await
        .map_err(|err| backend("cannot connect to the Redis Cluster", err))?;
    let conn = Renewing::new(client, conn, what);
    // INFO goes to every master, one answer each; on a cluster just
    // formed, a node's connection may still be coming up.
    let infos: HashMap<String, String> = retrying(within, &conn, None, |mut conn| async move {
        redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
    })
    .await
    .map_err(|err| backend("the Redis Cluster does not answer INFO", err))?;
    let mut versions = Vec::with_capacity(infos.len());
    for (node, info) in &infos {
        versions.push(
            check_server_version(info, node, needed, because)
                .map_err(|reason| LayerError::from(BackendError::new(reason)))?,
        );
    }
    // The oldest node's; unknown if one node does not say.
    let oldest = versions
        .into_iter()
        .collect::<Option<Vec<Version>>>()
        .and_then(|versions| versions.into_iter().min());
    Ok((conn, oldest))
}

/// Whether the cluster refused a command before running it: no slot
/// owner (`CLUSTERDOWN`), a slot's keys half moved (`TRYAGAIN`), a master
/// cut off from its replicas (`MASTERDOWN`), a node still loading, a node
/// that refused the connection, or a redirection redis-rs was still
/// following when its own retries ran out (`MOVED`, `ASK`: the nodes
/// disagree on a slot's owner for a moment while it moves or fails over).
/// Running such a command again cannot run it twice.
pub(crate) fn refused(err: &RedisError) -> bool {
    matches!(
        err.kind(),
        ErrorKind::Server(
            ServerErrorKind::ClusterDown
                | ServerErrorKind::TryAgain
                | ServerErrorKind::MasterDown
                | ServerErrorKind::BusyLoading
                | ServerErrorKind::Moved
                | ServerErrorKind::Ask
        ) | ErrorKind::ClusterConnectionNotFound
    ) || err.is_connection_refusal()
}

/// Runs `attempt` on `conn`'s connection until the cluster stops refusing
/// it ([`refused`]), with a backoff from 50 ms to 1 s, for as long as
/// `within` allows another try. redis-rs retries each command a few times
/// itself (`RETRIES`, within half a second); this carries a call through a
/// refusal that lasts longer, a failover's election, up to the layer's
/// `command_timeout`. Each outcome is told to `conn` for `slot` (the slot
/// the call is routed by, if it is), which opens the connection again
/// when that slot's calls keep failing ([`Renewing`]). Any other outcome
/// is returned as it is.
pub(crate) async fn retrying<T, F, Fut>(
    within: Duration,
    conn: &Renewing,
    slot: Option<u16>,
    mut attempt: F,
) -> redis::RedisResult<T>
where
    F: FnMut(ClusterConnection) -> Fut,
    Fut: Future<Output = redis::RedisResult<T>>,
{
    let deadline = Instant::now() + within;
    let mut backoff = BACKOFF_MIN;
    loop {
        let outcome = attempt(conn.conn()).await;
        conn.observe(slot, &outcome).await;
        match outcome {
            Err(err) if refused(&err) && Instant::now() + backoff < deadline => {
                tracing::debug!(%err, ?backoff, "the Redis Cluster refused a command; retrying");
                tokio::time::sleep(backoff).await;
                backoff = doubled(backoff);
            }
            outcome => return outcome,
        }
    }
}

/// Runs `attempt` on the connection to `slot`'s owner that `direct`
/// knows ([`Direct`]), and if that fails without the node's own answer
/// (a redirection, a refusal, a dropped connection), through `conn` as
/// [`retrying`] does. After a dropped connection the attempt may so run
/// twice, as redis-rs tries such a command again itself. A call that
/// timed out is not sent again: the node may be slow, not gone, and its
/// time is spent.
pub(crate) async fn routed<T, F, Fut>(
    within: Duration,
    direct: &Arc<Direct>,
    conn: &Renewing,
    slot: u16,
    mut attempt: F,
) -> redis::RedisResult<T>
where
    F: FnMut(Way) -> Fut,
    Fut: Future<Output = redis::RedisResult<T>>,
{
    match direct.to(slot) {
        Some((node, to_node)) => match attempt(Way::Node(to_node)).await {
            Ok(value) => return Ok(value),
            Err(err) if direct::answered(&err) => return Err(err),
            Err(err) if err.is_timeout() => {
                direct.failed(node, &err);
                return Err(err);
            }
            Err(err) => {
                tracing::debug!(%err, slot, "a call straight to a node failed; sending it the slower way");
                direct.failed(node, &err);
            }
        },
        None => direct.refresh_soon(),
    }
    retrying(within, conn, Some(slot), |conn| attempt(Way::Cluster(conn))).await
}

/// A connection a [`routed`] call runs on: straight to a node, or
/// redis-rs's cluster connection.
#[derive(Clone)]
pub(crate) enum Way {
    Node(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Way {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Way::Node(conn) => conn.req_packed_command(cmd),
            Way::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Way::Node(conn) => conn.req_packed_commands(pipeline, offset, count),
            Way::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Way::Node(conn) => conn.get_db(),
            Way::Cluster(conn) => conn.get_db(),
        }
    }
}

/// How long calls to one slot may keep failing towards a node (refused,
/// not found, dropped, timed out) before [`Renewing`] opens its connection
/// again; and the least time between two renewals, doubled while the calls
/// keep failing, up to [`STALE_MAX`]. Longer than a failover usually takes
/// with a short `cluster-node-timeout`, in which redis-rs finds the new
/// owner itself; short against the 5 s in which a room should talk again.
pub(crate) const STALE: Duration = Duration::from_secs(2);
const STALE_MAX: Duration = Duration::from_secs(16);

/// A layer's cluster connection, opened again from its client when calls
/// to a slot keep failing towards a node for longer than [`STALE`]: a new
/// connection reads the slot map from the live nodes, where redis-rs's own
/// connection may keep a dead master's (see the module doc). One warning
/// per episode; an episode ends when the failing slots answer again.
pub(crate) struct Renewing {
    client: ClusterClient,
    /// Which connection, in the log line: "the queue layer's", ...
    what: &'static str,
    /// Called after each renewal: the subscriber subscribes everything
    /// again on the new connection.
    renewed: Option<Box<dyn Fn() + Send + Sync>>,
    state: Locked<Renewal>,
    /// One renewal at a time; calls meanwhile use the old connection.
    renewing: tokio::sync::Mutex<()>,
}

struct Renewal {
    conn: ClusterConnection,
    failing: Failing,
    last_renewed: Option<Instant>,
    /// Between renewals within an episode.
    interval: Duration,
    episode: Episode,
    /// Renewals in the episode.
    renewals: u32,
}

impl Renewing {
    pub(crate) fn new(client: ClusterClient, conn: ClusterConnection, what: &'static str) -> Self {
        Renewing {
            client,
            what,
            renewed: None,
            state: Locked::new(Renewal {
                conn,
                failing: Failing::default(),
                last_renewed: None,
                interval: STALE,
                episode: Episode::default(),
                renewals: 0,
            }),
            renewing: tokio::sync::Mutex::new(()),
        }
    }

    /// Calls `renewed` after each renewal.
    pub(crate) fn on_renewed(mut self, renewed: impl Fn() + Send + Sync + 'static) -> Self {
        self.renewed = Some(Box::new(renewed));
        self
    }

    /// The connection now (a clone: they share redis-rs's connections).
    pub(crate) fn conn(&self) -> ClusterConnection {
        self.state.lock().conn.clone()
    }

    /// Records how a call routed by `slot` ended, and renews the
    /// connection when that slot's calls have failed towards a node for
    /// [`STALE`] (a call not routed by a slot says nothing here).
    pub(crate) async fn observe<T>(&self, slot: Option<u16>, outcome: &redis::RedisResult<T>) {
        let Some(slot) = slot else {
            return;
        };
        let now = Instant::now();
        let due = {
            let mut state = self.state.lock();
            match outcome {
                Err(err) if towards_a_node(err) => {
                    state.failing.failed(slot, now)
                        && state
                            .last_renewed
                            .is_none_or(|at| now.duration_since(at) >= state.interval)
                }
                Err(_) => false,
                Ok(_) => {
                    if state.failing.answered(slot, now) && state.episode.end().is_some() {
                        tracing::debug!(
                            connection = self.what,
                            renewals = state.renewals,
                            "the Redis Cluster answers again on the renewed connection"
                        );
                        state.renewals = 0;
                        state.interval = STALE;
                    }
                    false
                }
            }
        };
        if due {
            self.renew().await;
        }
    }

    /// Opens the connection again. A renewal already under way is enough.
    async fn renew(&self) {
        let Ok(_only) = self.renewing.try_lock() else {
            return;
        };
        {
            let mut state = self.state.lock();
            let now = Instant::now();
            if state
                .last_renewed
                .is_some_and(|at| now.duration_since(at) < state.interval)
            {
                return;
            }
            if state.last_renewed.is_some() && state.renewals > 0 {
                state.interval = doubled_up_to(state.interval, STALE_MAX);
            }
            state.last_renewed = Some(now);
        }
        let opened = self.client.get_async_connection().await;
        let mut state = self.state.lock();
        let slots = state.failing.0.len();
        match opened {
            Ok(conn) => {
                state.conn = conn;
                state.renewals += 1;
                if state.episode.start() {
                    tracing::warn!(
                        connection = self.what,
                        slots,
                        "calls to the Redis Cluster keep failing towards a node: \
                         opened the connection again to read the slot map afresh"
                    );
                } else {
                    tracing::debug!(
                        connection = self.what,
                        slots,
                        "renewed the connection again"
                    );
                }
                drop(state);
                if let Some(renewed) = &self.renewed {
                    renewed();
                }
            }
            Err(err) => {
                tracing::debug!(
                    connection = self.what,
                    %err,
                    "cannot open the cluster connection again yet; keeping the old one"
                );
            }
        }
    }
}

/// Slot → when its calls started failing towards a node, and when one last
/// did.
#[derive(Default)]
struct Failing(HashMap<u16, (Instant, Instant)>);

impl Failing {
    /// Records a call to `slot` that failed towards a node; true once that
    /// slot's calls have failed for [`STALE`].
    fn failed(&mut self, slot: u16, now: Instant) -> bool {
        self.forget_quiet(now);
        let (since, last) = self.0.entry(slot).or_insert((now, now));
        *last = now;
        now.duration_since(*since) >= STALE
    }

    /// Records a call to `slot` that was answered; true when no slot is
    /// failing any more.
    fn answered(&mut self, slot: u16, now: Instant) -> bool {
        self.forget_quiet(now);
        self.0.remove(&slot);
        self.0.is_empty()
    }

    /// A slot not called again for a while is not known to fail.
    fn forget_quiet(&mut self, now: Instant) {
        self.0
            .retain(|_, (_, last)| now.duration_since(*last) < STALE);
    }
}

/// Whether `err` says a call did not reach a node that serves it: refused,
/// no connection to it, a dropped or broken connection, no answer in time.
/// What a stale slot map gives; a server's reply (even `CLUSTERDOWN`) says
/// the node answered.
fn towards_a_node(err: &RedisError) -> bool {
    matches!(err.kind(), ErrorKind::ClusterConnectionNotFound)
        || err.is_connection_refusal()
        || err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
}

pub(crate) fn backend(what: &str, err: redis::RedisError) -> LayerError {
    BackendError::with_source(format!("{what}: {err}"), err).into()
}

/// The hash slot (0..16384) of a key or sharded channel: CRC16 (XMODEM)
/// of the name, or of its hash tag (the text between the first `{` and the
/// next `}`, when not empty), modulo 16384, as Redis computes it.
pub(crate) fn slot(name: &[u8]) -> u16 {
    let hashed = match name.iter().position(|&b| b == b'{') {
        Some(open) => match name[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &name[open + 1..open + 1 + len],
            _ => name,
        },
        None => name,
    };
    crc16(hashed) % 16384
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// How long a resubscription waits after the first push of a burst (a
/// slot move unsubscribes every channel of the slot at once), so that the
/// burst is handled as one episode.
pub(crate) const SETTLE: Duration = Duration::from_millis(50);

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(line: &str) -> RedisError {
        redis::parse_redis_value(format!("-{line}\r\n").as_bytes())
            .expect("an error reply")
            .extract_error()
            .expect_err("an error")
    }

    #[test]
    fn refusals_are_what_ran_nothing() {
        for line in [
            "CLUSTERDOWN The cluster is down",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "MASTERDOWN Link with MASTER is down",
            "LOADING Redis is loading the dataset in memory",
            "MOVED 3999 127.0.0.1:6381",
            "ASK 3999 127.0.0.1:6381",
        ] {
            assert!(refused(&server_error(line)), "{line}");
        }
        let refused_connection =
            RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(refused(&refused_connection));
        // These may have run, or will fail again: not retried here.
        for line in [
            "ERR wrong number of arguments",
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "NOSCRIPT No matching script",
        ] {
            assert!(!refused(&server_error(line)), "{line}");
        }
        let reset = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(
            !refused(&reset),
            "a reset connection may have run the command"
        );
    }

    #[test]
    fn only_a_node_s_own_answer_ends_a_direct_call() {
        assert!(direct::answered(&server_error(
            "WRONGTYPE Operation against a key"
        )));
        assert!(direct::answered(&server_error("ERR unknown command")));
        for line in [
            "MOVED 1 127.0.0.1:7001",
            "ASK 1 127.0.0.1:7001",
            "TRYAGAIN x",
        ] {
            assert!(!direct::answered(&server_error(line)), "{line}");
        }
        let reset = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(!direct::answered(&reset));
    }

    #[test]
    fn a_slot_is_stale_after_failing_for_two_seconds() {
        let mut failing = Failing::default();
        let step = Duration::from_millis(100);
        let start = Instant::now();
        let mut now = start;
        while now.duration_since(start) < STALE {
            assert!(!failing.failed(1, now), "not yet at {:?}", now - start);
            // Another slot answers meanwhile: slot 1 still fails.
            assert!(!failing.answered(2, now));
            now += step;
        }
        assert!(failing.failed(1, now), "stale after {STALE:?}");
        assert!(failing.answered(1, now), "nothing fails any more");
        // One failure after a quiet spell is a new start, not stale.
        now += STALE * 2;
        assert!(!failing.failed(1, now));
        // Nor is a failure long after the last one of a slot.
        now += STALE * 2;
        assert!(!failing.failed(1, now));
    }

    #[test]
    fn only_what_did_not_reach_a_node_counts() {
        let refused_connection =
            RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(towards_a_node(&refused_connection));
        let reset = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(towards_a_node(&reset));
        let not_found = RedisError::from((
            ErrorKind::ClusterConnectionNotFound,
            "Requested connection not found",
        ));
        assert!(towards_a_node(&not_found));
        // A node answered these.
        for line in [
            "CLUSTERDOWN The cluster is down",
            "MOVED 3999 127.0.0.1:6381",
            "WRONGTYPE Operation against a key holding the wrong kind of value",
        ] {
            assert!(!towards_a_node(&server_error(line)), "{line}");
        }
    }

    #[test]
    fn slots_are_redis_slots() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"123456789"), 12739);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_eq!(slot(b"{}x"), crc16(b"{}x") % 16384);
    }
}
