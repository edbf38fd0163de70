//! Queues background jobs one after another and times each until its
//! result, so that `cargo xtask bench jobs` can say how long a result takes
//! beyond the job's own delay.
//!
//! It connects to `--url` (a step's `/ws/backgroundjob`), then `--jobs`
//! times sends a `default` job and waits for its `job_result`, and prints
//! one line of JSON: the time of each job from its request to its result,
//! in milliseconds, in order (the first is the first job after the worker
//! started, which the bench starts just before).

#[path = "../args.rs"]
mod args;

use std::time::{Duration, Instant};

use args::arg;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// How long one job may take before the run is called failed.
const PATIENCE: Duration = Duration::from_secs(30);

fn main() {
    let url: String = arg("url", "ws://127.0.0.1:8080/ws/backgroundjob".to_owned());
    let jobs: usize = arg("jobs", 50);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("start the runtime");
    match runtime.block_on(run(&url, jobs)) {
        Ok(times) => {
            let times: Vec<String> = times.iter().map(|ms| format!("{ms:.1}")).collect();
            println!("{{\"ms\": [{}]}}", times.join(", "));
        }
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(1);
        }
    }
}

async fn run(url: &str, jobs: usize) -> Result<Vec<f64>, String> {
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|err| format!("cannot connect to {url}: {err}"))?;
    let mut times = Vec::with_capacity(jobs);
    for n in 0..jobs {
        let request = format!("{{\"type\": \"default\", \"content\": \"job {n}\"}}");
        let started = Instant::now();
        socket
            .send(Message::text(request))
            .await
            .map_err(|err| format!("cannot send job {n}: {err}"))?;
        // One job at a time, so the next result is this job's.
        loop {
            let frame = tokio::time::timeout(PATIENCE, socket.next())
                .await
                .map_err(|_| format!("no result for job {n} within {PATIENCE:?}"))?;
            let Some(Ok(Message::Text(text))) = frame else {
                return Err(format!("the connection ended while job {n} ran"));
            };
            if text.contains("\"status\":\"error\"") {
                return Err(format!("job {n} was refused: {text}"));
            }
            if text.contains("\"type\":\"job_result\"") {
                times.push(started.elapsed().as_secs_f64() * 1000.0);
                break;
            }
        }
    }
    Ok(times)
}
