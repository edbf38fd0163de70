//! The `cluster` task: one step run as several processes on one machine,
//! the way it runs in production on several.
//!
//! `cargo xtask cluster [--servers N] [--shards S] [--step NN] [--port P]`
//! starts, in this order:
//!
//! 1. S throwaway redis-servers (default 1) on free ports, reusing
//!    [`steps::start_redis`]; the step reads them all from one
//!    `REDIS_URL=url1,url2` and spreads its channel layers over them;
//! 2. N servers of the step (default 2) on consecutive ports, each with
//!    `METRICS=1` when the step has the `metrics` feature, so `/metrics`
//!    shows what each one carries;
//! 3. two workers, which take jobs from the first Redis;
//! 4. nginx in front of the servers, when it is installed, with the step's
//!    `deploy/nginx.conf` filled in (see [`proxy_config`]), from a temporary
//!    directory of its own.
//!
//! Then it prints every URL and waits. Ctrl+C reaches every process of the
//! terminal, so each stops in its own way; this task sees it too, waits for
//! the servers, workers and proxy to go, stops the redis-servers (out of
//! reach of Ctrl+C) last, and says so. Should the task itself be killed,
//! the script of [`steps::stop_redis_last`] still stops Redis once the
//! servers and workers that talk to it have gone. A server
//! that stops on its own (say, `kill`ed to see what its rooms hear) leaves
//! the others running; any other process stopping, or the last server,
//! stops them all.
//!
//! Ports are free ones the system picks, unless `--port P` asks for the
//! proxy on P and the servers on P+1, P+2, ...
//!
//! With `--redis-cluster` (instead of `--shards`), the channel layers go on
//! a throwaway Redis Cluster of six nodes, three masters and a replica each,
//! which the servers read from `REDIS_CLUSTER_URL`; one more redis-server
//! keeps the job queue (`REDIS_URL`), which apalis keeps on one Redis. The
//! nodes are made as the tests make theirs (`cluster_recipe`, shared with
//! `channels-testkit`): stopping a master (`redis-cli -p PORT shutdown
//! nosave`) shows a failover under the rooms.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::steps::{self, Children, Step};
use crate::{Args, Error, Result, Workspace, fail};

/// The recipe of a throwaway Redis Cluster, shared with the test harness
/// as a file rather than a dependency (this crate stays std-only).
#[path = "../../channels-testkit/src/cluster_recipe.rs"]
pub(crate) mod cluster_recipe;

/// The most servers, or shards, one machine is asked to run: more shows
/// nothing new, and each costs a process.
const MAX_PROCESSES: u16 = 16;

/// How long the processes get to stop by themselves after Ctrl+C: a
/// server's shutdown takes at most 10 s (`SHUTDOWN_TIMEOUT`).
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// How many workers run beside the servers: two, so that which one runs a
/// job is visibly not what decides where its result goes.
const WORKERS: usize = 2;

/// How long the servers may take to start listening (a first `cargo run`
/// after the build is quick, but two cores start several at once).
const SERVER_STARTUP: Duration = Duration::from_secs(60);

/// Where a step keeps the reverse proxy's configuration.
const PROXY_CONFIG: &str = "deploy/nginx.conf";

/// How long a new Redis Cluster may take to serve every slot, its
/// replicas synced.
const CLUSTER_FORMING: Duration = Duration::from_secs(30);

#[derive(Debug, PartialEq)]
struct Options {
    servers: u16,
    shards: u16,
    redis_cluster: bool,
    step: Option<String>,
    port: Option<u16>,
}

fn parse_options(mut args: Args) -> Result<Options> {
    let within = |name: &str, value: Option<u16>, default: u16| match value {
        None => Ok(default),
        Some(n) if (1..=MAX_PROCESSES).contains(&n) => Ok(n),
        Some(n) => Err(Error::Usage(format!(
            "{name} must be from 1 to {MAX_PROCESSES}, not {n}"
        ))),
    };
    let servers = within("--servers", args.value("--servers")?, 2)?;
    let shards: Option<u16> = args.value("--shards")?;
    let redis_cluster = args.flag("--redis-cluster");
    if redis_cluster && shards.is_some() {
        return Err(Error::Usage(
            "--redis-cluster and --shards are two ways to spread the layers: pick one".to_owned(),
        ));
    }
    let shards = within("--shards", shards, 1)?;
    let step = args.value("--step")?;
    let port: Option<u16> = args.value("--port")?;
    if port.is_some_and(|p| p == 0 || u32::from(p) + u32::from(servers) > 65_535) {
        return Err(Error::Usage(format!(
            "--port leaves no room for {servers} server(s) above it"
        )));
    }
    args.positionals(0, 0)?;
    Ok(Options {
        servers,
        shards,
        redis_cluster,
        step,
        port,
    })
}

/// Whether a step serves `/metrics` when asked: it turns on axum-channels'
/// `metrics` feature in its `Cargo.toml`. Asking one that does not stops it
/// at start, so the cluster asks only those that do.
fn has_metrics(step: &Step) -> bool {
    std::fs::read_to_string(step.dir.join("Cargo.toml"))
        .is_ok_and(|manifest| manifest.contains("\"metrics\""))
}

/// `count` consecutive ports that were free a moment ago. The system picks
/// the first; the ones above it are checked, and another start is tried
/// when one is taken.
fn consecutive_free_ports(count: u16) -> Result<u16> {
    for _ in 0..50 {
        let first = steps::free_port()?;
        if u32::from(first) + u32::from(count) > 65_535 {
            continue;
        }
        let free = (first..first + count)
            .all(|port| TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok());
        if free {
            return Ok(first);
        }
    }
    Err(fail(format!("found no {count} consecutive free ports")))
}

/// The step's proxy configuration, `template`, for a proxy that listens on
/// `listen` and spreads connections over `servers`: `@LISTEN@` becomes the
/// address, and the line holding `@SERVERS@` one `server` line per server.
fn proxy_config(template: &str, listen: u16, servers: &[u16]) -> String {
    let mut out = String::new();
    for line in template.lines() {
        // Comments may name the placeholders; they are left as they are.
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            out.push('\n');
        } else if line.trim() == "@SERVERS@" {
            let indent = &line[..line.len() - line.trim_start().len()];
            for port in servers {
                out.push_str(&format!("{indent}server 127.0.0.1:{port};\n"));
            }
        } else {
            out.push_str(&line.replace("@LISTEN@", &format!("127.0.0.1:{listen}")));
            out.push('\n');
        }
    }
    out
}

/// The main file nginx reads: where it keeps its pid and temporary files
/// (all in `dir`, so it needs no root and touches nothing of the system's),
/// and the step's configuration, filled in, as `cluster.conf`.
fn nginx_main_config(dir: &Path) -> String {
    let dir = dir.display();
    format!(
        "# Written by `cargo xtask cluster`; removed when it stops.\n\
         pid {dir}/nginx.pid;\n\
         error_log stderr warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   client_body_temp_path {dir}/body;\n\
         \x20   proxy_temp_path {dir}/proxy;\n\
         \x20   fastcgi_temp_path {dir}/fastcgi;\n\
         \x20   uwsgi_temp_path {dir}/uwsgi;\n\
         \x20   scgi_temp_path {dir}/scgi;\n\
         \x20   include {dir}/cluster.conf;\n\
         }}\n"
    )
}

/// nginx, if installed: on `PATH`, or in `/usr/sbin`, which is not on a
/// normal user's `PATH` on Debian.
pub(crate) fn find_nginx() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
}

/// A temporary directory for nginx, removed when dropped.
struct ProxyDir(PathBuf);

impl Drop for ProxyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes nginx's configuration into a fresh temporary directory and starts
/// it in the foreground, so Ctrl+C stops it too.
fn start_nginx(
    nginx: &Path,
    template: &str,
    listen: u16,
    servers: &[u16],
    children: &mut Children,
) -> Result<ProxyDir> {
    let dir = ProxyDir(std::env::temp_dir().join(format!("xtask-cluster-nginx-{listen}")));
    let _ = std::fs::remove_dir_all(&dir.0);
    let write = |name: &str, text: String| {
        std::fs::write(dir.0.join(name), text)
            .map_err(|e| fail(format!("cannot write nginx's {name}: {e}")))
    };
    std::fs::create_dir_all(&dir.0)
        .map_err(|e| fail(format!("cannot create {}: {e}", dir.0.display())))?;
    write("cluster.conf", proxy_config(template, listen, servers))?;
    write("nginx.conf", nginx_main_config(&dir.0))?;
    let child = Command::new(nginx)
        .arg("-p")
        .arg(&dir.0)
        .arg("-c")
        .arg(dir.0.join("nginx.conf"))
        // Its start-up errors go to the terminal, not to /var/log.
        .args(["-e", "stderr", "-g", "daemon off;"])
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| fail(format!("cannot start {}: {e}", nginx.display())))?;
    children.add("nginx", child);
    Ok(dir)
}

/// Waits until something accepts connections on each of `ports`, or one
/// of `children` stops.
fn wait_for_ports(ports: &[u16], children: &mut Children) -> Result<()> {
    let started = Instant::now();
    for &port in ports {
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            if let Some((name, status)) = children.exited() {
                return Err(fail(format!("the {name} stopped at start ({status})")));
            }
            if started.elapsed() > SERVER_STARTUP {
                return Err(fail(format!(
                    "nothing listens on port {port} after {} s",
                    SERVER_STARTUP.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// `cargo xtask cluster`.
/// Whether a step reads `REDIS_CLUSTER_URL` (step 05 on).
fn reads_redis_cluster_url(step: &Step) -> bool {
    std::fs::read_to_string(step.dir.join("src/config.rs"))
        .is_ok_and(|config| config.contains("REDIS_CLUSTER_URL"))
}

/// `redis-cli -p PORT ARGS...`, its output as text, if it ran.
pub(crate) fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Where the cluster node on `port` keeps its view of the cluster.
pub(crate) fn cluster_node_conf(port: u16) -> PathBuf {
    std::env::temp_dir().join(format!("redis-cluster-{port}.conf"))
}

/// A cluster node's arguments besides a plain throwaway server's, for the
/// node on `port`.
pub(crate) fn cluster_node_args(port: u16) -> Vec<String> {
    let conf = cluster_node_conf(port);
    // A node reads its file at start: one from an earlier run on the same
    // port would make it a member of that old cluster.
    let _ = std::fs::remove_file(&conf);
    let mut args: Vec<String> = cluster_recipe::NODE_ARGS.map(str::to_owned).to_vec();
    args.extend([
        "--cluster-config-file".to_owned(),
        conf.display().to_string(),
    ]);
    args
}

/// Forms one Redis Cluster of the fresh cluster nodes on `ports`
/// (`redis-cli --cluster create`), and waits until every node serves every
/// slot and every replica has synced; returns how long that took. The
/// benches form theirs with it too.
pub(crate) fn form_redis_cluster(ports: &[u16]) -> Result<Duration> {
    let started = Instant::now();
    let created = Command::new("redis-cli")
        .args(cluster_recipe::create_args(ports))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| fail(format!("cannot run redis-cli: {e}")))?;
    if !created.status.success() {
        return Err(fail(format!(
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        )));
    }
    loop {
        let ready = ports.iter().all(|&port| {
            redis_cli(port, &["cluster", "info"]).is_some_and(|info| cluster_recipe::serves(&info))
                && redis_cli(port, &["info", "replication"])
                    .is_some_and(|info| !cluster_recipe::replica_behind(&info))
        });
        if ready {
            return Ok(started.elapsed());
        }
        if started.elapsed() > CLUSTER_FORMING {
            return Err(fail(format!(
                "the Redis Cluster did not form within {} s",
                CLUSTER_FORMING.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts six cluster nodes (each out of reach of Ctrl+C, as
/// [`steps::start_redis`] starts any Redis), forms the cluster, and waits
/// until every node serves every slot and every replica has synced.
/// Returns the nodes' URLs and process ids.
fn start_redis_cluster(children: &mut Children) -> Result<(Vec<String>, Vec<u32>)> {
    let mut urls = Vec::new();
    let mut pids = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..cluster_recipe::MASTERS * 2 {
        let (url, pid) = steps::start_redis_with(children, cluster_node_args)?;
        ports.push(
            url.rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("a port"),
        );
        urls.push(url);
        pids.push(pid);
    }
    let formed = form_redis_cluster(&ports)?;
    println!(
        "Redis Cluster: six throwaway nodes (three masters, a replica each), formed in {:.1} s",
        formed.as_secs_f64()
    );
    Ok((urls, pids))
}

pub fn run(ws: &Workspace, args: Args) -> Result<()> {
    let options = parse_options(args)?;
    let all = steps::discover(&ws.root)?;
    let step: &Step = match &options.step {
        Some(query) => steps::resolve_arg(&all, query)?,
        None => all.last().expect("discover finds at least one step"),
    };
    if !steps::has_worker(step) {
        return Err(Error::Usage(format!(
            "steps/{} has no worker: a cluster needs a step that shares its work through \
             Redis (step 03 on)",
            step.dir_name()
        )));
    }
    if !steps::redis_installed() {
        return Err(fail(
            "redis-server is not installed: install it with `sudo apt-get install redis-server` \
             (Debian, Ubuntu) or `brew install redis` (macOS)",
        ));
    }
    if options.redis_cluster && !reads_redis_cluster_url(step) {
        return Err(Error::Usage(format!(
            "steps/{} does not read REDIS_CLUSTER_URL: --redis-cluster needs step 05 or later",
            step.dir_name()
        )));
    }
    let template = std::fs::read_to_string(step.dir.join(PROXY_CONFIG)).ok();
    let nginx = find_nginx();
    let package = step.package();
    crate::steps::build_bins(ws, step)?;

    // The proxy's port first, then the servers'.
    let servers = options.servers;
    let first = match options.port {
        Some(port) => port,
        None => consecutive_free_ports(servers + 1)?,
    };
    let proxy_port = first;
    let server_ports: Vec<u16> = (1..=servers).map(|i| first + i).collect();

    let mut children = Children::default();
    let mut redis_pids = Vec::new();
    let mut urls = Vec::new();
    for _ in 0..options.shards {
        let (url, pid) = steps::start_redis(&mut children)?;
        urls.push(url);
        redis_pids.push(pid);
    }
    // Every process lists the same hosts in the same order, as the layers'
    // consistent hash requires.
    let redis_url = urls.join(",");
    let cluster_url = if options.redis_cluster {
        let (nodes, pids) = start_redis_cluster(&mut children)?;
        redis_pids.extend(pids);
        Some(nodes.join(","))
    } else {
        None
    };
    let mut others = Vec::new();
    let mut run = |name: &'static str, bin: &str, envs: &[(&str, String)]| -> Result<()> {
        let child = ws
            .cargo()
            .args(["run", "--quiet", "--package", &package, "--bin", bin])
            .env("REDIS_URL", &redis_url)
            .envs(cluster_url.iter().map(|url| ("REDIS_CLUSTER_URL", url)))
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| fail(format!("cannot run cargo: {e}")))?;
        others.push(child.id());
        children.add(name, child);
        Ok(())
    };
    let metrics = has_metrics(step);
    for &port in &server_ports {
        // The page's own origin, and the proxy's, may open WebSockets.
        let mut envs = vec![
            ("PORT", port.to_string()),
            ("ALLOWED_ORIGINS", format!("http://127.0.0.1:{proxy_port}")),
        ];
        if metrics {
            envs.push(("METRICS", "1".to_owned()));
        }
        run("server", &package, &envs)?;
    }
    let worker = steps::bin_name(step, "worker");
    for _ in 0..WORKERS {
        run("worker", &worker, &[])?;
    }
    for pid in &redis_pids {
        if let Some(stopper) = steps::stop_redis_last(*pid, &others) {
            children.add("stopper", stopper);
        }
    }
    wait_for_ports(&server_ports, &mut children)?;

    let proxy_dir = match (&nginx, &template) {
        (Some(nginx), Some(template)) => Some(start_nginx(
            nginx,
            template,
            proxy_port,
            &server_ports,
            &mut children,
        )?),
        _ => None,
    };
    if proxy_dir.is_some() {
        wait_for_ports(&[proxy_port], &mut children)?;
    }

    println!(
        "\nThe cluster of step {}: {} server(s), {WORKERS} workers, {} Redis shard(s)",
        step.id,
        server_ports.len(),
        urls.len()
    );
    println!("  Redis:     REDIS_URL={redis_url}");
    if let Some(url) = &cluster_url {
        println!("  Cluster:   REDIS_CLUSTER_URL={url}   (the four channel layers)");
    }
    for (i, port) in server_ports.iter().enumerate() {
        let metrics = if metrics {
            format!("   (metrics: http://127.0.0.1:{port}/metrics)")
        } else {
            String::new()
        };
        println!("  server {}:  http://127.0.0.1:{port}{metrics}", i + 1);
    }
    match (&nginx, &template, &proxy_dir) {
        (_, _, Some(_)) => println!(
            "  nginx:     http://127.0.0.1:{proxy_port}   (spreads connections over the servers; \
             config from steps/{}/{PROXY_CONFIG})",
            step.dir_name()
        ),
        (None, _, _) => println!(
            "  no reverse proxy: nginx is not installed (`sudo apt-get install nginx-light`)"
        ),
        (_, _, None) => println!(
            "  no reverse proxy: steps/{} has no {PROXY_CONFIG}",
            step.dir_name()
        ),
    }
    println!(
        "Open a page of each server (or the proxy's twice): rooms, chat and notifications span \
         them all.\nPress Ctrl+C to stop them all."
    );
    // Ctrl+C reaches every process of the terminal, this one included; with
    // the flag, this one stays to see the others stop and say so.
    let interrupted = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&interrupted))
        .map_err(|e| fail(format!("cannot watch for Ctrl+C: {e}")))?;

    // A server that stops (or is killed) is what a cluster is for: the
    // others keep serving, and the proxy sends its clients to them. Anything
    // else stopping, or the last server, stops them all.
    let (name, status) = loop {
        if interrupted.load(Ordering::Relaxed) {
            return stop_after_ctrl_c(&mut children, server_ports.len());
        }
        let Some((name, status)) = children.take_exited() else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        // Ctrl+C stops the servers too: the signal reached this process
        // first, so the flag tells it from a server stopped on its own.
        if interrupted.load(Ordering::Relaxed) {
            return stop_after_ctrl_c(&mut children, server_ports.len());
        }
        if name == "server" && children.count("server") > 0 {
            println!(
                "A server stopped ({status}); the others keep serving ({} left).",
                children.count("server")
            );
            continue;
        }
        break (name, status);
    };
    children.stop_all();
    if status.success() {
        Ok(())
    } else {
        Err(fail(format!(
            "the {name} stopped ({status}); the others were stopped too"
        )))
    }
}

/// After Ctrl+C: the servers, workers and proxy stop in their own way (the
/// servers close their WebSockets with 1001 and leave their groups) within
/// their shutdown time, and whatever is still running then is killed; Redis,
/// out of reach of Ctrl+C, is stopped last.
fn stop_after_ctrl_c(children: &mut Children, servers: usize) -> Result<()> {
    println!("\nCtrl+C: stopping the cluster...");
    let deadline = Instant::now() + STOP_TIMEOUT;
    let running = |children: &Children| {
        children.len() - children.count("redis-server") - children.count("stopper")
    };
    while running(children) > 0 && Instant::now() < deadline {
        if children.take_exited().is_none() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let killed = running(children);
    children.stop_all();
    if killed == 0 {
        println!("Stopped: {servers} server(s), {WORKERS} workers, the proxy and Redis.");
    } else {
        println!(
            "Stopped: {servers} server(s), {WORKERS} workers, the proxy and Redis \
             ({killed} process(es) had to be killed after {} s).",
            STOP_TIMEOUT.as_secs()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::args;

    #[test]
    fn options_have_defaults_and_bounds() {
        assert_eq!(
            parse_options(args(&[])).unwrap(),
            Options {
                servers: 2,
                shards: 1,
                redis_cluster: false,
                step: None,
                port: None
            }
        );
        assert!(
            parse_options(args(&["--redis-cluster"]))
                .unwrap()
                .redis_cluster
        );
        let options =
            parse_options(args(&["--servers", "3", "--shards=2", "--step", "05"])).unwrap();
        assert_eq!((options.servers, options.shards), (3, 2));
        assert_eq!(options.step.as_deref(), Some("05"));
        for bad in [
            &["--servers", "0"][..],
            &["--shards", "17"],
            &["--port", "65535"],
            &["--port", "0"],
            &["extra"],
            &["--servers", "two"],
            &["--redis-cluster", "--shards", "2"],
        ] {
            assert!(parse_options(args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fills_in_the_proxy_template() {
        let template = "# fills @SERVERS@\nupstream s {\n    @SERVERS@\n}\n\
                        server {\n    listen @LISTEN@;\n}\n";
        assert_eq!(
            proxy_config(template, 9000, &[9001, 9002]),
            "# fills @SERVERS@\nupstream s {\n    server 127.0.0.1:9001;\n    \
             server 127.0.0.1:9002;\n}\nserver {\n    listen 127.0.0.1:9000;\n}\n"
        );
    }

    #[test]
    fn nginx_keeps_its_files_in_its_directory() {
        let config = nginx_main_config(Path::new("/tmp/x"));
        assert!(config.contains("pid /tmp/x/nginx.pid;"));
        assert!(config.contains("include /tmp/x/cluster.conf;"));
        assert!(!config.contains("/var/"));
    }
}
