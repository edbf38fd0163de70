//! The external sender, end to end: the real server binary on a throwaway
//! redis-server, a client on each showcase endpoint, and the real
//! `external_sender` binary run beside them. Every client gets what the
//! sender sent to its group, in order, and the sender prints what the
//! original prints. Then the same with the original's sender in Python
//! (fast-channels from PyPI, `axum-channels/tests/interop/external_sender.py`)
//! in its place.
//!
//! Without `redis-server` (or `python3`) installed, those tests say so and
//! pass; with `CI=true` they fail.

use std::process::{Command, Output};
use std::time::Duration;

use axum_channels::testing::{TestClient, Transcript};
use channels_testkit::python::python;
use channels_testkit::{RedisServer, ServerProcess};
use insta::assert_snapshot;

/// Long enough for a stray frame to show up.
const QUIET: Duration = Duration::from_millis(300);

/// What the original's `external_sender.py` prints, line for line.
const ORIGINAL_OUTPUT: &str = "\
=== External Messaging with Centralized Layers ===

🎯 Running: Chat Message
✅ Chat message sent!

🎯 Running: Reliable Message
✅ Reliable message sent!

🎯 Running: Notification
✅ Notification sent!

🎯 Running: Analytics Events
✅ Sent 5 analytics events!

🎯 Running: Multi-layer Broadcast
🚀 Broadcasting to multiple layers...
✅ Multi-layer broadcast complete!

🎯 Running: Periodic Announcements
⏰ Starting periodic announcements...
✅ Sent announcement #1
✅ Sent announcement #2
✅ Sent announcement #3
✅ Periodic announcements complete!

=== All Examples Complete! ===
";

/// Runs the `external_sender` binary with `envs` to its end, off the test's
/// runtime (the clients' connections live there).
async fn run_sender(envs: Vec<(&'static str, String)>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!(
            "CARGO_BIN_EXE_step-06-presence-history-external-sender"
        ))
        .env_remove("REDIS_URL")
        .env_remove("SENDER_PAUSE_MS")
        .envs(envs)
        .output()
        .expect("run the external_sender binary")
    })
    .await
    .expect("the sender's thread")
}

/// Receives `expected`, in order, and then nothing more.
async fn expect_frames(client: &mut TestClient, expected: &[&str]) {
    for frame in expected {
        assert_eq!(client.recv_text().await, *frame);
    }
    client.expect_silence(QUIET).await;
}

/// A client on each showcase endpoint of `server`.
struct Clients {
    chat: TestClient,
    reliable: TestClient,
    notifications: TestClient,
    analytics: TestClient,
}

impl Clients {
    /// Connects them as in the original's recording: each one connects and
    /// says one thing, and hears it back through its group.
    async fn connect(server: &ServerProcess, transcript: &Transcript) -> Clients {
        let mut chat = server.connect_as("chat", "/ws/chat", transcript).await;
        assert_eq!(chat.recv_text().await, "📢 Someone joined the chat");
        let mut reliable = server
            .connect_as("reliable", "/ws/reliable", transcript)
            .await;
        assert_eq!(
            reliable.recv_text().await,
            "🔒 Reliable chat connection established!"
        );
        let mut notifications = server
            .connect_as("notifications", "/ws/notifications", transcript)
            .await;
        assert_eq!(
            notifications.recv_text().await,
            r#"{"type":"system","message":"🔔 Connected to notifications!"}"#
        );
        let mut analytics = server
            .connect_as("analytics", "/ws/analytics", transcript)
            .await;
        chat.send_text("m1").await;
        assert_eq!(chat.recv_text().await, "💬 m1");
        reliable.send_text("m1").await;
        assert_eq!(reliable.recv_text().await, "📨 m1");
        notifications.send_text(r#"{"message": "n1"}"#).await;
        assert_eq!(
            notifications.recv_text().await,
            r#"{"type":"user","message":"🔔 Notification: n1"}"#
        );
        analytics.send_text("m1").await;
        assert_eq!(analytics.recv_text().await, "📊 Analytics: m1");
        Clients {
            chat,
            reliable,
            notifications,
            analytics,
        }
    }

    /// Checks that each got what the sender sent to its group, in order,
    /// and nothing else.
    async fn expect_what_the_sender_sent(&mut self) {
        expect_frames(
            &mut self.chat,
            &[
                "🔔 System announcement: Welcome to the chat!",
                "💬 Multi-layer broadcast: Chat message",
                "⏰ Hourly chat announcement #1",
                "⏰ Hourly chat announcement #3",
            ],
        )
        .await;
        expect_frames(
            &mut self.reliable,
            &[
                "🔒 Important: System maintenance scheduled for tonight",
                "📨 Multi-layer broadcast: Reliable message",
            ],
        )
        .await;
        expect_frames(
            &mut self.notifications,
            &[
                r#"{"type":"system","message":"🚨 Alert: High CPU usage detected on server"}"#,
                r#"{"type":"broadcast","message":"🔔 Multi-layer broadcast: Notification"}"#,
                r#"{"type":"periodic","message":"🔔 System status update #2"}"#,
            ],
        )
        .await;
        expect_frames(
            &mut self.analytics,
            &[
                "📊 Event: user_login:john_doe",
                "📊 Event: page_view:/dashboard",
                "📊 Event: button_click:export_data",
                "📊 Event: session_duration:1234",
                "📊 Event: error:api_timeout",
            ],
        )
        .await;
    }
}

/// Checks that a sender's run succeeded, printed the original's output and
/// warned about nothing; adds its output to `transcript`.
fn check_output(output: &Output, transcript: &Transcript) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{}:\n{stdout}\n{stderr}",
        output.status
    );
    assert_eq!(stdout, ORIGINAL_OUTPUT, "stderr:\n{stderr}");
    assert_eq!(stderr, "", "the sender warned");
    for line in stdout.lines() {
        transcript.push(format!("| {line}"));
    }
}

#[tokio::test]
async fn every_client_gets_what_the_external_sender_sends_to_its_group() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let url = redis.url();
    let server = ServerProcess::start(
        env!("CARGO_BIN_EXE_step-06-presence-history"),
        &[("REDIS_URL", url.as_str())],
    )
    .await;
    let transcript = Transcript::default();
    let mut clients = Clients::connect(&server, &transcript).await;

    // Pauses of 20 ms instead of the original's 0.1 to 1 s.
    transcript.push("# the external sender runs, on the same Redis:");
    let output = run_sender(vec![
        ("REDIS_URL", url.clone()),
        ("SENDER_PAUSE_MS", "20".to_owned()),
    ])
    .await;
    check_output(&output, &transcript);

    transcript.push("# what each client got, in order:");
    clients.expect_what_the_sender_sent().await;
    assert_snapshot!(
        "every_client_gets_what_the_external_sender_sends_to_its_group",
        transcript
    );
}

/// The other way round from the test above: the original's sender, in
/// Python with fast-channels from PyPI, drives this server. Same layers,
/// same Redis, same frames: the layers are wire-compatible.
#[tokio::test]
async fn the_originals_python_sender_reaches_the_same_clients() {
    let Some(python) = python("the_originals_python_sender_reaches_the_same_clients").await else {
        return;
    };
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let url = redis.url();
    let server = ServerProcess::start(
        env!("CARGO_BIN_EXE_step-06-presence-history"),
        &[("REDIS_URL", url.as_str())],
    )
    .await;
    let transcript = Transcript::default();
    let mut clients = Clients::connect(&server, &transcript).await;

    let mut sender = python.script("external_sender.py");
    sender.env("REDIS_URL", &url).args(["--pause", "0.02"]);
    let output = sender.output().await.expect("run external_sender.py");
    check_output(&output, &transcript);
    clients.expect_what_the_sender_sent().await;
}

#[tokio::test]
async fn the_sender_keeps_the_originals_pauses_by_default() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    // 6 × 0.5 s between examples, 5 × 0.1 s between analytics events and
    // 3 × 1 s between announcements: 6.5 s in all.
    let started = std::time::Instant::now();
    let output = run_sender(vec![("REDIS_URL", redis.url())]).await;
    let took = started.elapsed();
    assert!(output.status.success(), "{output:?}");
    assert!(
        (Duration::from_millis(6500)..Duration::from_secs(10)).contains(&took),
        "took {took:?}"
    );
}

#[test]
fn without_redis_url_the_sender_says_what_to_do_in_one_line() {
    let output = Command::new(env!(
        "CARGO_BIN_EXE_step-06-presence-history-external-sender"
    ))
    .env_remove("REDIS_URL")
    .output()
    .expect("run the external_sender binary");
    assert!(!output.status.success());
    assert_eq!(output.stdout, b"");
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "error: REDIS_URL is not set: the sender reaches the server's clients through Redis; \
         set it to the server's (`cargo xtask step 06 --redis` prints the command)\n"
    );
}

#[test]
fn with_redis_unreachable_the_sender_says_what_to_do_in_one_line() {
    // A port where nothing listens: bound, read, and let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let output = Command::new(env!(
        "CARGO_BIN_EXE_step-06-presence-history-external-sender"
    ))
    .env("REDIS_URL", format!("redis://127.0.0.1:{port}"))
    .output()
    .expect("run the external_sender binary");
    assert!(!output.status.success());
    assert_eq!(output.stdout, b"");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "error: channel layer failed: cannot connect to Redis at 127.0.0.1:{port}"
        )) && stderr.ends_with("; start Redis, or set REDIS_URL to the server's\n"),
        "{stderr}"
    );
}
