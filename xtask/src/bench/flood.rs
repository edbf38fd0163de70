//! The `flood` scenario: one client sends large messages into a room whose
//! other members never read. How far does the server's memory rise, and does
//! it come back?
//!
//! Everything the room says to a member that does not read waits in the
//! server: in the layer's buffer for that member's channel, and in the
//! frame being written to its full socket. A server that copied each
//! message for every member, and kept what waits without a bound in bytes,
//! would grow by members × buffer × message size. This scenario measures
//! that: loadgen's `flood` opens `--clients` silent members (default 200)
//! in one of the step's rooms, then a sender sends 60 KiB messages for
//! `--seconds` (default 12, past the members' 10 s write timeout) as fast
//! as the server takes them.
//!
//! It runs twice on the in-memory layer: with the step's default settings
//! (a client may send 1 MiB a second), and with the inbound budget lifted,
//! the worst case, where the sender is only held back by the server
//! itself. Each run reads the server's resident memory (`VmRSS`) every
//! 50 ms: before the flood, its peak, and 5 s after the members are gone.
//! A reading of the operating system, not a timing, so one run says it.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::idle::{Holder, SETTLE, resident_kb};
use super::{Server, command, exe, free_port, http_status, unlimited_inbound, wait_for_port};
use crate::steps::Step;
use crate::{Result, fail};

/// The size of each message, in bytes: under the rooms' 64 KiB limit.
pub(super) const MESSAGE_SIZE: usize = 60 * 1024;

/// The room it floods when `--path` is not given.
pub(super) const PATH: &str = "/ws/room/flood";

/// How often the server's memory is read.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// How long after the members are gone the last reading is taken.
const AFTERWARDS: Duration = Duration::from_secs(5);

/// What one run read.
struct Readings {
    before: u64,
    peak: u64,
    after: u64,
    /// loadgen's `flooded` line: what the sender sent, how it ended.
    flooded: String,
    /// How many connections the server closed because their client
    /// stopped reading.
    slow_readers_closed: usize,
}

pub(super) fn run(
    release: &Path,
    step: &Step,
    path: &str,
    members: u32,
    seconds: u32,
) -> Result<()> {
    let runs = [("default settings", false), ("inbound budget lifted", true)];
    let mut results = Vec::new();
    for (label, unlimited) in runs {
        let readings = flood_once(release, step, path, members, seconds, unlimited)?;
        println!("\n{label}: {}", readings.flooded);
        results.push((label, readings));
    }

    println!(
        "\n  {:<24} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "run", "before MB", "peak MB", "rise MB", "after MB", "closed"
    );
    for (label, r) in &results {
        println!(
            "  {label:<24} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10}",
            mb(r.before),
            mb(r.peak),
            mb(r.peak.saturating_sub(r.before)),
            mb(r.after),
            r.slow_readers_closed
        );
    }
    println!(
        "\n(closed: connections the server closed with 1008 because their client stopped \
         reading; {members} silent members in all)"
    );
    Ok(())
}

/// Megabytes from kilobytes.
fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn flood_once(
    release: &Path,
    step: &Step,
    path: &str,
    members: u32,
    seconds: u32,
    unlimited: bool,
) -> Result<Readings> {
    let label = format!("step {}", step.id);
    let port = free_port()?;
    // The server's log goes to a file, to count its warnings afterwards.
    let log_path = std::env::temp_dir().join(format!("xtask-flood-{port}.log"));
    let log = File::create(&log_path).map_err(|e| fail(format!("cannot create a log: {e}")))?;
    let mut server = command(&release.join(exe(&step.package())), "0", false);
    server
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .env_remove("REDIS_URL")
        .stdout(Stdio::from(
            log.try_clone()
                .map_err(|e| fail(format!("cannot share the log: {e}")))?,
        ))
        .stderr(Stdio::from(log));
    if unlimited {
        unlimited_inbound(&mut server);
    }
    let child = server
        .spawn()
        .map_err(|e| fail(format!("cannot start {label}: {e}")))?;
    let mut server = Server { child };
    wait_for_port(&mut server, port, &label)?;
    if let Ok(404) = http_status(port, path) {
        return Err(fail(format!("{label} has no endpoint {path}")));
    }
    let pid = server.child.id();
    std::thread::sleep(SETTLE);

    let mut holder = Holder::start(
        "flood",
        command(&release.join(exe("flood")), "1", false)
            .args(["--url", &format!("ws://127.0.0.1:{port}{path}")])
            .args(["--members", &members.to_string()])
            .args(["--seconds", &seconds.to_string()])
            .args(["--size", &MESSAGE_SIZE.to_string()]),
    )?;
    holder.expect("ready")?;
    let before = resident_kb(pid)?;

    // The peak is read by a thread of its own, while this one waits for the
    // sender to finish.
    let peak = Arc::new(Mutex::new(before));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (Arc::clone(&peak), Arc::clone(&sampling));
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                if let Ok(kb) = resident_kb(pid) {
                    let mut peak = peak.lock().unwrap();
                    *peak = (*peak).max(kb);
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
        })
    };
    let flooded = holder.expect("flooded");
    let closed = flooded.is_ok().then(|| holder.expect("closed"));
    std::thread::sleep(AFTERWARDS);
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    let flooded = flooded?.trim_start_matches("flooded").trim().to_owned();
    if let Some(closed) = closed {
        closed?;
    }
    let after = resident_kb(pid)?;
    let peak = *peak.lock().unwrap();
    drop(holder);
    drop(server);

    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    let slow_readers_closed = BufReader::new(log.as_bytes())
        .lines()
        .map_while(|line| line.ok())
        .filter(|line| line.contains("stopped reading"))
        .count();
    Ok(Readings {
        before,
        peak,
        after,
        flooded,
        slow_readers_closed,
    })
}
