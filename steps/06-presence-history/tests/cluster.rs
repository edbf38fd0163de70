//! Several processes of this step on one Redis, as `cargo xtask cluster`
//! runs them: real server binaries (two, "A" and "B"), real `worker`
//! binaries, throwaway redis-servers (two for sharding), nginx in front
//! when it is installed, and a real Python process on the same Redis.
//!
//! What must hold: clients on A and on B in one room hear each other's
//! joins, messages and leaves, in the same order; the showcase groups span
//! both servers; a job queued on A is answered on A whichever worker ran
//! it; when B is killed, A keeps serving (and what A's clients are told, or
//! not, is pinned down); two Redis shards still reach every member of a
//! room; nginx spreads the connections over the servers; and a Python
//! process says something in a Rust room.
//!
//! Without `redis-server` (or nginx, or `python3`) installed, the tests
//! that need it say so and pass; with `CI=true` they fail.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum_channels::testing::{TestClient, Transcript};
use channels_testkit::python::python;
use channels_testkit::{RedisServer, ReverseProxy, ServerProcess};
use insta::assert_snapshot;

/// Long enough for a stray frame to show up.
const QUIET: Duration = Duration::from_millis(300);

/// The room every test talks in, and what it is told.
const ROOM: &str = "/ws/room/lobby";
const JOINED: &str = "🚪 Someone joined room 'lobby'";
const LEFT: &str = "👋 Someone left room 'lobby'";

/// Redis servers, step servers and workers, all stopped when dropped.
struct Cluster {
    redis: Vec<RedisServer>,
    servers: Vec<ServerProcess>,
    workers: Vec<Worker>,
}

/// What to start.
struct Plan {
    shards: usize,
    servers: usize,
    workers: usize,
    /// Extra environment for every server.
    env: Vec<(&'static str, String)>,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            shards: 1,
            servers: 2,
            workers: 0,
            env: Vec::new(),
        }
    }
}

impl Cluster {
    /// Starts the plan; `None` (the test is skipped, and says so) without
    /// redis-server.
    async fn start(plan: Plan) -> Option<Cluster> {
        let mut redis = Vec::new();
        for _ in 0..plan.shards {
            redis.push(RedisServer::start().await?);
        }
        let url = redis_url(&redis);
        let mut env: Vec<(&str, String)> = vec![
            ("REDIS_URL", url),
            ("JOB_DELAY_MS", "100".to_owned()),
            ("WORKER_HEARTBEAT_SECS", "1".to_owned()),
            ("RUST_LOG", "warn,step_06_presence_history=debug".to_owned()),
        ];
        env.extend(plan.env);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut servers = Vec::new();
        for _ in 0..plan.servers {
            let binary = env!("CARGO_BIN_EXE_step-06-presence-history");
            servers.push(ServerProcess::start(binary, &env).await);
        }
        let workers = (0..plan.workers).map(|_| Worker::start(&env)).collect();
        Some(Cluster {
            redis,
            servers,
            workers,
        })
    }

    fn url(&self) -> String {
        redis_url(&self.redis)
    }
}

/// Every shard's URL, comma-separated, in order: `REDIS_URL` for all.
fn redis_url(redis: &[RedisServer]) -> String {
    let urls: Vec<String> = redis.iter().map(RedisServer::url).collect();
    urls.join(",")
}

/// A `worker` process of this step, killed when dropped. (Not a
/// `ServerProcess`: a worker listens on no port.)
struct Worker {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Worker {
    fn start(env: &[(&str, &str)]) -> Worker {
        let mut child = Command::new(env!("CARGO_BIN_EXE_step-06-presence-history-worker"))
            .envs(env.iter().copied())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the worker binary");
        let output = Arc::new(Mutex::new(String::new()));
        let streams: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("piped stdout")),
            Box::new(child.stderr.take().expect("piped stderr")),
        ];
        for mut stream in streams {
            let output = Arc::clone(&output);
            std::thread::spawn(move || {
                let mut buffer = [0; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buffer) {
                    let text = String::from_utf8_lossy(&buffer[..n]);
                    output.lock().unwrap().push_str(&text);
                }
            });
        }
        Worker { child, output }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The next text frame, failing the test on anything else.
async fn text(client: &mut TestClient) -> String {
    client.recv_text().await
}

/// Reads frames until `window` passes without one; returns how many.
async fn drain(client: &mut TestClient) -> usize {
    let mut count = 0;
    while client.try_recv(QUIET).await.is_some() {
        count += 1;
    }
    count
}

// ANCHOR: room_spans_servers
#[tokio::test]
async fn a_room_spans_two_servers() {
    let Some(cluster) = Cluster::start(Plan::default()).await else {
        return;
    };
    let [a, b] = &cluster.servers[..] else {
        unreachable!()
    };
    let transcript = Transcript::default();
    let mut alice = a.connect_as("alice@A", ROOM, &transcript).await;
    assert_eq!(text(&mut alice).await, JOINED);
    let mut bob = b.connect_as("bob@B", ROOM, &transcript).await;
    // Bob's join, said on B, reaches Alice on A through Redis.
    assert_eq!(text(&mut alice).await, JOINED);
    assert_eq!(text(&mut bob).await, JOINED);

    alice.send_text("hello from A").await;
    assert_eq!(text(&mut alice).await, "💬 hello from A");
    assert_eq!(text(&mut bob).await, "💬 hello from A");
    bob.send_text("hello from B").await;
    assert_eq!(text(&mut alice).await, "💬 hello from B");
    assert_eq!(text(&mut bob).await, "💬 hello from B");

    bob.close(1000).await;
    assert_eq!(text(&mut alice).await, LEFT);
    alice.expect_silence(QUIET).await;
    assert_snapshot!("a_room_spans_two_servers", transcript);
}
// ANCHOR_END: room_spans_servers

#[tokio::test]
async fn both_servers_hear_one_room_in_the_same_order() {
    let Some(cluster) = Cluster::start(Plan::default()).await else {
        return;
    };
    let transcript = Transcript::default();
    let mut alice = cluster.servers[0]
        .connect_as("alice", ROOM, &transcript)
        .await;
    assert_eq!(text(&mut alice).await, JOINED);
    let mut bob = cluster.servers[1]
        .connect_as("bob", ROOM, &transcript)
        .await;
    assert_eq!(text(&mut alice).await, JOINED);
    assert_eq!(text(&mut bob).await, JOINED);
    // Both talk at once: Redis puts the messages in one order, and each
    // server hands them on in that order.
    const EACH: usize = 20;
    for i in 0..EACH {
        alice.send_text(&format!("a{i}")).await;
        bob.send_text(&format!("b{i}")).await;
    }
    let mut heard = [Vec::new(), Vec::new()];
    for _ in 0..2 * EACH {
        heard[0].push(text(&mut alice).await);
        heard[1].push(text(&mut bob).await);
    }
    assert_eq!(heard[0], heard[1], "A and B heard the room in other orders");
    // And each one's own messages in the order it sent them.
    for who in ["a", "b"] {
        let own: Vec<&String> = heard[0]
            .iter()
            .filter(|line| line.starts_with(&format!("💬 {who}")))
            .collect();
        let sent: Vec<String> = (0..EACH).map(|i| format!("💬 {who}{i}")).collect();
        assert_eq!(own, sent.iter().collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn the_showcase_groups_span_two_servers() {
    let Some(cluster) = Cluster::start(Plan::default()).await else {
        return;
    };
    let [a, b] = &cluster.servers[..] else {
        unreachable!()
    };
    let transcript = Transcript::default();
    // (endpoint, what A's client sends, what everyone then hears)
    let cases = [
        ("/ws/chat", "from A", "💬 from A"),
        ("/ws/reliable", "from A", "📨 from A"),
        (
            "/ws/notifications",
            r#"{"message": "from A"}"#,
            r#"{"type":"user","message":"🔔 Notification: from A"}"#,
        ),
        ("/ws/analytics", "from A", "📊 Analytics: from A"),
    ];
    for (path, said, heard) in cases {
        let mut on_a = a.connect_as("A", path, &transcript).await;
        let mut on_b = b.connect_as("B", path, &transcript).await;
        // Greetings, and B's join where the endpoint announces one.
        drain(&mut on_a).await;
        drain(&mut on_b).await;
        on_a.send_text(said).await;
        assert_eq!(text(&mut on_a).await, heard, "{path} on A");
        assert_eq!(text(&mut on_b).await, heard, "{path} on B");
    }
}

// ANCHOR: job_answered_on_a
#[tokio::test]
async fn a_job_queued_on_a_is_answered_on_a_whichever_worker_ran_it() {
    let plan = Plan {
        workers: 2,
        ..Plan::default()
    };
    let Some(cluster) = Cluster::start(plan).await else {
        return;
    };
    let transcript = Transcript::default();
    let mut on_a = cluster.servers[0]
        .connect_as("A", "/ws/backgroundjob", &transcript)
        .await;
    let mut on_b = cluster.servers[1]
        .connect_as("B", "/ws/backgroundjob", &transcript)
        .await;
    for client in [&mut on_a, &mut on_b] {
        assert!(text(client).await.contains("\"connected\""));
    }
    const JOBS: usize = 6;
    for i in 0..JOBS {
        on_a.send_text(&format!(r#"{{"content": "job {i}"}}"#))
            .await;
    }
    // Two status frames per job, then the results, in any order.
    let mut results = Vec::new();
    while results.len() < JOBS {
        let frame: serde_json::Value = serde_json::from_str(&text(&mut on_a).await).unwrap();
        if frame["type"] == "job_result" {
            results.push(frame);
        }
    }
    let mut messages: Vec<&str> = results
        .iter()
        .map(|r| r["message"].as_str().unwrap())
        .collect();
    messages.sort_unstable();
    let expected: Vec<String> = (0..JOBS)
        .map(|i| format!("✅ Processed: JOB {i}"))
        .collect();
    assert_eq!(messages, expected);
    // B's client asked for nothing and hears nothing.
    on_b.expect_silence(QUIET).await;
    // Each job was run by exactly one of the workers.
    for result in &results {
        let id = result["job_id"].as_str().unwrap();
        let ran: Vec<usize> = (0..cluster.workers.len())
            .filter(|&w| cluster.workers[w].output().contains(id))
            .collect();
        assert_eq!(ran.len(), 1, "job {id} ran in workers {ran:?}");
    }
}
// ANCHOR_END: job_answered_on_a

/// The members of `group` of the queue layer with `prefix`, as Redis holds
/// them (the channel names of the connections in it).
async fn members(redis_url: &str, prefix: &str, group: &str) -> Vec<String> {
    let client = redis::Client::open(redis_url).expect("a Redis URL");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test's Redis");
    redis::cmd("ZRANGE")
        .arg(format!("{prefix}:group:{group}"))
        .arg(0)
        .arg(-1)
        .query_async(&mut connection)
        .await
        .expect("ZRANGE")
}

// ANCHOR: server_killed
#[tokio::test]
async fn when_server_b_is_killed_a_keeps_serving() {
    let plan = Plan {
        // Memberships of the queue layers last 2 s unless renewed.
        env: vec![("GROUP_EXPIRY_SECS", "2".to_owned())],
        ..Plan::default()
    };
    let Some(mut cluster) = Cluster::start(plan).await else {
        return;
    };
    let transcript = Transcript::default();
    let a = &cluster.servers[0];
    let mut alice = a.connect_as("alice@A", ROOM, &transcript).await;
    assert_eq!(text(&mut alice).await, JOINED);
    let mut bob = cluster.servers[1]
        .connect_as("bob@B", ROOM, &transcript)
        .await;
    assert_eq!(text(&mut alice).await, JOINED);
    assert_eq!(text(&mut bob).await, JOINED);
    let mut reliable_a = a
        .connect_as("reliable@A", "/ws/reliable", &transcript)
        .await;
    let reliable_b = cluster.servers[1]
        .connect_as("reliable@B", "/ws/reliable", &transcript)
        .await;
    drain(&mut reliable_a).await;
    bob.send_text("are you there?").await;
    assert_eq!(text(&mut alice).await, "💬 are you there?");
    let url = cluster.redis[0].url();
    assert_eq!(members(&url, "queue", "reliable_chat").await.len(), 2);

    // SIGKILL: B runs no `disconnect`, says no goodbye, leaves no group.
    cluster.servers[1].kill().await;
    drop((bob, reliable_b));
    transcript.push("# server B is killed (SIGKILL)");

    // Nobody tells Alice that Bob is gone: B was the only one who knew.
    alice.expect_silence(Duration::from_secs(1)).await;
    transcript.push("# a second of silence: nobody says that Bob left");
    // A keeps serving: the room, and newcomers.
    alice.send_text("still here").await;
    assert_eq!(text(&mut alice).await, "💬 still here");
    let a = &cluster.servers[0];
    let mut carol = a.connect_as("carol@A", ROOM, &transcript).await;
    assert_eq!(text(&mut alice).await, JOINED);
    assert_eq!(text(&mut carol).await, JOINED);

    // On the queue layer, B's membership is still in Redis, so sends to the
    // group still write to B's channel, which nobody reads. A renews its
    // own every second; B's lapses after 2 s, and the next send removes it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    reliable_a.send_text("ping").await;
    assert_eq!(text(&mut reliable_a).await, "📨 ping");
    assert_eq!(members(&url, "queue", "reliable_chat").await.len(), 1);
    transcript.push("# B's membership of reliable_chat has lapsed: one member left");
    assert_snapshot!("when_server_b_is_killed_a_keeps_serving", transcript);
}
// ANCHOR_END: server_killed

// ANCHOR: sharding
#[tokio::test]
async fn two_redis_shards_still_reach_every_member_of_a_room() {
    let plan = Plan {
        shards: 2,
        workers: 1,
        ..Plan::default()
    };
    let Some(cluster) = Cluster::start(plan).await else {
        return;
    };
    let [a, b] = &cluster.servers[..] else {
        unreachable!()
    };
    let transcript = Transcript::default();
    // Rooms are spread over the shards by name; these six land on both.
    let mut members = Vec::new();
    for room in ["north", "south", "east", "west", "up", "down"] {
        let path = format!("/ws/room/{room}");
        let mut on_a = a.connect_as("A", &path, &transcript).await;
        let mut on_b = b.connect_as("B", &path, &transcript).await;
        drain(&mut on_a).await;
        drain(&mut on_b).await;
        on_b.send_text(room).await;
        assert_eq!(text(&mut on_a).await, format!("💬 {room}"));
        assert_eq!(text(&mut on_b).await, format!("💬 {room}"));
        members.push((on_a, on_b));
    }
    // Each shard carries some of the rooms.
    for redis in &cluster.redis {
        let rooms = pubsub_channels(&redis.url(), "chat__group__room_*").await;
        assert!(!rooms.is_empty(), "no room on {}", redis.url());
    }
    // Jobs still work: the queue lives on the first shard.
    let mut jobs = b.connect_as("B", "/ws/backgroundjob", &transcript).await;
    drain(&mut jobs).await;
    jobs.send_text(r#"{"content": "sharded"}"#).await;
    let result = loop {
        let frame = text(&mut jobs).await;
        if frame.contains("job_result") {
            break frame;
        }
    };
    assert!(result.contains("✅ Processed: SHARDED"), "{result}");
}
// ANCHOR_END: sharding

/// The Redis pub/sub channels matching `pattern` that someone listens to.
async fn pubsub_channels(redis_url: &str, pattern: &str) -> Vec<String> {
    let client = redis::Client::open(redis_url).expect("a Redis URL");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test's Redis");
    redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg(pattern)
        .query_async(&mut connection)
        .await
        .expect("PUBSUB CHANNELS")
}

/// `GET path` on `addr`, the body as text.
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

/// The server's `axum_channels_connections_open`, from its `/metrics`.
fn open_connections(server: &ServerProcess) -> u64 {
    let metrics = http_get(server.addr(), "/metrics");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("axum_channels_connections_open "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}

// ANCHOR: through_the_proxy
#[tokio::test]
async fn a_room_through_nginx_spans_both_servers() {
    let plan = Plan {
        env: vec![("METRICS", "1".to_owned())],
        ..Plan::default()
    };
    let Some(cluster) = Cluster::start(plan).await else {
        return;
    };
    let servers: Vec<SocketAddr> = cluster.servers.iter().map(ServerProcess::addr).collect();
    let Some(proxy) = ReverseProxy::start(include_str!("../deploy/nginx.conf"), &servers).await
    else {
        return;
    };
    let transcript = Transcript::default();
    let mut clients = Vec::new();
    for name in ["p1", "p2", "p3", "p4"] {
        let client = TestClient::connect_url(&proxy.ws_url(ROOM), name, ROOM, &transcript)
            .await
            .expect("the proxy passes the handshake on");
        clients.push(client);
    }
    // nginx sent each new connection to the server with the fewest.
    let counts: Vec<u64> = cluster.servers.iter().map(open_connections).collect();
    assert_eq!(counts, [2, 2], "connections per server");
    for client in &mut clients {
        drain(client).await;
    }
    clients[0].send_text("through the proxy").await;
    for client in &mut clients {
        assert_eq!(text(client).await, "💬 through the proxy");
    }
}
// ANCHOR_END: through_the_proxy

/// The status of a browser's WebSocket handshake on `addr`: a GET with the
/// upgrade headers, and the `Origin` of the page at `addr`.
fn handshake_status(addr: SocketAddr, path: &str) -> u16 {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://{addr}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = [0; 64];
    let read = stream.read(&mut response).expect("an answer");
    let status_line = String::from_utf8_lossy(&response[..read]);
    status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {status_line:?}"))
}

/// The lines of `deploy/nginx.conf` that the chapter explains, each taken
/// out in turn: without `proxy_http_version 1.1` every handshake fails with
/// 426 (HTTP/1.0 has no upgrade), without the `Upgrade`/`Connection` lines
/// with 400, and without the `Host` line a page on the proxy's origin is
/// refused with 403 (when `ALLOWED_ORIGINS` does not list the proxy, as
/// here).
#[tokio::test]
async fn without_the_lines_the_chapter_explains_the_proxy_breaks_handshakes() {
    let Some(cluster) = Cluster::start(Plan::default()).await else {
        return;
    };
    let servers: Vec<SocketAddr> = cluster.servers.iter().map(ServerProcess::addr).collect();
    let config = include_str!("../deploy/nginx.conf");
    let without = |needle: &str| -> String {
        let kept: Vec<&str> = config.lines().filter(|l| !l.contains(needle)).collect();
        assert!(
            kept.len() < config.lines().count(),
            "{needle} is in nginx.conf"
        );
        kept.join("\n")
    };
    let cases = [
        ("the whole file", config.to_owned(), 101),
        ("no proxy_http_version", without("proxy_http_version"), 426),
        (
            "no Upgrade/Connection",
            without("$connection_upgrade;"),
            400,
        ),
        ("no Host", without("proxy_set_header Host"), 403),
    ];
    for (case, template, expected) in cases {
        let template = if case == "no Upgrade/Connection" {
            template.replace("proxy_set_header Upgrade $http_upgrade;", "")
        } else {
            template
        };
        let Some(proxy) = ReverseProxy::start(&template, &servers).await else {
            return;
        };
        let status = handshake_status(proxy.addr(), ROOM);
        assert_eq!(status, expected, "{case}");
    }
}

// ANCHOR: python_bridge
#[tokio::test]
async fn a_python_process_says_something_in_a_rust_room() {
    let plan = Plan {
        shards: 2,
        ..Plan::default()
    };
    let Some(cluster) = Cluster::start(plan).await else {
        return;
    };
    let Some(python) = python("a_python_process_says_something_in_a_rust_room").await else {
        return;
    };
    let transcript = Transcript::default();
    let mut alice = cluster.servers[0]
        .connect_as("alice@A", ROOM, &transcript)
        .await;
    let mut bob = cluster.servers[1]
        .connect_as("bob@B", ROOM, &transcript)
        .await;
    drain(&mut alice).await;
    drain(&mut bob).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/say_in_room.py");
    let url = cluster.url();
    let output = python
        .script_at(script.as_ref())
        .env("REDIS_URL", url)
        .args(["lobby", "hello from Python"])
        .output()
        .await
        .expect("run the Python script");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert_eq!(stdout, "✅ Said in room 'lobby': hello from Python\n");
    for client in [&mut alice, &mut bob] {
        assert_eq!(text(client).await, "🐍 hello from Python");
    }
    assert_snapshot!("a_python_process_says_something_in_a_rust_room", transcript);
}
// ANCHOR_END: python_bridge
