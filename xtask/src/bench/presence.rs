//! The `presence` scenario: what presence and history cost, on step 06's
//! `/ws/presence/{room}` against step 05's `/ws/room/{room}` in the same
//! run, and how many presence frames a join storm makes.
//!
//! For each layer (in memory, then on a throwaway redis-server), it starts
//! a release server of each step in turn (pinned to CPU 0, with loadgen's
//! `presence` client on CPU 1) and measures:
//!
//! - a join: 200 connections joining one room one after another, each timed
//!   until it is in (step 05: its own join announcement; step 06: its
//!   presence state and history), p50 and p99;
//! - a message: one member of a room of 50 says 200 things one after
//!   another, each timed until its own copy comes back (step 06 writes it
//!   to the history first), p50 and p99;
//! - on step 06 only, a join storm of 5,000 connections into one room
//!   (200 handshakes at a time): the `presence_diff` frames all members got
//!   together, against the N·(N−1)/2 frames of one announcement per join
//!   to every member already there.

use std::path::Path;
use std::process::Stdio;

use super::fanout::{INSTALL_REDIS, Redis};
use super::{Server, command, exe, free_port, on_path, wait_for_port};
use crate::steps::Step;
use crate::{Result, fail};

/// Connections in the join storm.
pub(super) const STORM: usize = 5000;

pub(super) fn run(release: &Path, room: &Step, presence: &Step, pin: bool) -> Result<()> {
    let redis = if on_path("redis-server") {
        Some(Redis::start(pin)?)
    } else {
        println!("note: no redis-server, so only the in-memory runs ({INSTALL_REDIS})");
        None
    };
    let mut layers = vec![("in memory", None)];
    if let Some(redis) = &redis {
        layers.push(("on Redis", Some(redis.url())));
    }
    for (layer, url) in layers {
        println!("\n{layer}:");
        let before = measure(release, room, "/ws/room/", "room", url.as_deref(), 0, pin)?;
        let after = measure(
            release,
            presence,
            "/ws/presence/",
            "presence",
            url.as_deref(),
            STORM,
            pin,
        )?;
        let line = |what: &str, step: &Step, (p50, p99): (f64, f64)| {
            println!(
                "  {what:<10} step {}: p50 {p50:.2} ms, p99 {p99:.2} ms",
                step.id
            );
        };
        line("join", room, before.join);
        line("join", presence, after.join);
        line("message", room, before.message);
        line("message", presence, after.message);
        if let Some(storm) = after.storm {
            println!(
                "  join storm of {} into one room, step {}: {} presence_diff frames to all \
                 members together, {:.4} per join per member (one announcement per join \
                 to every member already there: {} frames), settled in about {:.1} s",
                storm.joins,
                presence.id,
                storm.frames,
                storm.frames as f64 / storm.naive as f64,
                storm.naive,
                storm.seconds
            );
        }
    }
    Ok(())
}

/// What one step measured.
struct Measured {
    join: (f64, f64),
    message: (f64, f64),
    storm: Option<Storm>,
}

struct Storm {
    joins: u64,
    frames: u64,
    naive: u64,
    seconds: f64,
}

fn measure(
    release: &Path,
    step: &Step,
    path: &str,
    kind: &str,
    redis: Option<&str>,
    storm: usize,
    pin: bool,
) -> Result<Measured> {
    let port = free_port()?;
    let label = format!("step {}", step.id);
    let mut server = command(&release.join(exe(&step.package())), "0", pin);
    server
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    if let Some(url) = redis {
        server.env("REDIS_URL", url);
    }
    let mut server = Server {
        child: server
            .spawn()
            .map_err(|e| fail(format!("cannot start {label}: {e}")))?,
    };
    wait_for_port(&mut server, port, &label)?;
    let output = command(&release.join(exe("presence")), "1", pin)
        .args(["--url", &format!("ws://127.0.0.1:{port}{path}")])
        .args(["--kind", kind])
        .args(["--storm", &storm.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| fail(format!("cannot run the presence client: {e}")))?;
    if !output.status.success() {
        return Err(fail(format!(
            "the presence client failed against {label} (its error is above)"
        )));
    }
    parse(&String::from_utf8_lossy(&output.stdout))
}

/// Reads the client's line, e.g. `{"join_ms": [1.0, 2.0], "message_ms":
/// [0.5, 0.9], "storm": {"joins": 10, "diff_frames": 4, "naive": 45,
/// "seconds": 1.5}}` (`"storm": null` without a storm).
fn parse(line: &str) -> Result<Measured> {
    let bad = || fail(format!("the presence client said {line:?}"));
    let pair = |key: &str| -> Result<(f64, f64)> {
        let start = line.find(&format!("\"{key}\": [")).ok_or_else(bad)? + key.len() + 5;
        let end = start + line[start..].find(']').ok_or_else(bad)?;
        let (a, b) = line[start..end].split_once(',').ok_or_else(bad)?;
        Ok((
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        ))
    };
    let number = |key: &str| -> Result<f64> {
        let start = line.find(&format!("\"{key}\": ")).ok_or_else(bad)? + key.len() + 4;
        let rest = &line[start..];
        let end = rest.find([',', '}']).ok_or_else(bad)?;
        rest[..end].trim().parse().map_err(|_| bad())
    };
    let storm = if line.contains("\"storm\": null") {
        None
    } else {
        Some(Storm {
            joins: number("joins")? as u64,
            frames: number("diff_frames")? as u64,
            naive: number("naive")? as u64,
            seconds: number("seconds")?,
        })
    };
    Ok(Measured {
        join: pair("join_ms")?,
        message: pair("message_ms")?,
        storm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_clients_line() {
        let m = parse(
            "{\"join_ms\": [0.98, 8.62], \"message_ms\": [0.95, 1.74], \"storm\": {\"joins\": 500, \
             \"diff_frames\": 997, \"naive\": 124750, \"seconds\": 1.15}}",
        )
        .unwrap();
        assert_eq!((m.join, m.message), ((0.98, 8.62), (0.95, 1.74)));
        let storm = m.storm.unwrap();
        assert_eq!((storm.joins, storm.frames, storm.naive), (500, 997, 124750));
        let m = parse("{\"join_ms\": [1.0, 2.0], \"message_ms\": [3.0, 4.0], \"storm\": null}")
            .unwrap();
        assert!(m.storm.is_none());
        assert!(parse("error").is_err());
    }
}
