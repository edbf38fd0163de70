//! Jobs are bounded: one connection may have `MAX_JOBS_PER_CONNECTION` jobs
//! waiting for their results, the queue holds at most `MAX_QUEUED_JOBS`, and
//! a job past either is refused with an error frame on a connection that
//! stays open. And a job that computes leaves the WebSockets responsive.

mod support;

use std::time::{Duration, Instant};

use axum_channels::testing::{Received, TestServer, Transcript};
use axum_channels::{InboundBudget, Runtime, Settings};
use step_06_presence_history::{Backends, Config, app_with};
use support::{JobClient, Jobs};

async fn jobs(config: Config) -> Jobs {
    Jobs::start(app_with(Backends::in_memory(&config, &Runtime::default()))).await
}

/// The app with the library's inbound budget lifted. Under it (200 frames a
/// second, in bursts of 400) a client as fast as these would be closed
/// with 1008; a slower one would get the same jobs in, over a few seconds.
async fn jobs_without_budget(config: Config) -> Jobs {
    let mut settings = Settings::default();
    settings.connection.inbound = InboundBudget::UNLIMITED;
    let runtime = Runtime::new(settings).expect("valid settings");
    let app = app_with(Backends::in_memory(&config, &runtime));
    Jobs::on(TestServer::start_with(runtime, app).await)
}

/// What the server answered to a flood of job requests.
#[derive(Default)]
struct Answers {
    queued: usize,
    refused: Vec<String>,
    results: usize,
    /// The most jobs of this client that waited for their results at once.
    most_waiting: usize,
}

/// Sends `count` jobs without waiting for any answer, then reads one answer
/// per job (`queued`, or an error), and the results that come meanwhile.
async fn flood(client: &mut JobClient, count: usize) -> Answers {
    for n in 0..count {
        client
            .send_text(&format!(r#"{{"content":"job {n}"}}"#))
            .await;
    }
    let mut answers = Answers::default();
    while answers.queued + answers.refused.len() < count {
        let frame = client.recv().await;
        match (frame["status"].as_str(), frame["type"].as_str()) {
            // The next frame says whether it was queued.
            (Some("queuing"), _) => {}
            (Some("queued"), _) => answers.queued += 1,
            (Some("error"), _) => answers
                .refused
                .push(frame["message"].as_str().unwrap().to_owned()),
            (_, Some("job_result")) => answers.results += 1,
            _ => panic!("unexpected frame {frame}"),
        }
        answers.most_waiting = answers.most_waiting.max(answers.queued - answers.results);
    }
    answers
}

#[tokio::test]
async fn a_client_that_floods_gets_at_most_its_share() {
    let config = Config {
        job_delay: Some(Duration::from_secs(1)),
        ..Config::default()
    };
    let limit = config.max_jobs_per_connection;
    assert_eq!(limit, 10, "the default");
    let jobs = jobs_without_budget(config).await;
    let mut alice = jobs.connect("alice").await;
    let answers = flood(&mut alice, 1000).await;

    assert!(
        answers.most_waiting <= limit,
        "{} jobs waited at once; the limit is {limit}",
        answers.most_waiting
    );
    assert!(answers.queued >= limit, "only {} queued", answers.queued);
    assert_eq!(answers.queued + answers.refused.len(), 1000);
    for message in &answers.refused {
        assert_eq!(
            message,
            "❌ Too many jobs waiting: 10 of yours wait for their results. \
             Try again when one is done"
        );
    }
    // The results of the queued jobs come, and the connection still works.
    for _ in answers.results..answers.queued {
        alice.expect_any_result().await;
    }
    alice.run("default", "still here").await;
    // Another client was never held back by alice's flood.
    let mut bob = jobs.connect("bob").await;
    bob.queue("default", "me too").await;
}

#[tokio::test]
async fn the_queue_holds_at_most_max_queued_jobs() {
    // Jobs that outlast the test: none of them leaves the queue by ending.
    let config = Config {
        job_delay: Some(Duration::from_secs(60)),
        max_jobs_per_connection: 100,
        max_queued_jobs: 5,
        ..Config::default()
    };
    let jobs = jobs_without_budget(config).await;
    let mut alice = jobs.connect("alice").await;
    let answers = flood(&mut alice, 50).await;
    // 5 wait in the queue; the workers may have taken up to 4 out of it to
    // run them, which makes room for as many more.
    assert!(
        (5..=5 + 4).contains(&answers.queued),
        "{} queued",
        answers.queued
    );
    for message in &answers.refused {
        assert_eq!(
            message,
            "❌ Too many jobs waiting in the queue. Try again in a moment"
        );
    }
    // Refused, but connected.
    alice.send_text("not json").await;
    alice.expect_status("error").await;
}

#[tokio::test]
async fn a_job_that_computes_leaves_the_websockets_responsive() {
    // `#[tokio::test]` runs the server on one thread. A job computing on
    // it would hold up every WebSocket until it is done, as four of them
    // would on a server with four cores.
    let jobs = jobs(Config::default()).await;
    let mut alice = jobs.connect("alice").await;
    alice.set_timeout(Duration::from_secs(60));
    let started = Instant::now();
    let id = alice.queue("compute", "primes").await;

    // While it computes, a round trip on `/ws/system`: connect, welcome,
    // echo.
    let mut bob = jobs
        .server
        .connect_as("bob", "/ws/system", &Transcript::default())
        .await;
    assert!(matches!(bob.recv().await, Received::Text(_)));
    bob.send_text("ping").await;
    assert!(matches!(bob.recv().await, Received::Text(text) if text.ends_with("ping")));
    let elapsed = started.elapsed();
    // The job is still computing...
    alice.expect_silence(Duration::from_millis(1)).await;
    // ...and the queueing and the round trip took no time.
    assert!(
        elapsed < Duration::from_millis(250),
        "queueing and a round trip took {elapsed:?} while the job computed"
    );

    let result = alice.expect_result(&id).await;
    assert_eq!(
        result,
        "🧮 Computed for 'primes': there are 41538 primes below 500000"
    );
}
