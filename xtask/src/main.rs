//! `cargo xtask`: the maintenance tasks of this tutorial repository.
//!
//! Run `cargo xtask help` for the list. This file only does the dispatch, the
//! usage text, and the few helpers every task shares (errors, argument
//! matching, locating the workspace and cargo). Each task lives in its own
//! module.
//!
//! The argument handling is hand-written on purpose: the crate must compile in
//! seconds on a reader's machine, so it depends on nothing but `similar`.

mod bench;
mod check;
mod cluster;
mod diff;
mod snapshots;
mod steps;

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt::Display;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitCode};
use std::str::FromStr;

/// Every task, as (synopsis, one-line description). The usage text is built
/// from this table so that a new task cannot be forgotten in the help.
const TASKS: &[(&str, &str)] = &[
    ("list", "List the steps with the title of their chapter"),
    (
        "step <N> [--port P] [--redis]",
        "Run step N's app (N: 1, 01, 01-system-chat or system-chat); --redis: on a throwaway \
         redis-server, with the step's worker if it has one, and the command of its external \
         sender if it has one",
    ),
    (
        "cluster [--servers N] [--shards S | --redis-cluster] [--step N] [--port P]",
        "Run a step as a cluster on this machine: S throwaway redis-servers (default 1), N \
         servers on consecutive ports (default 2), two workers, and nginx in front of them when \
         it is installed; free ports unless --port P (proxy on P, servers above it); default: \
         the newest step. --redis-cluster: the channel layers on a throwaway six-node Redis \
         Cluster (REDIS_CLUSTER_URL), the jobs on one redis-server (step 05 on)",
    ),
    (
        "diff [A] B",
        "Show what changed from step A to step B (A defaults to the step before B)",
    ),
    (
        "check [--no-build]",
        "Build everything; check the book's includes and their captions, its pictures, that chapters name the files they change, and the snapshots",
    ),
    (
        "screenshots",
        "Take the book's pictures of each step's page again (docs/src/img/step-NN.png): the \
         browser tests with SCREENSHOTS=1; needs chromium, chromium-driver, redis-server, \
         nginx and fonts-noto-color-emoji",
    ),
    (
        "bench [echo|idle|fanout|storm|flood|scale|jobs|presence] [--step N] [--path P] [--seconds S] [--rounds R] [--clients C] [--receivers N] [--connections N] [--in-flight K] [--room-size R] [--layers memory,pubsub] [--servers S] [--layer pubsub|queue] [--curve] [--rolling] [--no-baseline]",
        "Compare a step's endpoint with a bare tokio-tungstenite server; echo: round trips \
         (defaults: the newest step, /ws/system, 5 s, 3 rounds, 32 clients); idle: memory per \
         idle connection and how much returns (10,000 clients); fanout: deliveries/s from one \
         sender to N receivers in one room (default 100) through the in-memory, Redis pub/sub \
         and Redis queue layers, and split across two servers on one Redis, against a bare \
         tokio broadcast server (no --step, --path, \
         --clients; a throwaway redis-server of its own); storm: N connections (default 18,000) \
         arriving at once in step 05's rooms of R (10), K handshakes in flight (2,000), then \
         dropping at once, on the in-memory and Redis pub/sub layers: opened, failures, \
         handshake p50/p99, joins and leaves heard, server log lines; flood: one client \
         sends 60 KiB messages for S s (12) into a room of C members (200) that never read: \
         the server's memory before, at its peak and after, with and without the inbound \
         budget; scale: N connections \
         (default 100,000) in one group of step 05 (/ws/analytics, the queue layer; or \
         /ws/notifications, pub/sub, up to 10,000) over S servers (enough for the open-file \
         limit) on one Redis, 1,000 handshakes in flight: handshakes, memory per connection and \
         returned, a broadcast, 60 s of 1 message/s, Redis's CPU, then the same on bare \
         tokio-tungstenite servers as the baseline (--no-baseline skips it); --rolling: restart \
         the servers one by one; --curve: 10k to 100k, written into the book as a table and an \
         SVG; jobs: 50 \
         jobs of 100 ms on Redis (the newest step), each timed from request to result; \
         presence: step 06's presence room against step 05's room, in memory and on Redis: \
         200 joins and 200 messages timed one after another (p50/p99), and the presence_diff \
         frames of a join storm of 5,000 into one room",
    ),
    ("help", "Show this help"),
];

/// A synopsis longer than this has its description on the next line, so
/// that one long synopsis does not push every description to the right.
const SYNOPSIS_WIDTH: usize = 24;

fn usage() -> String {
    let width = TASKS
        .iter()
        .map(|(s, _)| s.len())
        .filter(|&len| len <= SYNOPSIS_WIDTH)
        .max()
        .unwrap_or(0);
    let mut out = String::from("Usage: cargo xtask <task> [options]\n\nTasks:\n");
    for (synopsis, description) in TASKS {
        if synopsis.len() <= width {
            out.push_str(&format!("  {synopsis:<width$}  {description}\n"));
        } else {
            out.push_str(&format!("  {synopsis}\n  {:width$}  {description}\n", ""));
        }
    }
    out
}

/// `cargo xtask screenshots`: the browser tests, told to write their
/// pictures. A plain `cargo test` takes them too but writes nothing, so CI
/// never changes a committed file.
fn screenshots(ws: &Workspace, args: Args) -> Result<()> {
    args.positionals(0, 0)?;
    let status = ws
        .cargo()
        .args(["test", "-p", "browser-tests"])
        .env("SCREENSHOTS", "1")
        // Missing chromium or nginx must fail, not skip a picture silently.
        .env("CI", "true")
        .status()
        .map_err(|e| fail(format!("cannot run cargo: {e}")))?;
    if !status.success() {
        return Err(fail(format!("the browser tests failed ({status})")));
    }
    println!("screenshots: written to docs/src/img/; look at them before committing");
    Ok(())
}

fn main() -> ExitCode {
    let mut args: VecDeque<String> = std::env::args().skip(1).collect();
    let task = args.pop_front();
    let args = Args(args);
    let ws = Workspace::locate();
    let result = match task.as_deref() {
        None | Some("help" | "-h" | "--help") => {
            print!("{}", usage());
            Ok(())
        }
        Some("list") => steps::run_list(&ws, args),
        Some("step") => steps::run_step(&ws, args),
        Some("cluster") => cluster::run(&ws, args),
        Some("diff") => diff::run(&ws, args),
        Some("check") => check::run(&ws, args),
        Some("screenshots") => screenshots(&ws, args),
        Some("bench") => bench::run(&ws, args),
        Some(other) => {
            eprintln!("error: unknown task '{other}'\n\n{}", usage());
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Failed(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
        Err(Error::Usage(msg)) => {
            eprintln!("error: {msg}\n(run `cargo xtask help` for usage)");
            ExitCode::from(2)
        }
        Err(Error::Exit(code)) => ExitCode::from(code),
    }
}

/// Why a task did not succeed; decides the exit code.
#[derive(Debug)]
pub enum Error {
    /// The command line is wrong (exit code 2, usage is shown).
    Usage(String),
    /// The task ran and failed (exit code 1).
    Failed(String),
    /// A child process failed and already said why; exit with its code.
    Exit(u8),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shorthand for the common "the task failed" error.
pub fn fail(msg: impl Display) -> Error {
    Error::Failed(msg.to_string())
}

/// The arguments after the task name. Tasks take their options out of it
/// first, then the positionals, and anything left over is a usage error.
pub struct Args(VecDeque<String>);

impl Args {
    /// Removes a boolean `--flag`; true if it was present.
    pub fn flag(&mut self, name: &str) -> bool {
        let before = self.0.len();
        self.0.retain(|a| a != name);
        before != self.0.len()
    }

    /// Removes `--name VALUE` or `--name=VALUE` and parses the value.
    pub fn value<T: FromStr>(&mut self, name: &str) -> Result<Option<T>> {
        let prefix = format!("{name}=");
        let Some(i) = self
            .0
            .iter()
            .position(|a| a == name || a.starts_with(&prefix))
        else {
            return Ok(None);
        };
        let arg = self.0.remove(i).unwrap_or_default();
        let raw = match arg.strip_prefix(&prefix) {
            Some(v) => v.to_string(),
            None => self
                .0
                .remove(i)
                .ok_or_else(|| Error::Usage(format!("{name} needs a value")))?,
        };
        raw.parse()
            .map(Some)
            .map_err(|_| Error::Usage(format!("invalid value '{raw}' for {name}")))
    }

    /// The remaining arguments, which must all be positional and number
    /// between `min` and `max`.
    pub fn positionals(self, min: usize, max: usize) -> Result<Vec<String>> {
        if let Some(opt) = self.0.iter().find(|a| a.starts_with("--")) {
            return Err(Error::Usage(format!("unknown option '{opt}'")));
        }
        let n = self.0.len();
        if n < min {
            return Err(Error::Usage("missing argument".into()));
        }
        if n > max {
            let extra: Vec<&str> = self.0.iter().skip(max).map(String::as_str).collect();
            return Err(Error::Usage(format!(
                "unexpected argument(s): {}",
                extra.join(" ")
            )));
        }
        Ok(self.0.into())
    }
}

/// Where the workspace is and how to call cargo.
pub struct Workspace {
    pub root: PathBuf,
}

impl Workspace {
    /// The workspace root is the parent of this crate's directory; using the
    /// compile-time path means `cargo xtask` works from any subdirectory.
    fn locate() -> Self {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf();
        Workspace { root }
    }

    /// A `cargo` command run from the workspace root. `CARGO` is set by cargo
    /// itself when it runs us, so we use the same toolchain the user invoked.
    pub fn cargo(&self) -> Command {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&self.root);
        cmd
    }

    /// `path` for messages: relative to the workspace root when inside it,
    /// with `/` separators so the output looks the same on every OS.
    pub fn display(&self, path: &Path) -> String {
        let path = normalize(path);
        match path.strip_prefix(&self.root) {
            Ok(rel) => slash_path(rel),
            Err(_) => path.display().to_string(),
        }
    }
}

/// Resolves `.` and `..` without touching the file system, so that paths built
/// from `{{#include ../../steps/...}}` print readably even if they don't exist.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if matches!(out.components().next_back(), Some(Component::Normal(_))) {
                    out.pop();
                } else {
                    out.push(c);
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// A relative path written with `/` whatever the platform, as the book uses.
pub fn slash_path(path: &Path) -> String {
    path.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// Reads a file as text, with the path in the error.
pub fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read {}: {e}", path.display())))
}

/// Translates a child's exit status into ours: success is `Ok`, a failure
/// becomes `Error::Exit` with the same code (1 if killed by a signal).
pub fn propagate(status: std::process::ExitStatus) -> Result<()> {
    if status.success() {
        return Ok(());
    }
    let code = status
        .code()
        .and_then(|c| u8::try_from(c).ok())
        .filter(|&c| c != 0)
        .unwrap_or(1);
    Err(Error::Exit(code))
}

#[cfg(test)]
pub mod testutil {
    //! Scratch directories and argument lists for the unit tests.

    use std::path::{Path, PathBuf};

    use crate::Args;

    /// Arguments as the command line would give them.
    pub fn args(list: &[&str]) -> Args {
        Args(list.iter().map(|s| s.to_string()).collect())
    }

    /// A fresh directory under the system temp dir, removed when dropped.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("xtask-test-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }

        /// Writes `contents` at `rel`, creating parent directories.
        pub fn write(&self, rel: &str, contents: &str) -> PathBuf {
            let path = self.0.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, contents).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::args;

    #[test]
    fn usage_lists_every_task() {
        let text = usage();
        for task in [
            "list",
            "step",
            "cluster",
            "diff",
            "check",
            "screenshots",
            "bench",
            "help",
        ] {
            assert!(
                text.lines()
                    .any(|l| l.trim_start().starts_with(&format!("{task} ")) || l.trim() == task),
                "{task} missing from usage"
            );
        }
    }

    #[test]
    fn options_in_both_forms() {
        let mut a = args(&["--port", "9000", "x"]);
        assert_eq!(a.value::<u16>("--port").unwrap(), Some(9000));
        assert_eq!(a.positionals(1, 1).unwrap(), vec!["x"]);

        let mut a = args(&["--port=9001"]);
        assert_eq!(a.value::<u16>("--port").unwrap(), Some(9001));

        let mut a = args(&["--port"]);
        assert!(matches!(a.value::<u16>("--port"), Err(Error::Usage(_))));

        let mut a = args(&["--port", "nope"]);
        assert!(matches!(a.value::<u16>("--port"), Err(Error::Usage(_))));
    }

    #[test]
    fn leftovers_are_usage_errors() {
        assert!(matches!(
            args(&["--what"]).positionals(0, 2),
            Err(Error::Usage(_))
        ));
        assert!(matches!(
            args(&["a", "b", "c"]).positionals(0, 2),
            Err(Error::Usage(_))
        ));
        assert!(matches!(args(&[]).positionals(1, 2), Err(Error::Usage(_))));
        let mut a = args(&["--no-build"]);
        assert!(a.flag("--no-build"));
        assert!(a.positionals(0, 0).unwrap().is_empty());
    }

    #[test]
    fn normalizes_parent_dirs() {
        assert_eq!(
            normalize(Path::new("/w/docs/src/../../steps/01/src/main.rs")),
            PathBuf::from("/w/steps/01/src/main.rs")
        );
        assert_eq!(normalize(Path::new("../a/./b")), PathBuf::from("../a/b"));
    }
}
