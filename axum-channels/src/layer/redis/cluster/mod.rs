//! What the Redis layers need to run on a Redis Cluster (`connect_cluster`):
//! the cluster client, built from the same [`RedisConfig`] whose `hosts`
//! are then seed nodes rather than shards, and the hash slot of a name.
//!
//! On a cluster the single-host machinery (`link.rs`, `host.rs`) is not
//! used: redis-rs's cluster connection already keeps one connection per
//! node, follows `MOVED`/`ASK`, refreshes its slot map and reconnects, so a
//! second supervisor on top would fight it. What redis-rs does not do,
//! following a sharded subscription to a slot's new owner, is done in
//! `subscriber.rs`.

mod outage;
mod queue;
mod subscriber;

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use redis::aio::AsyncPushSender;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{ErrorKind, ProtocolVersion, RedisError, ServerErrorKind};

pub(crate) use outage::Outage;
pub use queue::RedisClusterLayer;
pub(crate) use subscriber::ClusterSubscriber;

use super::config::RedisConfig;
use super::link::{BACKOFF_MIN, doubled};
use super::wire::{Version, check_server_version};
use crate::layer::{BackendError, LayerError};

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

/// Connects `client` and checks that the node it asks runs at least
/// `needed` (sharded pub/sub is Redis 7.0).
pub(crate) async fn connect(
    client: &ClusterClient,
    needed: Version,
    because: &str,
) -> Result<ClusterConnection, LayerError> {
    let mut conn = client
        .get_async_connection()
        .await
        .map_err(|err| backend("cannot connect to the Redis Cluster", err))?;
    // INFO goes to every master: one answer per node.
    let infos: HashMap<String, String> = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .map_err(|err| backend("the Redis Cluster does not answer INFO", err))?;
    for (node, info) in &infos {
        check_server_version(info, node, needed, because)
            .map_err(|reason| LayerError::from(BackendError::new(reason)))?;
    }
    Ok(conn)
}

/// Whether the cluster refused a command before running it: no slot
/// owner (`CLUSTERDOWN`), a slot's keys half moved (`TRYAGAIN`), a master
/// cut off from its replicas (`MASTERDOWN`), a node still loading, or a
/// node that refused the connection. Running such a command again cannot
/// run it twice.
pub(crate) fn refused(err: &RedisError) -> bool {
    matches!(
        err.kind(),
        ErrorKind::Server(
            ServerErrorKind::ClusterDown
                | ServerErrorKind::TryAgain
                | ServerErrorKind::MasterDown
                | ServerErrorKind::BusyLoading
        ) | ErrorKind::ClusterConnectionNotFound
    ) || err.is_connection_refusal()
}

/// Runs `attempt` until the cluster stops refusing it ([`refused`]), with a
/// backoff from 50 ms to 1 s, for as long as `within` allows another try.
/// redis-rs retries each command a few times itself (`RETRIES`, within
/// half a second); this carries a call through a refusal that lasts
/// longer, a failover's election, up to the layer's `command_timeout`.
/// Any other outcome is returned as it is.
pub(crate) async fn retrying<T, F, Fut>(within: Duration, mut attempt: F) -> redis::RedisResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = redis::RedisResult<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut backoff = BACKOFF_MIN;
    loop {
        match attempt().await {
            Err(err) if refused(&err) && tokio::time::Instant::now() + backoff < deadline => {
                tracing::debug!(%err, ?backoff, "the Redis Cluster refused a command; retrying");
                tokio::time::sleep(backoff).await;
                backoff = doubled(backoff);
            }
            outcome => return outcome,
        }
    }
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
