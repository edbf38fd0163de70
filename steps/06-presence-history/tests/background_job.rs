//! `/ws/backgroundjob`: every job type with its exact result, results kept
//! to the client that asked, and every kind of bad input answered without
//! closing the connection. The jobs take no time here (`job_delay` zero), so
//! the tests never wait for the original's seconds.

mod support;

use axum_channels::Runtime;
use std::time::{Duration, Instant};

use insta::assert_snapshot;
use step_06_presence_history::{Backends, Config, MAX_CONTENT, app_with};
use support::{Jobs, QUIET};

/// The app in memory, its jobs taking `delay`.
async fn jobs_taking(delay: Duration) -> Jobs {
    let config = Config {
        job_delay: Some(delay),
        ..Config::default()
    };
    Jobs::start(app_with(Backends::in_memory(&config, &Runtime::default()))).await
}

async fn jobs() -> Jobs {
    jobs_taking(Duration::ZERO).await
}

#[tokio::test]
async fn default_job() {
    let jobs = jobs().await;
    let mut alice = jobs.connect("alice").await;
    alice.run("default", "hello").await;
    alice.run("default", "straße").await;
    assert_snapshot!("default_job", jobs.transcript());
}

#[tokio::test]
async fn translate_job() {
    let jobs = jobs().await;
    let mut alice = jobs.connect("alice").await;
    for content in ["hello", "Good Morning", "thank you", "foo"] {
        alice.run("translate", content).await;
    }
    assert_snapshot!("translate_job", jobs.transcript());
}

#[tokio::test]
async fn analyze_job() {
    let jobs = jobs().await;
    let mut alice = jobs.connect("alice").await;
    alice.run("analyze", "Hello world").await;
    alice.run("analyze", "Año día").await;
    assert_snapshot!("analyze_job", jobs.transcript());
}

#[tokio::test]
async fn generate_job() {
    let jobs = jobs().await;
    let mut alice = jobs.connect("alice").await;
    for content in [
        "what about the weather",
        "a great seat",
        "can you help?",
        "rust",
    ] {
        alice.run("generate", content).await;
    }
    assert_snapshot!("generate_job", jobs.transcript());
}

#[tokio::test]
async fn a_missing_type_means_default() {
    let jobs = jobs().await;
    let mut alice = jobs.connect("alice").await;
    alice.send_text(r#"{"content":"no type"}"#).await;
    alice.expect_status("queuing").await;
    let id = alice.expect_status("queued").await;
    alice.expect_result(&id).await;
    assert_snapshot!("a_missing_type_means_default", jobs.transcript());
}

#[tokio::test]
async fn clients_hear_only_their_own_results() {
    let jobs = jobs().await;
    let mut alice = jobs.connect("alice").await;
    let mut bob = jobs.connect("bob").await;
    alice.run("default", "from alice").await;
    bob.expect_silence(QUIET).await;
    bob.run("default", "from bob").await;
    alice.expect_silence(QUIET).await;
    assert_snapshot!("clients_hear_only_their_own_results", jobs.transcript());
}

#[tokio::test]
async fn unknown_job_type_is_refused() {
    let jobs = jobs().await;
    let mut alice = jobs.connect("alice").await;
    alice.send_text(r#"{"type":"bogus","content":"x"}"#).await;
    alice.expect_status("error").await;
    alice
        .send_text(r#"{"type":"Translate","content":"x"}"#)
        .await;
    alice.expect_status("error").await;
    alice.send_text(r#"{"type":3,"content":"x"}"#).await;
    alice.expect_status("error").await;
    // Nothing was queued, and the connection still works.
    alice.expect_silence(QUIET).await;
    alice.run("translate", "hello").await;
    assert_snapshot!("unknown_job_type_is_refused", jobs.transcript());
}

#[tokio::test]
async fn invalid_json_is_refused() {
    let jobs = jobs().await;
    let mut alice = jobs.connect("alice").await;
    for text in ["not json", "", r#"{"type":"default""#] {
        alice.send_text(text).await;
        alice.expect_status("error").await;
    }
    alice.expect_silence(QUIET).await;
    alice.run("default", "still here").await;
    assert_snapshot!("invalid_json_is_refused", jobs.transcript());
}

#[tokio::test]
async fn json_that_is_not_an_object_is_refused() {
    let jobs = jobs().await;
    let mut alice = jobs.connect("alice").await;
    for text in ["[1, 2]", r#""hello""#, "42", "null"] {
        alice.send_text(text).await;
        alice.expect_status("error").await;
    }
    alice.expect_silence(QUIET).await;
    alice.run("default", "still here").await;
    assert_snapshot!("json_that_is_not_an_object_is_refused", jobs.transcript());
}

#[tokio::test]
async fn missing_or_non_text_content_is_refused() {
    let jobs = jobs().await;
    let mut alice = jobs.connect("alice").await;
    for text in [
        r#"{"type":"default"}"#,
        r#"{"type":"default","content":null}"#,
        r#"{"type":"analyze","content":42}"#,
        r#"{"type":"analyze","content":["a","b"]}"#,
    ] {
        alice.send_text(text).await;
        alice.expect_status("error").await;
    }
    alice.expect_silence(QUIET).await;
    alice.run("default", "still here").await;
    assert_snapshot!("missing_or_non_text_content_is_refused", jobs.transcript());
}

#[tokio::test]
async fn binary_frame_is_refused() {
    let jobs = jobs().await;
    let mut alice = jobs.connect("alice").await;
    alice.send_bytes(&[0x00, 0x01]).await;
    alice.expect_status("error").await;
    alice.expect_silence(QUIET).await;
    alice.run("default", "still here").await;
    assert_snapshot!("binary_frame_is_refused", jobs.transcript());
}

#[tokio::test]
async fn content_over_the_limit_is_refused() {
    let jobs = jobs().await;
    let mut alice = jobs.connect("alice").await;
    // Characters, not bytes: 1000 `é` are 2000 bytes, and fine.
    alice.run("default", &"é".repeat(MAX_CONTENT)).await;
    let too_long = "x".repeat(MAX_CONTENT + 1);
    alice
        .send_text(&format!(r#"{{"type":"default","content":"{too_long}"}}"#))
        .await;
    alice.expect_status("error").await;
    alice.expect_silence(QUIET).await;
    assert_snapshot!("content_over_the_limit_is_refused", jobs.transcript());
}

#[tokio::test]
async fn several_jobs_run_at_once() {
    // Real delays this time, but short: four one-second jobs that ran one
    // after the other would take four seconds.
    let delay = Duration::from_secs(1);
    let jobs = jobs_taking(delay).await;
    let mut alice = jobs.connect("alice").await;
    let started = Instant::now();
    let mut ids = Vec::new();
    for kind in ["default", "translate", "analyze", "generate"] {
        alice
            .send_text(&format!(r#"{{"type":"{kind}","content":"hello"}}"#))
            .await;
        alice.expect_status("queuing").await;
        ids.push(alice.expect_status("queued").await);
    }
    // They finish in any order: take each result as it comes, by its id.
    for _ in 0..ids.len() {
        let id = alice.expect_any_result().await;
        ids.retain(|queued| *queued != id);
    }
    assert!(ids.is_empty(), "no result for {ids:?}");
    let elapsed = started.elapsed();
    assert!(
        elapsed < 3 * delay,
        "four jobs of {delay:?} took {elapsed:?}: they did not run at once"
    );
}

#[tokio::test]
async fn a_client_that_leaves_before_its_result_costs_nothing() {
    let logs = support::capture_logs();
    // Long enough for alice to be gone when her job ends.
    let delay = Duration::from_millis(300);
    let jobs = jobs_taking(delay).await;
    let mut alice = jobs.connect("alice").await;
    alice
        .send_text(r#"{"type":"default","content":"bye"}"#)
        .await;
    alice.expect_status("queuing").await;
    alice.expect_status("queued").await;
    alice.close().await;

    // The result is dropped with one debug line...
    let dropped = "dropped a message for a channel that is closed";
    logs.wait_for(dropped).await;
    jobs.note("alice's job ends after she left: the layer drops its result");
    // ...and everyone else carries on.
    let mut bob = jobs.connect("bob").await;
    bob.run("default", "hello").await;
    bob.expect_silence(QUIET).await;
    assert_eq!(logs.count(dropped), 1, "{}", logs.text());
    assert_snapshot!(
        "a_client_that_leaves_before_its_result_costs_nothing",
        jobs.transcript()
    );
}

#[tokio::test]
async fn a_plain_http_get_is_not_a_404() {
    // The page probes each endpoint this way to learn whether this step has it.
    let jobs = jobs().await;
    let response = jobs.server.get(support::PATH).await;
    assert_ne!(response.status.as_u16(), 404);
    assert!(response.status.is_client_error());
}
