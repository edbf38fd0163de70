//! Stopping the server while a job runs: the real binary, stopped with
//! SIGTERM, closes the client's WebSocket with 1001, lets the job in hand
//! finish rather than cutting it off, and exits cleanly.
#![cfg(unix)]

use std::time::Duration;

use axum_channels::testing::{Received, Transcript};
use channels_testkit::ServerProcess;

#[tokio::test]
async fn sigterm_lets_the_job_in_hand_finish() {
    let binary = env!("CARGO_BIN_EXE_step-06-presence-history");
    let mut server = ServerProcess::start(
        binary,
        &[
            // Longer than the rest of the shutdown takes, so only a
            // shutdown that waits for the job sees it done.
            ("JOB_DELAY_MS", "2000"),
            ("CLOSE_TIMEOUT", "1"),
            ("RUST_LOG", "info,step_06_presence_history=debug"),
        ],
    )
    .await;
    let transcript = Transcript::default();
    let mut client = server
        .connect_as("", "/ws/backgroundjob", &transcript)
        .await;
    assert!(client.recv_text().await.contains("connected"));
    client
        .send_text(r#"{"type": "default", "content": "late"}"#)
        .await;
    assert!(client.recv_text().await.contains("queuing"));
    assert!(client.recv_text().await.contains("queued"));

    // Wait (boundedly) until the worker has the job, then stop the server.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !server.output().contains("job started") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            server.output()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.terminate();
    assert_eq!(
        client.recv().await,
        Received::Close {
            code: 1001,
            reason: "server shutting down".into()
        }
    );
    // Reading on sends our answer to the close frame, so the server is not
    // kept waiting for it.
    let _ = client.try_recv(Duration::from_secs(5)).await;

    let status = server.wait(Duration::from_secs(10)).await;
    let log = server.output();
    assert!(
        status.is_some_and(|status| status.success()),
        "a clean exit within 10 s, got {status:?}:\n{log}"
    );
    let done = log
        .find("job done")
        .unwrap_or_else(|| panic!("the job was cut off:\n{log}"));
    let signalled = log.find("shutting down").expect("the shutdown is logged");
    assert!(
        signalled < done,
        "the job finished during the shutdown:\n{log}"
    );
}
