//! A small run of the scale client against `room-server` (one group on the
//! in-memory layer, no greeting, no join notices), as `cargo xtask bench
//! scale` drives it, but with 300 connections in two processes: open,
//! broadcast, a server stopped with SIGTERM and started again on the same
//! port, the clients back, close. It proves the command protocol, the
//! cross-process clock and the reconnect path, so that the bench fails
//! here first rather than after a release build and minutes of handshakes.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills a child when the test ends, passed or not.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(port: u16) -> Killed {
    let mut command = Command::new(env!("CARGO_BIN_EXE_room-server"));
    command.args(["--layer", "memory", "--port", &port.to_string()]);
    listening(command, port)
}

/// A baseline server of the bench, as it starts them.
fn start_bare_server(port: u16) -> Killed {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bare-broadcast"));
    command.args(["--port", &port.to_string(), "--read-buffer", "2048"]);
    listening(command, port)
}

fn listening(mut command: Command, port: u16) -> Killed {
    let server = command.env("RUST_LOG", "error").spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{command:?} did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    Killed(server)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap()
        .port()
}

/// One `scale` process, spoken to line by line.
struct Client {
    _child: Killed,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    fn start(url: &str, first: usize, source: &str, sender: bool) -> Client {
        Client::start_with(url, 150, first, source, sender)
    }

    fn start_with(
        url: &str,
        connections: usize,
        first: usize,
        source: &str,
        sender: bool,
    ) -> Client {
        let mut command = Command::new(env!("CARGO_BIN_EXE_scale"));
        command
            .args(["--urls", url])
            .args(["--connections", &connections.to_string()])
            .args(["--first", &first.to_string(), "--sources", source])
            .args(["--in-flight", "50"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if sender {
            command.arg("--sender");
        }
        let mut child = command.spawn().unwrap();
        Client {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            _child: Killed(child),
        }
    }

    fn say(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
    }

    fn hear(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("{\"event\""), "{line:?}");
        line
    }

    fn ask(&mut self, command: &str) -> String {
        self.say(command);
        self.hear()
    }
}

/// The number after `"key":` in a JSON line (the first one).
fn number(json: &str, key: &str) -> f64 {
    let pattern = format!("\"{key}\":");
    let start = json
        .find(&pattern)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + pattern.len();
    let rest = &json[start..];
    let end = rest.find([',', '}', ']']).unwrap_or(rest.len());
    rest[..end].parse().unwrap()
}

#[test]
fn three_hundred_members_hear_every_broadcast_and_come_back_after_a_restart() {
    let port = free_port();
    let mut server = start_server(port);
    let url = format!("ws://127.0.0.1:{port}/ws/bench");
    let mut clients = [
        Client::start(&url, 0, "127.0.0.2", true),
        Client::start(&url, 150, "127.0.0.3,127.0.0.4", false),
    ];

    for client in &mut clients {
        client.say("open");
    }
    for client in &mut clients {
        let opened = client.hear();
        assert_eq!(number(&opened, "connected"), 150.0, "{opened}");
        assert_eq!(number(&opened, "handshakes"), 150.0, "{opened}");
        assert!(opened.contains("\"failed\":{}"), "{opened}");
        client.ask("mark");
    }

    let sent = clients[0].ask("send 0 3 50");
    assert_eq!(number(&sent, "resent"), 0.0, "{sent}");
    for client in &mut clients {
        let report = client.ask("report 0 3 10");
        assert_eq!(number(&report, "throughout"), 150.0, "{report}");
        assert_eq!(report.matches("\"heard\":150,\"missing\":0").count(), 3);
        // Latencies read off one clock in two processes: never negative,
        // so never the 0 that a clamped negative would give on every copy.
        assert!(number(&report, "max_us") > 0.0, "{report}");
    }

    // A rolling restart of one server: SIGTERM, then the same port again.
    for client in &mut clients {
        client.ask("mark");
    }
    // SAFETY: kill only sends a signal to the process we started.
    unsafe { libc::kill(server.0.id() as libc::pid_t, libc::SIGTERM) };
    let _ = server.0.wait();
    server = start_server(port);
    let deadline = Instant::now() + Duration::from_secs(30);
    for client in &mut clients {
        loop {
            let status = client.ask("status");
            if number(&status, "connected") == 150.0 {
                assert!(number(&status, "ever_opened") == 150.0, "{status}");
                // Every connection ended once, and came back once.
                assert_eq!(number(&status, "handshakes"), 150.0, "{status}");
                assert!(!status.contains("\"ended\":{}"), "{status}");
                assert!(!status.contains("http 5"), "{status}");
                break;
            }
            assert!(Instant::now() < deadline, "not all back: {status}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Back in the group: the next message reaches everyone (connected
    // throughout since a new mark).
    for client in &mut clients {
        client.ask("mark");
    }
    clients[0].ask("send 3 1 0");
    for client in &mut clients {
        let report = client.ask("report 3 1 10");
        assert!(report.contains("\"heard\":150,\"missing\":0"), "{report}");
    }

    for client in &mut clients {
        client.ask("close");
    }
    drop(server);
}

/// The bench's baseline: bare servers share nothing, so each gets a sender
/// of its own (connection `k` of the bench goes to server `k`), and all
/// send at once. Every member then hears each message once, from its own
/// server; with one sender, the members of the other server would hear
/// nothing and the baseline would measure half the room.
#[test]
fn bare_servers_each_with_a_sender_reach_every_member() {
    let ports = [free_port(), free_port()];
    let _servers = ports.map(start_bare_server);
    let urls = ports.map(|port| format!("ws://127.0.0.1:{port}/ws/bench"));
    let urls = urls.join(",");
    let mut members = [
        Client::start_with(&urls, 150, 0, "127.0.0.5", false),
        Client::start_with(&urls, 150, 150, "127.0.0.6", false),
    ];
    let mut senders: Vec<Client> = (0..2)
        .map(|k| Client::start_with(&urls, 1, k, &format!("127.0.0.{}", 7 + k), true))
        .collect();
    for client in senders.iter_mut().chain(&mut members) {
        let opened = client.ask("open");
        assert!(opened.contains("\"failed\":{}"), "{opened}");
        client.ask("mark");
    }

    for sender in &mut senders {
        sender.say("send 0 3 50");
    }
    for sender in &mut senders {
        let sent = sender.hear();
        assert_eq!(number(&sent, "unsent"), 0.0, "{sent}");
    }
    for client in &mut members {
        let report = client.ask("report 0 3 10");
        assert_eq!(
            report.matches("\"heard\":150,\"missing\":0").count(),
            3,
            "{report}"
        );
    }
    for client in senders.iter_mut().chain(&mut members) {
        client.ask("close");
    }
}
