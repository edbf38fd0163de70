//! A quick run of the fan-out client against the bare broadcast server, as
//! `cargo xtask bench fanout` runs them, but small: three receivers for
//! half a second. It proves the two binaries agree on the protocol and that
//! the client's report is complete, so the bench fails here first rather
//! than after minutes of building and measuring.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the server when the test ends, passed or not.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The number after `"key":` in the client's flat JSON line.
fn number(json: &str, key: &str) -> f64 {
    let pattern = format!("\"{key}\":");
    let start = json
        .find(&pattern)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + pattern.len();
    let rest = &json[start..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].parse().unwrap()
}

#[test]
fn the_fanout_client_counts_every_delivery_of_a_bare_broadcast() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap()
        .port();
    let server = Command::new(env!("CARGO_BIN_EXE_bare-broadcast"))
        .args(["--port", &port.to_string()])
        .spawn()
        .unwrap();
    let _server = Killed(server);
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "bare-broadcast did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }

    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["--url", &format!("ws://127.0.0.1:{port}/")])
        .args(["--receivers", "3", "--seconds", "0.5"])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let json = String::from_utf8(output.stdout).unwrap();
    let (sent, deliveries) = (number(&json, "sent"), number(&json, "deliveries"));
    assert!(sent > 0.0, "{json}");
    // Deliveries in flight when the run ended are heard during the drain:
    // not counted, but not missing either.
    assert!(deliveries > 0.0 && deliveries <= 3.0 * sent, "{json}");
    for key in ["missing", "own_missing", "closed", "stalled"] {
        assert_eq!(number(&json, key), 0.0, "{key} in {json}");
    }
    assert!(number(&json, "p99_us") >= number(&json, "p50_us"), "{json}");
    // The drain ends when every receiver heard `#end;`, not at its deadline.
    assert!(started.elapsed() < Duration::from_secs(2), "{json}");
}
