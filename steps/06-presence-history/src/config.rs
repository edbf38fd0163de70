//! Settings, read once from the environment when the server starts.
//!
//! | variable   | default     | meaning                        |
//! |------------|-------------|--------------------------------|
//! | `HOST`     | `127.0.0.1` | address to listen on           |
//! | `PORT`     | `8080`      | port to listen on (0: any free) |
//! | `RUST_LOG` | `info`      | what to log (`tracing` filter) |
//! | `REDIS_URL` | unset | the Redis that holds the job queue and carries the results, e.g. `redis://127.0.0.1:6379`; unset keeps both in this process. Several, comma-separated (`redis://10.0.0.1:6379,redis://10.0.0.2:6379`), are shards: the channel layers spread their groups and channels over them, and the job queue stays on the first. Every process lists them in the same order |
//! | `REDIS_CLUSTER_URL` | unset | a Redis Cluster for the four channel layers instead of `REDIS_URL`, e.g. `redis://10.0.0.1:7000,redis://10.0.0.2:7001`: some or all of its nodes, comma-separated; the client finds the others. Needs `REDIS_URL` too, which keeps the job queue |
//! | `JOB_DELAY_MS` | unset | how long every job pretends to work, in milliseconds; unset: the original's 1 to 4 s, by job type |
//! | `WORKER_HEARTBEAT_SECS` | `5` | how often a `worker` tells Redis it is alive; one silent for 3 heartbeats is taken for dead, and its jobs run again |
//! | `MAX_JOBS_PER_CONNECTION` | `10` | how many jobs one connection may have waiting for their results; past it, a job is refused with an error frame |
//! | `MAX_QUEUED_JOBS` | `10000` | how many jobs may wait for a worker, from every connection together; past it, a job is refused with an error frame |
//! | `JOB_RETENTION_SECS` | `60` | how long a finished job's data stays in Redis before a `worker` removes it |
//! | `GROUP_EXPIRY_SECS` | `300` | how long a membership of the `"queue"` and `"analytics"` layers lasts in Redis unless its server renews it (every half of it); a server that died is a member for at most this long |
//! | `SENDER_PAUSE_MS` | unset | how long `external_sender` pauses wherever it pauses, in milliseconds; unset: the original's 0.1 to 1 s |
//! | `HISTORY_SIZE` | `50` | how many of a room's latest messages `/ws/presence/{room}` keeps and gives a new member |
//! | `PRESENCE_HEARTBEAT_MS` | `5000` | how often a server renews its members' presence in Redis, and removes the expired entries of servers that died |
//! | `PRESENCE_TTL_MS` | `15000` | how long a member's presence lasts in Redis unless its server renews it; more than the heartbeat |
//! | `PRESENCE_FLUSH_MS` | `250` | how long joins and leaves are gathered before one `presence_diff` per room goes out |
//!
//! A bad value stops the server at start with one line that says what is
//! wrong, rather than surprising you later. The library's own production
//! settings (`ALLOWED_ORIGINS`, `MAX_CONNECTIONS`, `METRICS`, ...) are read
//! by `axum_channels::Settings`, in `main`.

use std::time::Duration;

use axum_channels::room::PresenceConfig;

/// What the server and its workers are told by the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Host name or IP address, e.g. `127.0.0.1` or `0.0.0.0`.
    pub host: String,
    /// TCP port.
    pub port: u16,
    // ANCHOR: job_settings
    /// The Redis that holds the job queue and carries the results, or `None`
    /// to keep both in this process.
    pub redis_url: Option<String>,
    /// Nodes of a Redis Cluster for the channel layers, or `None`.
    pub redis_cluster_url: Option<String>,
    /// How long every job pretends to work, or `None` for the original's
    /// delays (1 to 4 s, by job type). Tests set it to zero.
    pub job_delay: Option<Duration>,
    /// How often a worker tells Redis it is alive.
    pub worker_heartbeat: Duration,
    // ANCHOR_END: job_settings
    // ANCHOR: job_limits
    /// How many jobs one connection may have waiting for their results.
    pub max_jobs_per_connection: usize,
    /// How many jobs may wait for a worker, all connections together.
    pub max_queued_jobs: usize,
    /// How long a finished job's data stays in Redis.
    pub job_retention: Duration,
    // ANCHOR_END: job_limits
    // ANCHOR: group_expiry
    /// How long a membership of a queue layer lasts unless renewed: after
    /// a server dies, its connections stay in their groups this long.
    pub group_expiry: Duration,
    // ANCHOR_END: group_expiry
    // ANCHOR: sender_settings
    /// How long the external sender pauses wherever it pauses, or `None`
    /// for the original's pauses (0.1 to 1 s). Tests set it to a few
    /// milliseconds.
    pub sender_pause: Option<Duration>,
    // ANCHOR_END: sender_settings
    // ANCHOR: room_settings
    /// How many of a room's latest messages are kept and given to a new
    /// member.
    pub history_size: usize,
    /// How presence is renewed, how long it lasts, and how often joins and
    /// leaves are sent.
    pub presence: PresenceConfig,
    // ANCHOR_END: room_settings
}

impl Default for Config {
    /// The defaults: what an empty environment gives.
    fn default() -> Self {
        Config::from_lookup(|_| None).expect("the defaults are valid")
    }
}

impl Config {
    /// Reads every variable of the table above.
    pub fn from_env() -> Result<Config, String> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
        let host = lookup("HOST").unwrap_or_else(|| "127.0.0.1".to_owned());
        if host.trim().is_empty() {
            return Err("HOST is empty: set it to an address such as 127.0.0.1".to_owned());
        }
        let port = match lookup("PORT") {
            None => 8080,
            Some(port) => port
                .parse()
                .map_err(|_| format!("PORT must be a number from 0 to 65535, not {port:?}"))?,
        };
        // ANCHOR: redis_urls
        let redis_url = match lookup("REDIS_URL") {
            None => None,
            // One URL, or several separated by commas: each must be one.
            Some(url) if redis_hosts(&url).iter().all(|host| host.contains("://")) => Some(url),
            Some(url) => {
                return Err(format!(
                    "REDIS_URL must look like redis://127.0.0.1:6379, or list several \
                     separated by commas, not {url:?}"
                ));
            }
        };
        let redis_cluster_url = match lookup("REDIS_CLUSTER_URL") {
            None => None,
            Some(_) if redis_url.is_none() => {
                return Err(
                    "REDIS_CLUSTER_URL needs REDIS_URL too: the job queue stays on one Redis"
                        .into(),
                );
            }
            Some(url) if redis_hosts(&url).iter().all(|host| host.contains("://")) => Some(url),
            Some(url) => {
                return Err(format!(
                    "REDIS_CLUSTER_URL must list nodes of a Redis Cluster like \
                     redis://127.0.0.1:7000, separated by commas, not {url:?}"
                ));
            }
        };
        // ANCHOR_END: redis_urls
        let job_delay = match lookup("JOB_DELAY_MS") {
            None => None,
            Some(ms) => Some(Duration::from_millis(ms.parse().map_err(|_| {
                format!("JOB_DELAY_MS must be a number of milliseconds, not {ms:?}")
            })?)),
        };
        let worker_heartbeat = match lookup("WORKER_HEARTBEAT_SECS") {
            None => Duration::from_secs(5),
            Some(secs) => match secs.parse() {
                Ok(secs) if secs > 0 => Duration::from_secs(secs),
                _ => {
                    return Err(format!(
                        "WORKER_HEARTBEAT_SECS must be a whole number of seconds, 1 or more, not {secs:?}"
                    ));
                }
            },
        };
        let group_expiry = match lookup("GROUP_EXPIRY_SECS") {
            None => Duration::from_secs(300),
            Some(secs) => match secs.parse() {
                Ok(secs) if secs > 0 => Duration::from_secs(secs),
                _ => {
                    return Err(format!(
                        "GROUP_EXPIRY_SECS must be a whole number of seconds, 1 or more, not {secs:?}"
                    ));
                }
            },
        };
        let sender_pause = match lookup("SENDER_PAUSE_MS") {
            None => None,
            Some(ms) => Some(Duration::from_millis(ms.parse().map_err(|_| {
                format!("SENDER_PAUSE_MS must be a number of milliseconds, not {ms:?}")
            })?)),
        };
        let presence = PresenceConfig {
            heartbeat: milliseconds(&lookup, "PRESENCE_HEARTBEAT_MS", 5000)?,
            ttl: milliseconds(&lookup, "PRESENCE_TTL_MS", 15_000)?,
            flush: milliseconds(&lookup, "PRESENCE_FLUSH_MS", 250)?,
        };
        presence.validate().map_err(|_| {
            format!(
                "PRESENCE_TTL_MS ({} ms) must be longer than PRESENCE_HEARTBEAT_MS ({} ms)",
                presence.ttl.as_millis(),
                presence.heartbeat.as_millis()
            )
        })?;
        Ok(Config {
            host,
            port,
            redis_url,
            redis_cluster_url,
            job_delay,
            worker_heartbeat,
            max_jobs_per_connection: at_least_one(&lookup, "MAX_JOBS_PER_CONNECTION", 10)?,
            max_queued_jobs: at_least_one(&lookup, "MAX_QUEUED_JOBS", 10_000)?,
            job_retention: match lookup("JOB_RETENTION_SECS") {
                None => Duration::from_secs(60),
                Some(secs) => Duration::from_secs(secs.parse().map_err(|_| {
                    format!("JOB_RETENTION_SECS must be a whole number of seconds, not {secs:?}")
                })?),
            },
            group_expiry,
            sender_pause,
            history_size: at_least_one(&lookup, "HISTORY_SIZE", 50)?,
            presence,
        })
    }
}

// ANCHOR: redis_hosts
/// The Redis URLs of a `REDIS_URL`, in order: one per shard. An empty part
/// (`a,,b`) is no URL, and is kept so that the check above refuses it.
pub fn redis_hosts(url: &str) -> Vec<String> {
    url.split(',').map(|host| host.trim().to_owned()).collect()
}
// ANCHOR_END: redis_hosts

/// The number in variable `name`, or `default` if it is unset.
fn at_least_one(
    lookup: impl Fn(&str) -> Option<String>,
    name: &str,
    default: usize,
) -> Result<usize, String> {
    match lookup(name) {
        None => Ok(default),
        Some(value) => match value.parse() {
            Ok(number) if number > 0 => Ok(number),
            _ => Err(format!(
                "{name} must be a whole number, 1 or more, not {value:?}"
            )),
        },
    }
}

/// The duration in milliseconds in variable `name`, 1 ms to an hour, or
/// `default` if it is unset.
fn milliseconds(
    lookup: impl Fn(&str) -> Option<String>,
    name: &str,
    default: u64,
) -> Result<Duration, String> {
    match lookup(name) {
        None => Ok(Duration::from_millis(default)),
        Some(value) => match value.parse() {
            Ok(ms) if (1..=3_600_000).contains(&ms) => Ok(Duration::from_millis(ms)),
            _ => Err(format!(
                "{name} must be a number of milliseconds from 1 to 3600000, not {value:?}"
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, String> {
        Config::from_lookup(|name| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_string())
        })
    }

    #[test]
    fn defaults_to_localhost_8080() {
        let expected = Config {
            host: "127.0.0.1".into(),
            port: 8080,
            redis_url: None,
            redis_cluster_url: None,
            job_delay: None,
            worker_heartbeat: Duration::from_secs(5),
            max_jobs_per_connection: 10,
            max_queued_jobs: 10_000,
            job_retention: Duration::from_secs(60),
            group_expiry: Duration::from_secs(300),
            sender_pause: None,
            history_size: 50,
            presence: PresenceConfig::default(),
        };
        assert_eq!(config(&[]), Ok(expected));
    }

    #[test]
    fn reads_host_and_port() {
        let expected = Config {
            host: "0.0.0.0".into(),
            port: 3000,
            ..Config::default()
        };
        assert_eq!(
            config(&[("HOST", "0.0.0.0"), ("PORT", "3000")]),
            Ok(expected)
        );
    }

    #[test]
    fn reads_the_job_settings() {
        let config = config(&[
            ("REDIS_URL", "redis://127.0.0.1:6379"),
            ("JOB_DELAY_MS", "0"),
            ("WORKER_HEARTBEAT_SECS", "1"),
            ("MAX_JOBS_PER_CONNECTION", "3"),
            ("MAX_QUEUED_JOBS", "100"),
            ("JOB_RETENTION_SECS", "0"),
        ])
        .unwrap();
        assert_eq!(config.max_jobs_per_connection, 3);
        assert_eq!(config.max_queued_jobs, 100);
        assert_eq!(config.job_retention, Duration::ZERO);
        assert_eq!(config.redis_url.as_deref(), Some("redis://127.0.0.1:6379"));
        assert_eq!(config.job_delay, Some(Duration::ZERO));
        assert_eq!(config.worker_heartbeat, Duration::from_secs(1));
    }

    #[test]
    fn a_bad_port_is_one_clear_error() {
        assert_eq!(
            config(&[("PORT", "80a")]),
            Err(r#"PORT must be a number from 0 to 65535, not "80a""#.to_owned())
        );
        assert!(config(&[("PORT", "70000")]).is_err());
        assert!(config(&[("HOST", " ")]).is_err());
    }

    #[test]
    fn bad_job_settings_are_one_clear_error_each() {
        assert_eq!(
            config(&[("REDIS_URL", "localhost:6379")]),
            Err(r#"REDIS_URL must look like redis://127.0.0.1:6379, or list several separated by commas, not "localhost:6379""#.into())
        );
        assert!(config(&[("REDIS_URL", "redis://a:6379,,redis://b:6379")]).is_err());
        assert!(config(&[("REDIS_URL", "redis://a:6379,b:6379")]).is_err());
        assert!(config(&[("GROUP_EXPIRY_SECS", "0")]).is_err());
        assert!(config(&[("GROUP_EXPIRY_SECS", "1m")]).is_err());
        assert!(config(&[("JOB_DELAY_MS", "1s")]).is_err());
        assert!(config(&[("WORKER_HEARTBEAT_SECS", "0")]).is_err());
        assert_eq!(
            config(&[("MAX_QUEUED_JOBS", "0")]),
            Err(r#"MAX_QUEUED_JOBS must be a whole number, 1 or more, not "0""#.into())
        );
        assert!(config(&[("MAX_JOBS_PER_CONNECTION", "ten")]).is_err());
        assert!(config(&[("JOB_RETENTION_SECS", "-1")]).is_err());
    }

    #[test]
    fn bad_room_settings_are_one_clear_error_each() {
        assert!(config(&[("HISTORY_SIZE", "0")]).is_err());
        assert_eq!(
            config(&[("PRESENCE_FLUSH_MS", "0")]),
            Err(
                r#"PRESENCE_FLUSH_MS must be a number of milliseconds from 1 to 3600000, not "0""#
                    .into()
            )
        );
        assert_eq!(
            config(&[("PRESENCE_TTL_MS", "5000")]),
            Err(
                "PRESENCE_TTL_MS (5000 ms) must be longer than PRESENCE_HEARTBEAT_MS (5000 ms)"
                    .into()
            )
        );
        let ok = config(&[("HISTORY_SIZE", "3"), ("PRESENCE_TTL_MS", "900")]);
        assert!(ok.is_err(), "a TTL under the default heartbeat is refused");
    }

    #[test]
    fn several_redis_urls_are_shards_in_order() {
        let url = "redis://10.0.0.1:6379, redis://10.0.0.2:6379";
        let config = config(&[("REDIS_URL", url), ("GROUP_EXPIRY_SECS", "60")]).unwrap();
        assert_eq!(config.redis_url.as_deref(), Some(url));
        assert_eq!(
            redis_hosts(url),
            ["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"]
        );
        assert_eq!(redis_hosts("redis://a"), ["redis://a"]);
        assert_eq!(config.group_expiry, Duration::from_secs(60));
    }

    #[test]
    fn a_cluster_is_read_next_to_redis_url() {
        let nodes = "redis://10.0.0.1:7000,redis://10.0.0.2:7001";
        let both = config(&[
            ("REDIS_URL", "redis://10.0.0.9:6379"),
            ("REDIS_CLUSTER_URL", nodes),
        ])
        .unwrap();
        assert_eq!(both.redis_cluster_url.as_deref(), Some(nodes));
        assert!(config(&[("REDIS_CLUSTER_URL", nodes)]).is_err());
        assert!(
            config(&[
                ("REDIS_URL", "redis://10.0.0.9:6379"),
                ("REDIS_CLUSTER_URL", "10.0.0.1:7000")
            ])
            .is_err()
        );
    }

    #[test]
    fn reads_the_senders_pause() {
        let config = |ms| config(&[("SENDER_PAUSE_MS", ms)]);
        assert_eq!(
            config("20").unwrap().sender_pause,
            Some(Duration::from_millis(20))
        );
        assert_eq!(
            config("0.5"),
            Err(r#"SENDER_PAUSE_MS must be a number of milliseconds, not "0.5""#.into())
        );
    }
}
