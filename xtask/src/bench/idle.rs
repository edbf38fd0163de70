//! The `idle` scenario: what an idle WebSocket connection costs the server
//! in memory, and how much of it comes back once the connections close.
//!
//! It starts the step's release build, reads the server's resident memory
//! (`VmRSS` in `/proc/<pid>/status`), has loadgen's `idle` binary open
//! `--clients` connections that then say nothing, reads the memory again,
//! closes them all, and reads it a last time. Memory is a reading of the
//! operating system, not a timing, so one round says what there is to say.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::Duration;

use super::{Server, command, exe, free_port, http_status, wait_for_port};
use crate::steps::Step;
use crate::{Result, fail};

/// How long the server gets to settle (finish its set-up work, or hand
/// freed memory back) before each reading.
const SETTLE: Duration = Duration::from_secs(2);

/// The server's resident memory in kB, from `/proc` (Linux only).
pub(super) fn resident_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| {
        fail(format!(
            "cannot read the server's memory (needs Linux /proc): {e}"
        ))
    })?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| fail("no VmRSS line in /proc/<pid>/status"))
}

/// The `idle` client: its stdin to send `close`, its stdout to read
/// `ready`/`closed`.
struct Holder {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Holder {
    fn expect(&mut self, word: &str) -> Result<String> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .map_err(|e| fail(format!("the idle client stopped: {e}")))?;
        if !line.starts_with(word) {
            return Err(fail(format!(
                "the idle client said {:?}, expected {word:?} (its error is above)",
                line.trim()
            )));
        }
        Ok(line)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kilobytes per connection, and the share of them returned, from the three
/// readings.
pub(super) fn summarize(before: u64, open: u64, closed: u64, clients: u32) -> (f64, f64) {
    let taken = open.saturating_sub(before) as f64;
    let per_connection = taken / f64::from(clients);
    let returned = if taken > 0.0 {
        open.saturating_sub(closed) as f64 / taken
    } else {
        1.0
    };
    (per_connection, returned)
}

pub(super) fn run(release: &Path, step: &Step, path: &str, clients: u32, pin: bool) -> Result<()> {
    let label = format!("step {}", step.id);
    let port = free_port()?;
    let child = command(&release.join(exe(&step.package())), "0", pin)
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("RUST_LOG", "warn")
        // Room for the connections under test (the limit is a setting).
        .env("MAX_CONNECTIONS", (clients + 100).to_string())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| fail(format!("cannot start {label}: {e}")))?;
    let mut server = Server { child };
    wait_for_port(&mut server, port, &label)?;
    if let Ok(404) = http_status(port, path) {
        return Err(fail(format!("{label} has no endpoint {path}")));
    }
    let pid = server.child.id();
    std::thread::sleep(SETTLE);
    let before = resident_kb(pid)?;

    let mut child = command(&release.join(exe("idle")), "1", pin)
        .args(["--url", &format!("ws://127.0.0.1:{port}{path}")])
        .args(["--clients", &clients.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| fail(format!("cannot start the idle client: {e}")))?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(fail("the idle client has no pipes"));
    };
    let mut holder = Holder {
        child,
        stdin,
        stdout: BufReader::new(stdout),
    };
    holder.expect("ready")?;
    std::thread::sleep(SETTLE);
    let open = resident_kb(pid)?;
    writeln!(holder.stdin, "close").map_err(|e| fail(format!("the idle client: {e}")))?;
    holder.expect("closed")?;
    std::thread::sleep(SETTLE);
    let closed = resident_kb(pid)?;
    drop(holder);
    drop(server);

    let (per_connection, returned) = summarize(before, open, closed, clients);
    println!("\n  {:<24} {:>10}", "resident memory", "kB");
    println!("  {:<24} {before:>10}", "before");
    println!("  {:<24} {open:>10}", format!("{clients} connections open"));
    println!("  {:<24} {closed:>10}", "all closed again");
    println!(
        "\n{label}: {per_connection:.1} kB per idle connection, {:.0}% returned after they closed",
        returned * 100.0
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarizes_the_readings() {
        let (per_connection, returned) = summarize(4_000, 69_000, 7_250, 10_000);
        assert!((per_connection - 6.5).abs() < 1e-9);
        assert!((returned - 0.95).abs() < 1e-9);
        assert_eq!(summarize(4_000, 4_000, 4_000, 10).1, 1.0, "nothing taken");
    }

    #[test]
    fn reads_this_process_memory() {
        if cfg!(target_os = "linux") {
            assert!(resident_kb(std::process::id()).unwrap() > 0);
        }
    }
}
