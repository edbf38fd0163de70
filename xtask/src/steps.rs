//! The tutorial's steps and their chapters: discovery, name resolution, and
//! the `list` and `step` tasks.
//!
//! A step is a directory `steps/NN-name/` holding the package
//! `step-NN-name`; its chapter is `docs/src/chNN-*.md`, titled by its first
//! `# ` heading. A step that has `src/bin/worker.rs` has a worker, which
//! `step NN --redis` runs next to its server; one that has
//! `src/bin/external_sender.rs` has an external sender, whose command
//! `step NN --redis` prints. Everything here is derived from those names so
//! that adding a step needs no change to xtask.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{Args, Error, Result, Workspace, fail};

/// One `steps/NN-name/` directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The number as written in the directory name, e.g. `"01"`.
    pub id: String,
    /// The number as a value, used for ordering and for `cargo xtask step 1`.
    pub number: u32,
    /// The part after the number, e.g. `"system-chat"`.
    pub name: String,
    pub dir: PathBuf,
}

impl Step {
    /// `01-system-chat`.
    pub fn dir_name(&self) -> String {
        format!("{}-{}", self.id, self.name)
    }

    /// `step-01-system-chat`, the package (and binary) name.
    pub fn package(&self) -> String {
        format!("step-{}", self.dir_name())
    }
}

/// Splits `01-system-chat` into (`01`, `system-chat`).
fn parse_dir_name(dir_name: &str) -> Option<(&str, &str)> {
    let (id, name) = dir_name.split_once('-')?;
    let numeric = !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit());
    (numeric && !name.is_empty()).then_some((id, name))
}

/// All steps under `<root>/steps`, in order. Directories that don't look like
/// `NN-name` are ignored (there is nothing else there today, but a stray
/// `README.md` or editor directory should not break every task).
pub fn discover(root: &Path) -> Result<Vec<Step>> {
    let steps_dir = root.join("steps");
    let entries = std::fs::read_dir(&steps_dir)
        .map_err(|e| fail(format!("cannot read {}: {e}", steps_dir.display())))?;
    let mut steps = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| fail(format!("cannot read {}: {e}", steps_dir.display())))?;
        if !entry.path().is_dir() {
            continue;
        }
        let file_name = entry.file_name();
        let Some((id, name)) = file_name.to_str().and_then(parse_dir_name) else {
            continue;
        };
        let Ok(number) = id.parse() else { continue };
        steps.push(Step {
            id: id.to_string(),
            number,
            name: name.to_string(),
            dir: entry.path(),
        });
    }
    steps.sort_by(|a, b| (a.number, &a.name).cmp(&(b.number, &b.name)));
    // Two steps with one number would make `step 1` and "the previous step"
    // ambiguous, so refuse rather than guess.
    for pair in steps.windows(2) {
        if pair[0].number == pair[1].number {
            return Err(fail(format!(
                "steps/{} and steps/{} have the same number",
                pair[0].dir_name(),
                pair[1].dir_name()
            )));
        }
    }
    if steps.is_empty() {
        return Err(fail(format!(
            "no steps found in {} (expected directories like 00-skeleton)",
            steps_dir.display()
        )));
    }
    Ok(steps)
}

/// Finds the step the user meant by `1`, `01`, `01-system-chat`,
/// `system-chat` or `step-01-system-chat`.
pub fn resolve<'a>(steps: &'a [Step], query: &str) -> Result<&'a Step, String> {
    let query = query.trim_end_matches('/');
    // Allow `steps/01-system-chat` too, which shell completion produces.
    let query = query.strip_prefix("steps/").unwrap_or(query);
    let by_number = |s: &&Step| {
        !query.is_empty()
            && query.bytes().all(|b| b.is_ascii_digit())
            && query.parse() == Ok(s.number)
    };
    let by_name = |s: &&Step| query == s.name || query == s.dir_name() || query == s.package();
    steps
        .iter()
        .find(|s| by_number(s) || by_name(s))
        .ok_or_else(|| {
            let valid: Vec<String> = steps.iter().map(Step::dir_name).collect();
            format!(
                "unknown step '{query}'; valid steps are: {}",
                valid.join(", ")
            )
        })
}

/// Like [`resolve`] but as a task error (a wrong step name is a usage error).
pub fn resolve_arg<'a>(steps: &'a [Step], query: &str) -> Result<&'a Step> {
    resolve(steps, query).map_err(Error::Usage)
}

/// The chapter file `docs/src/chNN-*.md` of a step, if it has been written.
pub fn chapter_path(root: &Path, step: &Step) -> Option<PathBuf> {
    let prefix = format!("ch{}-", step.id);
    let mut found: Vec<PathBuf> = std::fs::read_dir(root.join("docs/src"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(".md")
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found.into_iter().next()
}

/// The sub-chapters of a step's chapter: the pages in `docs/src/chNN/`,
/// sorted, which the book's summary nests under `chNN-*.md`. A chapter too
/// long for one page is split this way, and is still one chapter to
/// `xtask check`.
pub fn sub_chapter_paths(root: &Path, step: &Step) -> Vec<PathBuf> {
    let dir = root.join("docs/src").join(format!("ch{}", step.id));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    found.sort();
    found
}

/// The chapter title: the first line starting with `# `.
pub fn title_of(markdown: &str) -> Option<String> {
    markdown
        .lines()
        .find_map(|l| l.strip_prefix("# "))
        .map(|t| t.trim().to_string())
}

/// A step's chapter as shown to the user: (title, path), with placeholders
/// when the chapter does not exist yet or has no heading.
pub fn chapter_info(ws: &Workspace, step: &Step) -> (String, Option<String>) {
    let Some(path) = chapter_path(&ws.root, step) else {
        return ("(no chapter yet)".into(), None);
    };
    let title = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| title_of(&t))
        .unwrap_or_else(|| "(untitled chapter)".into());
    (title, Some(ws.display(&path)))
}

/// `cargo xtask list`
pub fn run_list(ws: &Workspace, args: Args) -> Result<()> {
    args.positionals(0, 0)?;
    let steps = discover(&ws.root)?;
    let width = steps.iter().map(|s| s.name.len()).max().unwrap_or(0);
    for step in &steps {
        let (title, _) = chapter_info(ws, step);
        println!("{}  {:<width$}  {title}", step.id, step.name);
    }
    Ok(())
}

/// `cargo xtask step NN [--port P] [--redis]`
pub fn run_step(ws: &Workspace, mut args: Args) -> Result<()> {
    let port: Option<u16> = args.value("--port")?;
    let redis = args.flag("--redis");
    let query = args.positionals(1, 1)?.remove(0);
    let steps = discover(&ws.root)?;
    let step = resolve_arg(&steps, &query)?;

    match chapter_info(ws, step) {
        (title, Some(path)) => println!("Step {} · {title} — read {path}", step.id),
        (title, None) => println!("Step {} · {} {title}", step.id, step.name),
    }
    if redis {
        return run_with_redis(ws, step, port);
    }

    let mut cmd = ws.cargo();
    // Not `--quiet`: a first build compiles about a hundred crates, and
    // cargo's progress is what tells the reader it is working, not hung.
    // `--bin`: a step may have other binaries too, such as a worker.
    let package = step.package();
    cmd.args(["run", "--package", &package, "--bin", &package]);
    // The app reads HOST/PORT itself (default 127.0.0.1:8080) and prints the
    // URL it listens on, so we only pass the port through.
    if let Some(port) = port {
        cmd.env("PORT", port.to_string());
    }
    let status = cmd
        .status()
        .map_err(|e| fail(format!("cannot run cargo: {e}")))?;
    crate::propagate(status)
}

/// Whether a step has a worker to run next to its server: a step declares
/// one by having `src/bin/worker.rs`.
pub fn has_worker(step: &Step) -> bool {
    step.dir.join("src/bin/worker.rs").is_file()
}

/// Whether a step has a program that sends to its clients from outside the
/// server: a step declares one by having `src/bin/external_sender.rs`.
pub fn has_external_sender(step: &Step) -> bool {
    step.dir.join("src/bin/external_sender.rs").is_file()
}

/// The name of the binary built from `src/bin/{stem}.rs`: the `name` of the
/// `[[bin]]` section of the step's `Cargo.toml` whose `path` is that file,
/// or, without one, `stem` (Cargo's own default). From step 04 on, steps
/// name their binaries after themselves (`step-04-showcase-worker`), since
/// every step builds into one target directory, where two binaries of one
/// name would overwrite each other.
pub fn bin_name(step: &Step, stem: &str) -> String {
    let manifest = std::fs::read_to_string(step.dir.join("Cargo.toml")).unwrap_or_default();
    bin_name_in(&manifest, stem)
}

fn bin_name_in(manifest: &str, stem: &str) -> String {
    let path = format!("src/bin/{stem}.rs");
    // Each `[[bin]]` section up to the next section, as (key, value) pairs.
    for section in manifest.split("\n[").filter(|s| s.starts_with("[bin]]")) {
        let value = |key: &str| {
            section.lines().find_map(|line| {
                let (k, v) = line.split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
            })
        };
        if value("path").as_deref() == Some(path.as_str())
            && let Some(name) = value("name")
        {
            return name;
        }
    }
    stem.to_owned()
}

/// The command that runs `step`'s external sender against the Redis at
/// `url`, for the reader to paste into another terminal.
fn external_sender_command(step: &Step, url: &str) -> String {
    format!(
        "REDIS_URL={url} cargo run --package {} --bin {}",
        step.package(),
        bin_name(step, "external_sender")
    )
}

/// How long a fresh redis-server may take to answer `PING`.
const REDIS_STARTUP: Duration = Duration::from_secs(10);

/// `step NN --redis`: a throwaway redis-server on a free port, then the
/// step's server and, if it has one, its worker, both told where Redis is by
/// `REDIS_URL`.
///
/// They all share the terminal, so Ctrl+C reaches each of them and each
/// stops in its own way (xtask, being std-only, cannot catch it, and need
/// not). If one of them stops on its own, the others are stopped too.
fn run_with_redis(ws: &Workspace, step: &Step, port: Option<u16>) -> Result<()> {
    if !redis_installed() {
        return Err(fail(
            "redis-server is not installed: install it with `sudo apt-get install redis-server` \
             (Debian, Ubuntu) or `brew install redis` (macOS), or run the step without --redis",
        ));
    }
    let package = step.package();
    build_bins(ws, step)?;

    let mut children = Children::default();
    let (url, redis_pid) = start_redis(&mut children)?;

    let mut bins = vec![("server", package.clone())];
    if has_worker(step) {
        bins.push(("worker", bin_name(step, "worker")));
    }
    for (name, bin) in bins {
        let mut cmd = ws.cargo();
        cmd.args(["run", "--quiet", "--package", &package, "--bin", &bin])
            .env("REDIS_URL", &url)
            .stdin(Stdio::null());
        if let (Some(port), "server") = (port, name) {
            cmd.env("PORT", port.to_string());
        }
        let child = cmd
            .spawn()
            .map_err(|e| fail(format!("cannot run cargo: {e}")))?;
        children.add(name, child);
    }
    let others: Vec<u32> = children.0[1..]
        .iter()
        .map(|(_, child)| child.id())
        .collect();
    if let Some(stopper) = stop_redis_last(redis_pid, &others) {
        children.add("stopper", stopper);
    }
    println!("Press Ctrl+C to stop them all.");
    if has_external_sender(step) {
        println!(
            "To send to the page from outside the server, run in another terminal:\n    {}",
            external_sender_command(step, &url)
        );
    }

    let (name, status) = children.wait_any();
    children.stop_all();
    if status.success() {
        Ok(())
    } else {
        Err(fail(format!(
            "the {name} stopped ({status}); the others were stopped too"
        )))
    }
}

/// Starts a throwaway redis-server on a free port, out of reach of Ctrl+C
/// (see [`stop_redis_last`]), adds it to `children`, waits until it answers,
/// and says where it is. Returns its URL and process id.
pub(crate) fn start_redis(children: &mut Children) -> Result<(String, u32)> {
    start_redis_with(children, |_| Vec::new())
}

/// [`start_redis`] with more arguments, which `extra` makes from the port
/// (a cluster node's configuration file is named after it).
pub(crate) fn start_redis_with(
    children: &mut Children,
    extra: impl FnOnce(u16) -> Vec<String>,
) -> Result<(String, u32)> {
    let redis_port = free_port()?;
    let log = std::env::temp_dir().join(format!("redis-{redis_port}.log"));
    let mut redis = Command::new("redis-server");
    redis
        .args(redis_args(redis_port, &log))
        .args(extra(redis_port))
        .stdin(Stdio::null());
    out_of_reach_of_ctrl_c(&mut redis);
    let redis = redis
        .spawn()
        .map_err(|e| fail(format!("cannot start redis-server: {e}")))?;
    let redis_pid = redis.id();
    children.add("redis-server", redis);
    wait_for_redis(redis_port, &log, children)?;
    let url = format!("redis://127.0.0.1:{redis_port}");
    println!(
        "Redis: a throwaway redis-server at {url}; it saves nothing, and logs to {}",
        log.display()
    );
    Ok((url, redis_pid))
}

/// Waits, out of reach of Ctrl+C, until xtask and then the processes
/// `others` are gone, and only then stops Redis (process `redis`).
///
/// Ctrl+C goes to every process of the terminal's foreground group. xtask,
/// being std-only, cannot catch it, so it dies at once, while the server and
/// the worker stop gracefully; the worker still talks to Redis as it stops
/// (it hands back the jobs it took but did not start). So Redis runs in a
/// process group of its own, where Ctrl+C does not reach it, and this small
/// shell script, in another, stops it last. `None` where there is no `sh`:
/// then Redis simply gets Ctrl+C too.
pub(crate) fn stop_redis_last(redis: u32, others: &[u32]) -> Option<Child> {
    const SCRIPT: &str = r#"xtask=$1; redis=$2; shift 2
while kill -0 "$xtask" 2>/dev/null; do sleep 0.2; done
for pid in "$@"; do while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done; done
kill "$redis""#;
    let mut stopper = Command::new("sh");
    stopper
        .args(["-c", SCRIPT, "stop-redis-last"])
        .arg(std::process::id().to_string())
        .arg(redis.to_string())
        .args(others.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    out_of_reach_of_ctrl_c(&mut stopper);
    stopper.spawn().ok()
}

/// Puts the process `cmd` starts in a process group of its own, so that
/// Ctrl+C in the terminal does not reach it.
fn out_of_reach_of_ctrl_c(cmd: &mut Command) {
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(cmd, 0);
    #[cfg(not(unix))]
    let _ = cmd;
}

pub(crate) fn redis_installed() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// A Redis that keeps nothing on disk and writes its log to `log`, not to
/// the terminal the server and the worker speak in.
pub(crate) fn redis_args(port: u16, log: &Path) -> Vec<String> {
    let args = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--logfile",
        &log.display().to_string(),
    ];
    args.iter().map(|arg| arg.to_string()).collect()
}

/// A port that was free a moment ago (the OS picks it for port 0).
pub(crate) fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| fail(format!("cannot find a free port: {e}")))
}

/// Waits until the redis-server on `port` answers `PING`.
fn wait_for_redis(port: u16, log: &Path, children: &mut Children) -> Result<()> {
    let started = Instant::now();
    loop {
        if ping(port) {
            return Ok(());
        }
        if let Some((_, status)) = children.exited() {
            return Err(fail(format!(
                "redis-server stopped at start ({status}); see {}",
                log.display()
            )));
        }
        if started.elapsed() > REDIS_STARTUP {
            return Err(fail(format!(
                "redis-server did not answer on port {port} within {REDIS_STARTUP:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True if something on `port` answers `PING` with `+PONG`.
pub(crate) fn ping(port: u16) -> bool {
    let answer = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        stream.write_all(b"PING\r\n")?;
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply)?;
        Ok(&reply == b"+PONG\r\n")
    };
    answer().unwrap_or(false)
}

/// The processes `step --redis` started, stopped when dropped, so that an
/// error on the way never leaves a redis-server behind.
#[derive(Default)]
pub(crate) struct Children(Vec<(&'static str, Child)>);

impl Children {
    pub(crate) fn add(&mut self, name: &'static str, child: Child) {
        self.0.push((name, child));
    }

    /// The first child found to have exited, if any has.
    pub(crate) fn exited(&mut self) -> Option<(&'static str, ExitStatus)> {
        self.0.iter_mut().find_map(|(name, child)| {
            let status = child.try_wait().ok().flatten()?;
            Some((*name, status))
        })
    }

    /// Takes the first child found to have exited out of the list, so that
    /// the others can go on being waited for.
    pub(crate) fn take_exited(&mut self) -> Option<(&'static str, ExitStatus)> {
        let index = self
            .0
            .iter_mut()
            .position(|(_, child)| matches!(child.try_wait(), Ok(Some(_))))?;
        let (name, mut child) = self.0.remove(index);
        Some((name, child.wait().ok()?))
    }

    /// How many children are in the list.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// How many children called `name` are in the list.
    pub(crate) fn count(&self, name: &str) -> usize {
        self.0.iter().filter(|(n, _)| *n == name).count()
    }

    /// Waits until one of the children exits.
    pub(crate) fn wait_any(&mut self) -> (&'static str, ExitStatus) {
        loop {
            if let Some(exited) = self.exited() {
                return exited;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the children still running, the last started first (the
    /// stopper of Redis, if there is one, before anything else).
    pub(crate) fn stop_all(&mut self) {
        for (_, child) in self.0.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.0.clear();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Builds every binary of `step` once, with cargo's progress showing, so
/// that the server and its workers then start at once.
pub(crate) fn build_bins(ws: &Workspace, step: &Step) -> Result<()> {
    let built = ws
        .cargo()
        .args(["build", "--package", &step.package(), "--bins"])
        .status()
        .map_err(|e| fail(format!("cannot run cargo: {e}")))?;
    crate::propagate(built)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    fn step(id: &str, name: &str) -> Step {
        Step {
            id: id.into(),
            number: id.parse().unwrap(),
            name: name.into(),
            dir: PathBuf::from(format!("steps/{id}-{name}")),
        }
    }

    fn sample() -> Vec<Step> {
        vec![step("00", "skeleton"), step("01", "system-chat")]
    }

    #[test]
    fn resolves_every_spelling() {
        let steps = sample();
        for q in [
            "1",
            "01",
            "001",
            "01-system-chat",
            "system-chat",
            "step-01-system-chat",
            "steps/01-system-chat/",
        ] {
            assert_eq!(resolve(&steps, q).unwrap().name, "system-chat", "{q}");
        }
        assert_eq!(resolve(&steps, "0").unwrap().name, "skeleton");
    }

    #[test]
    fn unknown_step_lists_valid_ones() {
        let steps = sample();
        for q in ["7", "", "chat", "01-system", "-1"] {
            let err = resolve(&steps, q).unwrap_err();
            assert!(err.contains("00-skeleton, 01-system-chat"), "{err}");
        }
    }

    #[test]
    fn parses_dir_names() {
        assert_eq!(
            parse_dir_name("01-system-chat"),
            Some(("01", "system-chat"))
        );
        assert_eq!(parse_dir_name("README"), None);
        assert_eq!(parse_dir_name("x1-foo"), None);
        assert_eq!(parse_dir_name("01-"), None);
    }

    #[test]
    fn a_step_with_src_bin_worker_has_a_worker() {
        let tmp = TempDir::new("worker");
        tmp.write("steps/02-room-chat/src/main.rs", "");
        tmp.write("steps/03-background-jobs/src/bin/worker.rs", "");
        let steps = discover(tmp.path()).unwrap();
        let workers: Vec<bool> = steps.iter().map(has_worker).collect();
        assert_eq!(workers, [false, true]);
    }

    #[test]
    fn a_step_with_src_bin_external_sender_gets_its_command() {
        let tmp = TempDir::new("sender");
        tmp.write("steps/03-background-jobs/src/bin/worker.rs", "");
        tmp.write("steps/04-showcase/src/bin/external_sender.rs", "");
        let steps = discover(tmp.path()).unwrap();
        let senders: Vec<bool> = steps.iter().map(has_external_sender).collect();
        assert_eq!(senders, [false, true]);
        assert_eq!(
            external_sender_command(&steps[1], "redis://127.0.0.1:6400"),
            "REDIS_URL=redis://127.0.0.1:6400 cargo run --package step-04-showcase --bin external_sender"
        );
    }

    #[test]
    fn a_bin_section_names_its_binary() {
        let manifest = "[package]\nname = \"step-04-showcase\"\n\n\
                        [[bin]]\nname = \"step-04-showcase-worker\"\npath = \"src/bin/worker.rs\"\n\n\
                        [[bin]]\npath = \"src/bin/external_sender.rs\"\nname = \"sender\"\n\n\
                        [dependencies]\nname = \"not a bin\"\n";
        assert_eq!(bin_name_in(manifest, "worker"), "step-04-showcase-worker");
        assert_eq!(bin_name_in(manifest, "external_sender"), "sender");
        // No section for it: Cargo's default, the file's name.
        assert_eq!(bin_name_in(manifest, "other"), "other");
        assert_eq!(bin_name_in("[package]\n", "worker"), "worker");
    }

    #[test]
    fn the_throwaway_redis_saves_nothing() {
        let args = redis_args(6400, Path::new("/tmp/redis.log")).join(" ");
        assert_eq!(
            args,
            "--port 6400 --bind 127.0.0.1 --save  --appendonly no --logfile /tmp/redis.log"
        );
    }

    #[test]
    fn ping_fails_where_nothing_listens() {
        let port = free_port().unwrap();
        assert!(!ping(port));
    }

    #[test]
    fn sub_chapters_are_the_pages_of_the_chapters_folder() {
        let tmp = TempDir::new("sub-chapters");
        tmp.write("steps/03-jobs/Cargo.toml", "");
        tmp.write("docs/src/ch03-jobs.md", "# Jobs");
        tmp.write("docs/src/ch03/on-redis.md", "# On Redis");
        tmp.write("docs/src/ch03/cpu.md", "# CPU");
        tmp.write("docs/src/ch03/picture.png", "");
        let steps = discover(tmp.path()).unwrap();
        let pages: Vec<String> = sub_chapter_paths(tmp.path(), &steps[0])
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(pages, ["cpu.md", "on-redis.md"]);
        assert_eq!(
            chapter_path(tmp.path(), &steps[0]).unwrap(),
            tmp.path().join("docs/src/ch03-jobs.md")
        );
    }

    #[test]
    fn discovers_steps_in_order() {
        let tmp = TempDir::new("discover");
        tmp.write("steps/10-later/Cargo.toml", "");
        tmp.write("steps/02-room-chat/Cargo.toml", "");
        tmp.write("steps/00-skeleton/Cargo.toml", "");
        tmp.write("steps/notes/x", "");
        tmp.write("steps/README.md", "");
        let steps = discover(tmp.path()).unwrap();
        let names: Vec<String> = steps.iter().map(Step::dir_name).collect();
        assert_eq!(names, ["00-skeleton", "02-room-chat", "10-later"]);
        assert_eq!(steps[1].package(), "step-02-room-chat");
    }

    #[test]
    fn duplicate_numbers_are_an_error() {
        let tmp = TempDir::new("dup");
        tmp.write("steps/01-a/Cargo.toml", "");
        tmp.write("steps/01-b/Cargo.toml", "");
        assert!(discover(tmp.path()).is_err());
    }

    #[test]
    fn finds_chapter_and_title() {
        let tmp = TempDir::new("chapter");
        tmp.write(
            "docs/src/ch01-system-messages.md",
            "<!-- intro -->\n#not a heading\n# System messages  \n\n## Sub\n",
        );
        let ws = Workspace {
            root: tmp.path().to_path_buf(),
        };
        let s1 = step("01", "system-chat");
        assert_eq!(
            chapter_info(&ws, &s1),
            (
                "System messages".to_string(),
                Some("docs/src/ch01-system-messages.md".to_string())
            )
        );
        // ch10 must not be mistaken for ch1x's chapter, nor vice versa.
        let s10 = step("10", "later");
        assert_eq!(chapter_info(&ws, &s10), ("(no chapter yet)".into(), None));
        assert_eq!(title_of("no heading"), None);
    }
}
