//! Stopping the server: the real binary, stopped with SIGTERM as `kill` or
//! a container runtime would, closes every WebSocket with 1001 and exits
//! cleanly, even when a client never answers its close frame.
#![cfg(unix)]

use std::time::Duration;

use axum_channels::testing::{Received, Transcript};
use channels_testkit::ServerProcess;
use insta::assert_snapshot;

const WELCOME: &str = "🔧 System: Connection established!";

#[tokio::test]
async fn sigterm_closes_every_websocket_with_1001_and_exits() {
    // A client that never answers gets one second (CLOSE_TIMEOUT), not five.
    let binary = env!("CARGO_BIN_EXE_step-06-presence-history");
    let mut server = ServerProcess::start(binary, &[("CLOSE_TIMEOUT", "1")]).await;
    let transcript = Transcript::default();
    let mut polite = server.connect_as("polite", "/ws/system", &transcript).await;
    assert_eq!(polite.recv_text().await, WELCOME);
    let mut silent = server.connect_as("silent", "/ws/system", &transcript).await;
    assert_eq!(silent.recv_text().await, WELCOME);

    transcript.push("(the server gets SIGTERM)");
    server.terminate();
    assert_eq!(
        polite.recv().await,
        Received::Close {
            code: 1001,
            reason: "server shutting down".into()
        }
    );
    // `silent` reads nothing more: it never answers the close frame.

    let status = server.wait(Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|status| status.success()),
        "the server must exit cleanly within 10 s, got {status:?}; it said:\n{}",
        server.output()
    );
    let log = server.output();
    assert!(log.contains("stopped"), "{log}");
    assert_eq!(
        log.matches("system chat client disconnected").count(),
        2,
        "disconnect ran for both clients:\n{log}"
    );
    drop(silent);
    assert_snapshot!(
        "sigterm_closes_every_websocket_with_1001_and_exits",
        transcript
    );
}
