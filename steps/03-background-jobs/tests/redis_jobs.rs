//! With `REDIS_URL`: jobs wait in Redis and real `worker` processes run
//! them. A job queued while no worker runs is run when one starts, and a
//! worker killed in the middle of a job does not lose it.
//!
//! Each test starts its own throwaway redis-server (without one installed,
//! the tests say so and pass; with `CI=true` they fail) and runs the
//! `worker` binary of this step, as `cargo xtask step 03 --redis` does.

mod support;

use axum_channels::Runtime;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use channels_testkit::RedisServer;
use insta::assert_snapshot;
use step_03_background_jobs::{Backends, Config, app_with};
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
    let backends = Backends::from_config(&config(redis), &Runtime::default())
        .await
        .expect("connect to the test's Redis");
    Jobs::start(app_with(backends)).await
}

/// A `worker` process of this step, killed when dropped.
struct Worker {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Worker {
    /// Starts the worker binary on `redis`, its jobs taking `delay`.
    fn start(redis: &RedisServer, delay: Duration) -> Worker {
        let mut child = Command::new(env!("CARGO_BIN_EXE_worker"))
            .env("REDIS_URL", redis.url())
            .env("JOB_DELAY_MS", delay.as_millis().to_string())
            .env("WORKER_HEARTBEAT_SECS", "1")
            .env("RUST_LOG", "warn,step_03_background_jobs=debug")
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
    let output = Command::new(env!("CARGO_BIN_EXE_worker"))
        .env_remove("REDIS_URL")
        .output()
        .expect("run the worker binary");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr,
        "error: REDIS_URL is not set: a worker takes its jobs from Redis \
         (`cargo xtask step 03 --redis` starts one for you)\n"
    );
}
