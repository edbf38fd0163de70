//! A quick run of the fan-out client against the bare broadcast server, as
//! `cargo xtask bench fanout` runs them, but small: three receivers for
//! half a second. It proves the two binaries agree on the protocol and that
//! the client's report is complete, so the bench fails here first rather
//! than after minutes of building and measuring.
//!
//! The relaying bare servers, the floor under the cluster rooms, get the
//! same run on a redis-server and on a Redis Cluster of the test's own:
//! receivers on both servers must hear every message.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the server when the test ends, passed or not.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The number after `"key":` in the client's flat JSON line.
fn number(json: &str, key: &str) -> f64 {
    let pattern = format!("\"{key}\":");
    let start = json
        .find(&pattern)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + pattern.len();
    let rest = &json[start..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].parse().unwrap()
}

/// Starts `bare-broadcast` with `args` on a free port and waits until it
/// listens; returns it and its URL.
fn bare_broadcast(args: &[&str]) -> (Killed, String) {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap()
        .port();
    let server = Command::new(env!("CARGO_BIN_EXE_bare-broadcast"))
        .args(["--port", &port.to_string()])
        .args(args)
        .spawn()
        .unwrap();
    let server = Killed(server);
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "bare-broadcast did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    (server, format!("ws://127.0.0.1:{port}/"))
}

/// Runs the fan-out client with `receivers` over `urls` (comma-separated)
/// for half a second, checks that nothing went missing, and returns its
/// report.
fn fanout_hears_everything(urls: &str, receivers: u32) -> String {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["--url", urls])
        .args(["--receivers", &receivers.to_string(), "--seconds", "0.5"])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let json = String::from_utf8(output.stdout).unwrap();
    let (sent, deliveries) = (number(&json, "sent"), number(&json, "deliveries"));
    assert!(sent > 0.0, "{json}");
    // Deliveries in flight when the run ended are heard during the drain:
    // not counted, but not missing either.
    assert!(
        deliveries > 0.0 && deliveries <= f64::from(receivers) * sent,
        "{json}"
    );
    for key in ["missing", "own_missing", "closed", "stalled"] {
        assert_eq!(number(&json, key), 0.0, "{key} in {json}");
    }
    assert!(number(&json, "p99_us") >= number(&json, "p50_us"), "{json}");
    // The drain ends when every receiver heard `#end;`, not at its deadline.
    assert!(started.elapsed() < Duration::from_secs(3), "{json}");
    json
}

#[test]
fn the_fanout_client_counts_every_delivery_of_a_bare_broadcast() {
    let (_server, url) = bare_broadcast(&[]);
    fanout_hears_everything(&url, 3);
}

/// Two relaying servers on `redis` (`one` or `cluster`), each reading
/// its own key; receivers take turns between them.
fn relayed_room_hears_everything(mode: &str, redis: &str) {
    // Hash tags `a` and `b`: slots 15495 and 3300, on two different
    // masters of a three-master cluster.
    let keys = "relay-test-{a},relay-test-{b}";
    let mut servers = Vec::new();
    let mut urls = Vec::new();
    for own in keys.split(',') {
        let args = [
            "--batch", "true", "--relay", mode, "--redis", redis, "--key", own, "--keys", keys,
        ];
        let (server, url) = bare_broadcast(&args);
        servers.push(server);
        urls.push(url);
    }
    // The sender is on the first server: the second server's receivers
    // hear only what went through Redis.
    fanout_hears_everything(&urls.join(","), 4);
}

#[tokio::test]
async fn bare_servers_relaying_through_one_redis_hear_every_message() {
    let Some(redis) = channels_testkit::RedisServer::start().await else {
        return;
    };
    relayed_room_hears_everything("one", &redis.url());
}

#[tokio::test]
async fn bare_servers_relaying_through_a_cluster_hear_every_message() {
    let Some(cluster) = channels_testkit::RedisCluster::start().await else {
        return;
    };
    relayed_room_hears_everything("cluster", &cluster.url());
}
