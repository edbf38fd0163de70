//! The harnesses themselves, which every other test relies on: a
//! redis-server that stops, restarts and dies on its own port; nginx that
//! passes requests on to the servers it was given; a Redis Cluster that
//! forms, fails over and moves a slot; the Python virtualenv
//! found and run from this checkout; and the paths found at run time.
//!
//! `ServerProcess` is exercised by every step's `tests/shutdown.rs`, which
//! has a server binary to run; this crate has none.
//!
//! Without redis-server, nginx or python3 the tests that need them say so
//! and pass; with `CI=true` they fail.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use channels_testkit::paths::{scratch_dir, workspace_root};
use channels_testkit::python::{Impl, python};
use channels_testkit::{NodeInfo, RedisCluster, RedisServer, ReverseProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Whether something accepts connections on `port` of 127.0.0.1.
async fn listening(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).await.is_ok()
}

#[tokio::test]
async fn a_redis_server_stops_and_restarts_on_its_own_port() {
    let Some(mut server) = RedisServer::start().await else {
        return;
    };
    let port = server.port();
    assert_ne!(port, 6379, "never the machine's default port");
    assert_eq!(server.url(), format!("redis://127.0.0.1:{port}"));
    assert!(server.is_running());

    server.stop().await;
    assert!(!server.is_running());
    assert!(!listening(port).await, "nothing listens after stop()");
    server.restart().await;
    assert!(server.is_running());
    assert_eq!(server.port(), port, "restart() keeps the port");
    assert!(listening(port).await);

    server.kill().await;
    assert!(!server.is_running());
    assert!(!listening(port).await, "nothing listens after kill()");
    server.restart().await;
    let other = RedisServer::start().await.expect("a second server");
    assert_ne!(other.port(), port, "two servers, two ports");

    // Drop kills without waiting (it cannot await): the port is free soon
    // after, not at once.
    drop(server);
    let deadline = Instant::now() + Duration::from_secs(5);
    while listening(port).await {
        assert!(Instant::now() < deadline, "dropping the server kills it");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A server that answers every request with `hello from PORT` and closes.
async fn tiny_http_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let body = format!("hello from {}", addr.port());
            let mut request = [0; 1024];
            let _ = stream.read(&mut request).await;
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        }
    });
    addr
}

/// `GET /` on `addr`, the whole response as text.
async fn get(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .expect("a response within 5 s")
        .expect("read the response");
    response
}

#[tokio::test]
async fn a_reverse_proxy_passes_requests_on_to_its_servers() {
    let servers = [tiny_http_server().await, tiny_http_server().await];
    let template = "\
        # @SERVERS@ in a comment stays as it is\n\
        upstream app {\n\
        \x20   @SERVERS@\n\
        }\n\
        server {\n\
        \x20   listen @LISTEN@;\n\
        \x20   location / { proxy_pass http://app; }\n\
        }\n";
    let Some(proxy) = ReverseProxy::start(template, &servers).await else {
        return;
    };
    assert_eq!(proxy.ws_url("/ws"), format!("ws://{}/ws", proxy.addr()));
    // Round robin: two requests, one to each server.
    let mut answers = Vec::new();
    for _ in 0..2 {
        let response = get(proxy.addr()).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        answers.push(response.rsplit("\r\n").next().unwrap().to_owned());
    }
    answers.sort();
    let mut expected: Vec<String> = servers
        .iter()
        .map(|addr| format!("hello from {}", addr.port()))
        .collect();
    expected.sort();
    assert_eq!(answers, expected);
}

#[tokio::test]
async fn the_python_scripts_are_found_and_run_from_this_checkout() {
    let Some(python) = python("the_python_scripts_are_found_and_run_from_this_checkout").await
    else {
        return;
    };
    let output = python
        .script("peer.py")
        .arg("--help")
        .output()
        .await
        .expect("run peer.py");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("usage"),
        "{}\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // And a peer, which imports the pinned packages: one name, one host.
    let placed = python.consistent_hash(Impl::Fast, &["room"], &[1]).await;
    assert_eq!(placed, [("room".to_owned(), 1, 0)]);
}

#[test]
fn paths_are_found_at_run_time() {
    // Cargo runs this test in the package's directory, one below the root.
    let root = workspace_root();
    assert!(root.join("axum-channels/tests/interop/peer.py").is_file());
    assert_eq!(root, std::env::current_dir().unwrap().parent().unwrap());
    // The scratch directory is the `tmp/` of the target directory this test
    // was built into, whichever way it is found.
    let exe = std::env::current_exe().unwrap();
    let target = exe
        .ancestors()
        .find(|dir| dir.ends_with("deps"))
        .and_then(|deps| deps.parent()?.parent())
        .expect("a test binary lives in <target>/<profile>/deps");
    assert!(target.join("tmp").is_dir(), "cargo makes <target>/tmp");
    assert_eq!(
        scratch_dir().canonicalize().ok(),
        target.join("tmp").canonicalize().ok(),
        "{}",
        scratch_dir().display()
    );
}

#[tokio::test]
async fn a_redis_cluster_forms_fails_over_and_moves_slots() {
    let Some(mut cluster) = RedisCluster::start().await else {
        return;
    };
    let nodes = cluster.nodes().await;
    let masters: Vec<&NodeInfo> = nodes.iter().filter(|n| n.master).collect();
    assert_eq!((nodes.len(), masters.len()), (6, 3), "{nodes:?}");
    let served: u32 = masters
        .iter()
        .flat_map(|m| &m.slots)
        .map(|(a, b)| u32::from(b - a) + 1)
        .sum();
    assert_eq!(served, 16_384, "every slot has a master");
    assert_eq!(cluster.url().split(',').count(), 6);

    // An operator's failover: the replica becomes the master of the slots.
    let owner = cluster.master_of(0).await;
    cluster.failover(owner.port).await;
    let new_owner = cluster.master_of(0).await;
    assert_ne!(new_owner.port, owner.port);

    // A slot moved to another master is served there.
    let other = masters
        .iter()
        .find(|m| m.port != owner.port && m.port != new_owner.port)
        .expect("a third master");
    cluster.move_slot(0, other.port).await;
    assert_eq!(cluster.master_of(0).await.port, other.port);

    // A crash: the replica of the killed master takes over.
    let victim = cluster.master_of(16_383).await;
    cluster.kill(victim.port).await;
    cluster
        .wait_for_takeover(victim.port, Duration::from_secs(20))
        .await;
    let survivor = cluster.master_of(16_383).await;
    assert_ne!(survivor.port, victim.port);
    cluster.restart(victim.port).await;
    cluster.wait_until_ok(Duration::from_secs(20)).await;
}
