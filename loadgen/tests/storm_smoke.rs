//! A small storm against a room server written here in a few lines, the
//! protocol of step 05's rooms without the library: 40 connections in rooms
//! of 4. It proves the storm client's phases and counts agree with a server
//! that loses nothing (every join and every leave heard, nothing failed),
//! so that `cargo xtask bench storm` fails here first rather than after a
//! release build and minutes of storm.

use std::collections::HashMap;
use std::net::TcpListener as StdListener;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

type Rooms = Arc<Mutex<HashMap<String, broadcast::Sender<String>>>>;

/// One member: subscribes, announces itself, forwards the room to its
/// client, and announces its departure when the client goes.
async fn member(stream: tokio::net::TcpStream, rooms: Rooms) {
    let mut path = String::new();
    // tungstenite's callback type sets the error, an HTTP response.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| {
        path = request.uri().path().to_owned();
        Ok(response)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    let room = path.trim_start_matches("/ws/room/").to_owned();
    let room_tx = rooms
        .lock()
        .unwrap()
        .entry(room.clone())
        .or_insert_with(|| broadcast::channel(1024).0)
        .clone();
    // Subscribed before announcing, as step 05 is.
    let mut heard = room_tx.subscribe();
    let _ = room_tx.send(format!("🚪 Someone joined room '{room}'"));
    let (mut to_client, mut from_client) = ws.split();
    loop {
        tokio::select! {
            said = heard.recv() => match said {
                Ok(text) => {
                    if to_client.send(Message::text(text)).await.is_err() {
                        break;
                    }
                }
                Err(_) => break,
            },
            read = from_client.next() => match read {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
    drop(heard);
    let _ = room_tx.send(format!("👋 Someone left room '{room}'"));
}

/// The number after `"key":` in the client's JSON line.
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
fn a_small_storm_on_a_room_server_that_loses_nothing() {
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = TcpListener::from_std(listener).unwrap();
            let rooms = Rooms::default();
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(member(stream, rooms.clone()));
            }
        });
    });

    let output = Command::new(env!("CARGO_BIN_EXE_storm"))
        .args(["--url", &format!("ws://127.0.0.1:{port}/ws/room/")])
        .args([
            "--connections",
            "40",
            "--in-flight",
            "8",
            "--room-size",
            "4",
        ])
        .args(["--join-wait", "5", "--leave-wait", "5"])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let phases: Vec<&str> = stdout.lines().filter(|l| l.starts_with("phase")).collect();
    assert_eq!(phases, ["phase storm", "phase drop", "phase done"]);
    let json = stdout.lines().find(|l| l.starts_with('{')).unwrap();
    // 10 rooms: 10 observers, 30 others, 3 in each room.
    assert_eq!(number(json, "rooms"), 10.0, "{json}");
    assert_eq!(number(json, "opened"), 40.0, "{json}");
    assert_eq!(number(json, "failed"), 0.0, "{json}");
    for heard in ["joins", "leaves"] {
        let expected = number(json, &format!("{heard}_expected"));
        assert_eq!(expected, 30.0, "{json}");
        assert_eq!(number(json, &format!("{heard}_heard")), expected, "{json}");
    }
    assert!(number(json, "leave_s") >= 0.0, "{json}");
    assert!(number(json, "p99_ms") >= number(json, "p50_ms"), "{json}");
    for zero in ["observers_unjoined", "observers_lost", "misrouted"] {
        assert_eq!(number(json, zero), 0.0, "{zero} in {json}");
    }
    assert!(json.contains("\"closed_early\":{}"), "{json}");
}
