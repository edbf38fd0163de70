//! The `jobs` scenario: how long a background job's result takes on Redis,
//! beyond the job's own delay.
//!
//! It starts a throwaway redis-server, the step's server and one of its
//! workers (release builds) with every job taking `JOB_DELAY_MS` = 100 ms,
//! and at once has loadgen's `jobs` client queue 50 `default` jobs, one
//! after another, timing each from its request to its result: the first
//! job is queued right after the worker started, as a page's first job
//! after a deploy would be. The goal is a p99 within the job's delay plus
//! 200 ms, first job included.

use std::path::Path;
use std::process::Stdio;

use super::fanout::{INSTALL_REDIS, Redis};
use super::{Server, command, exe, free_port, on_path, wait_for_port};
use crate::steps::{self, Step};
use crate::{Result, fail};

/// Where a step serves its jobs.
const PATH: &str = "/ws/backgroundjob";

/// Every job's delay, in milliseconds.
const DELAY_MS: f64 = 100.0;

/// How many jobs are timed.
const JOBS: usize = 50;

/// What a result may take beyond the job's delay, at the 99th percentile.
const GOAL_MS: f64 = 200.0;

pub(super) fn run(release: &Path, step: &Step) -> Result<()> {
    if !on_path("redis-server") {
        return Err(fail(format!("the jobs bench needs Redis: {INSTALL_REDIS}")));
    }
    let redis = Redis::start(false)?;
    let port = free_port()?;
    let label = format!("step {}", step.id);
    let delay = format!("{DELAY_MS}");
    let mut server = command(&release.join(exe(&step.package())), "0", false);
    server
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("REDIS_URL", redis.url())
        .env("JOB_DELAY_MS", &delay)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    let mut server = Server {
        child: server
            .spawn()
            .map_err(|e| fail(format!("cannot start {label}: {e}")))?,
    };
    wait_for_port(&mut server, port, &label)?;

    // The worker starts, and the first job follows at once.
    let worker = steps::bin_name(step, "worker");
    let _worker = Server {
        child: command(&release.join(exe(&worker)), "0", false)
            .env("REDIS_URL", redis.url())
            .env("JOB_DELAY_MS", &delay)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| fail(format!("cannot start {worker}: {e}")))?,
    };
    let output = command(&release.join(exe("jobs")), "1", false)
        .args(["--url", &format!("ws://127.0.0.1:{port}{PATH}")])
        .args(["--jobs", &JOBS.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| fail(format!("cannot run the jobs client: {e}")))?;
    if !output.status.success() {
        return Err(fail("the jobs client failed (its error is above)"));
    }
    let times = parse_times(&String::from_utf8_lossy(&output.stdout))?;
    let report = Report::of(&times);
    println!(
        "\n{label} on Redis: {} jobs of {DELAY_MS} ms, one after another, from request to result",
        times.len()
    );
    println!(
        "  first job (right after the worker started): {:.0} ms",
        report.first
    );
    println!(
        "  p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        report.p50, report.p99, report.max
    );
    let beyond = report.p99.max(report.first) - DELAY_MS;
    println!(
        "\nbeyond the job's delay: {beyond:.0} ms at the p99 (first job included); \
         goal: at most {GOAL_MS:.0} ms, {}",
        if beyond <= GOAL_MS { "met" } else { "NOT met" }
    );
    Ok(())
}

/// The times of loadgen's line `{"ms": [1.0, 2.0, ...]}`.
fn parse_times(stdout: &str) -> Result<Vec<f64>> {
    let list = stdout
        .split_once('[')
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| list)
        .ok_or_else(|| fail(format!("the jobs client said {stdout:?}")))?;
    list.split(',')
        .map(|ms| {
            ms.trim()
                .parse()
                .map_err(|_| fail(format!("not a time: {ms:?}")))
        })
        .collect()
}

/// The first job's time and the distribution of all of them.
#[derive(Debug, PartialEq)]
struct Report {
    first: f64,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Report {
    fn of(times: &[f64]) -> Report {
        let mut sorted = times.to_vec();
        sorted.sort_by(f64::total_cmp);
        // Nearest rank: the smallest time at or above the share.
        let rank = |share: f64| {
            let index = ((share * sorted.len() as f64).ceil() as usize).saturating_sub(1);
            sorted[index.min(sorted.len() - 1)]
        };
        Report {
            first: times[0],
            p50: rank(0.50),
            p99: rank(0.99),
            max: sorted[sorted.len() - 1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_times_and_their_percentiles() {
        let times = parse_times("{\"ms\": [130.5, 101.0, 120.0, 110.0]}\n").unwrap();
        assert_eq!(times, [130.5, 101.0, 120.0, 110.0]);
        let report = Report::of(&times);
        assert_eq!(
            report,
            Report {
                first: 130.5,
                p50: 110.0,
                p99: 130.5,
                max: 130.5
            }
        );
        assert!(parse_times("error").is_err());
        assert!(parse_times("{\"ms\": [x]}").is_err());
    }
}
