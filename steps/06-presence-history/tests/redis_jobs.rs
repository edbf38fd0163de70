//! With `REDIS_URL`: jobs wait in Redis and real `worker` processes run
//! them. A job queued while no worker runs is run when one starts, and a
//! worker killed in the middle of a job does not lose it.
//!
//! Each test starts its own throwaway redis-server (without one installed,
//! the tests say so and pass; with `CI=true` they fail) and runs the
//! `worker` binary of this step, as `cargo xtask step 06 --redis` does.

mod support;

use axum_channels::Runtime;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use channels_testkit::RedisServer;
use insta::assert_snapshot;
use step_06_presence_history::{Backends, Config, app_with};
use support::Jobs;

/// How long a test waits for a result that needs a worker to notice that
/// another one died: three missed one-second heartbeats, and some slack.
const RECOVERY: Duration = Duration::from_secs(15);

/// The settings of the server and its workers in these tests: jobs take no
/// time, and a worker silent for three seconds is taken for dead.
fn config(redis: &RedisServer) -> Config {
    Config {
        redis_url: Some(redis.url()),
        job_delay: Some(Duration::ZERO),
        worker_heartbeat: Duration::from_secs(1),
        ..Config::default()
    }
}

async fn start_server(redis: &RedisServer) -> Jobs {
    start_server_with(config(redis)).await
}

async fn start_server_with(config: Config) -> Jobs {
    let backends = Backends::from_config(&config, &Runtime::default())
        .await
        .expect("connect to the test's Redis");
    Jobs::start(app_with(backends)).await
}

/// How many keys the test's Redis holds.
async fn keys_in(redis: &RedisServer) -> usize {
    let client = redis::Client::open(redis.url()).expect("a valid URL");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test's Redis");
    redis::cmd("DBSIZE")
        .query_async(&mut connection)
        .await
        .expect("DBSIZE")
}

/// A `worker` process of this step, killed when dropped.
struct Worker {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Worker {
    /// Starts the worker binary on `redis`, its jobs taking `delay`.
    fn start(redis: &RedisServer, delay: Duration) -> Worker {
        let mut child = Command::new(env!("CARGO_BIN_EXE_step-06-presence-history-worker"))
            .env("REDIS_URL", redis.url())
            .env("JOB_DELAY_MS", delay.as_millis().to_string())
            .env("WORKER_HEARTBEAT_SECS", "1")
            // Finished jobs leave Redis at the next heartbeat.
            .env("JOB_RETENTION_SECS", "0")
            .env("RUST_LOG", "warn,step_06_presence_history=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the worker binary");
        // Collect what it says, for `wait_for` and for failure messages.
        let output = Arc::new(Mutex::new(String::new()));
        let streams: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("piped stdout")),
            Box::new(child.stderr.take().expect("piped stderr")),
        ];
        for stream in streams {
            let output = Arc::clone(&output);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut output = output.lock().unwrap();
                    output.push_str(&line);
                    output.push('\n');
                }
            });
        }
        Worker { child, output }
    }

    /// Waits up to 10 s for the worker to say something containing `needle`.
    async fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.output.lock().unwrap().contains(needle) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the worker exited ({status}):\n{}", self.output());
            }
            if Instant::now() > deadline {
                panic!("the worker never said {needle:?}:\n{}", self.output());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Kills the process at once (`SIGKILL`), as a crash or a lost machine
    /// would: no goodbye, no chance to hand its jobs back.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn a_job_queued_while_no_worker_runs_runs_when_one_starts() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let jobs = start_server(&redis).await;
    let mut alice = jobs.connect("alice").await;
    jobs.note("no worker runs yet: the job waits in Redis");
    let id = alice.queue("translate", "hello").await;
    alice.expect_silence(Duration::from_millis(500)).await;

    jobs.note("a worker starts, takes the job and runs it");
    let _worker = Worker::start(&redis, Duration::ZERO);
    alice.set_timeout(RECOVERY);
    alice.expect_result(&id).await;
    assert_snapshot!(
        "a_job_queued_while_no_worker_runs_runs_when_one_starts",
        jobs.transcript()
    );
}

#[tokio::test]
async fn a_job_whose_worker_is_killed_runs_again() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let jobs = start_server(&redis).await;
    // A slow worker, so that it can be killed in the middle of the job.
    let mut slow = Worker::start(&redis, Duration::from_secs(60));
    slow.wait_for("waiting for jobs").await;
    let mut alice = jobs.connect("alice").await;
    let id = alice.queue("analyze", "Hello world").await;
    slow.wait_for("job started").await;

    jobs.note("the worker running the job is killed (SIGKILL) in the middle of it");
    slow.kill();
    jobs.note(
        "another worker starts; when the dead one has missed 3 heartbeats, it runs the job again",
    );
    let _worker = Worker::start(&redis, Duration::ZERO);
    alice.set_timeout(RECOVERY);
    alice.expect_result(&id).await;
    assert_snapshot!("a_job_whose_worker_is_killed_runs_again", jobs.transcript());
}

#[cfg(unix)]
#[tokio::test]
async fn a_worker_told_to_stop_finishes_its_job_first() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let jobs = start_server(&redis).await;
    let mut worker = Worker::start(&redis, Duration::from_secs(1));
    worker.wait_for("waiting for jobs").await;
    let mut alice = jobs.connect("alice").await;
    let id = alice.queue("default", "last one").await;
    worker.wait_for("job started").await;

    // SIGTERM, as `kill`, systemd or Docker would send.
    let sent = Command::new("kill")
        .args(["-TERM", &worker.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success());
    alice.expect_result(&id).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = worker.child.try_wait().expect("poll the worker") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running:\n{}",
            worker.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}:\n{}", worker.output());
}

#[tokio::test]
async fn several_workers_share_the_queue() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let jobs = start_server(&redis).await;
    // Eight two-second jobs: one worker runs four at a time, so the other
    // one must take the rest (it looks at least once a heartbeat).
    let mut workers = [
        Worker::start(&redis, Duration::from_secs(2)),
        Worker::start(&redis, Duration::from_secs(2)),
    ];
    for worker in &mut workers {
        worker.wait_for("waiting for jobs").await;
    }
    let mut alice = jobs.connect("alice").await;
    let mut ids = Vec::new();
    for n in 0..8 {
        ids.push(alice.queue("default", &format!("job {n}")).await);
    }
    alice.set_timeout(RECOVERY);
    for _ in 0..ids.len() {
        let id = alice.expect_any_result().await;
        ids.retain(|queued| *queued != id);
    }
    assert!(ids.is_empty(), "no result for {ids:?}");
    // Both took a share.
    for worker in &workers {
        let output = worker.output();
        assert!(output.contains("job started"), "an idle worker:\n{output}");
    }
}

#[test]
fn the_worker_says_in_one_line_that_it_needs_redis_url() {
    let output = Command::new(env!("CARGO_BIN_EXE_step-06-presence-history-worker"))
        .env_remove("REDIS_URL")
        .output()
        .expect("run the worker binary");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr,
        "error: REDIS_URL is not set: a worker takes its jobs from Redis \
         (`cargo xtask step 06 --redis` starts one for you)\n"
    );
}

#[tokio::test]
async fn the_queue_in_redis_is_bounded() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let jobs = start_server_with(Config {
        max_queued_jobs: 2,
        ..config(&redis)
    })
    .await;
    let mut alice = jobs.connect("alice").await;
    let mut bob = jobs.connect("bob").await;
    jobs.note("no worker runs: the jobs wait in Redis, two at most");
    let first = alice.queue("default", "one").await;
    let second = alice.queue("default", "two").await;
    alice.send_text(r#"{"content":"three"}"#).await;
    alice.expect_status("queuing").await;
    alice.expect_status("error").await;
    bob.send_text(r#"{"content":"mine"}"#).await;
    bob.expect_status("queuing").await;
    bob.expect_status("error").await;

    jobs.note("a worker starts and empties the queue: there is room again");
    let _worker = Worker::start(&redis, Duration::ZERO);
    alice.set_timeout(RECOVERY);
    alice.expect_result(&first).await;
    alice.expect_result(&second).await;
    bob.run("default", "mine").await;
    assert_snapshot!("the_queue_in_redis_is_bounded", jobs.transcript());
}

#[tokio::test]
async fn finished_jobs_leave_redis() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let jobs = start_server(&redis).await;
    let mut worker = Worker::start(&redis, Duration::ZERO);
    worker.wait_for("waiting for jobs").await;
    let mut alice = jobs.connect("alice").await;
    alice.set_timeout(RECOVERY);
    // One job first, so that the queue's own keys exist before counting.
    alice.run("default", "first").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = keys_in(&redis).await;

    // 1000 jobs, ten at a time: as many as one connection may have waiting.
    for round in 0..100 {
        for n in 0..10 {
            alice
                .send_text(&format!(r#"{{"content":"job {round}.{n}"}}"#))
                .await;
        }
        // Two answers for each job, then its result, in any order.
        for _ in 0..30 {
            let frame = alice.recv().await;
            assert_ne!(frame["status"], "error", "{frame}");
        }
        // Under the library's 200 frames a second for one client, which
        // closes a client that goes faster (jobs that take no time would).
        tokio::time::sleep(Duration::from_millis(70)).await;
    }
    let finished = keys_in(&redis).await;
    // At the next heartbeat, the worker removes them.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = keys_in(&redis).await;
    while after > before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = keys_in(&redis).await;
    }
    eprintln!("keys: {before} before 1000 jobs, {finished} when they had finished, {after} after");
    assert!(
        after <= before,
        "{before} keys before 1000 jobs, {after} after:\n{}",
        worker.output()
    );
}

#[tokio::test]
async fn a_result_comes_within_its_delay_and_200_ms() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let jobs = start_server(&redis).await;
    let delay = Duration::from_millis(100);
    let mut worker = Worker::start(&redis, delay);
    worker.wait_for("waiting for jobs").await;
    let mut alice = jobs.connect("alice").await;
    // The first job right after the worker started, then one by one.
    let mut latencies = Vec::new();
    for n in 0..50 {
        let queued = Instant::now();
        alice.run("default", &format!("job {n}")).await;
        latencies.push(queued.elapsed());
    }
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[latencies.len() * 99 / 100];
    eprintln!(
        "50 jobs of {delay:?} on Redis, queued to result: p50 {p50:?}, p99 {p99:?}, max {:?}",
        latencies[latencies.len() - 1]
    );
    assert!(
        p99 <= delay + Duration::from_millis(200),
        "p99 {p99:?} for jobs of {delay:?}"
    );
}
