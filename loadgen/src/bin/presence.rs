//! The client of `cargo xtask bench presence`: what presence and history
//! cost on join and on a message, on a step's room endpoint, and how many
//! presence frames a join storm makes.
//!
//! `--url` is the endpoint without the room (`ws://…/ws/room/` for step
//! 05's room, `ws://…/ws/presence/` for step 06's); `--kind` says which
//! (`room` or `presence`), that is, what "joined" and "my message came
//! back" look like on it. It prints one line of JSON:
//!
//! - `join_ms`: `--joins` connections joining one room one after another,
//!   each timed from the start of its handshake until it is in (step 05:
//!   its own join announcement; step 06: its `history` frame), the room
//!   growing as they come;
//! - `message_ms`: one member of a room of `--members` says `--messages`
//!   things one after another, each timed until its own copy comes back;
//! - with `--storm N` (presence only): N connections join one room at once
//!   (`--in-flight` handshakes at a time), and every one of them counts the
//!   `presence_diff` frames it gets until the room is quiet; the naive
//!   count, one frame per join for every member already there, is
//!   N·(N−1)/2.

#[path = "../args.rs"]
mod args;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use args::arg;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long any one wait may take before the run is called failed.
const PATIENCE: Duration = Duration::from_secs(60);

/// How long the storm's room must stay without a diff to be called quiet.
const QUIET: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Room,
    Presence,
}

fn main() {
    let url: String = arg("url", "ws://127.0.0.1:8080/ws/presence/".to_owned());
    let kind = match arg("kind", "presence".to_owned()).as_str() {
        "room" => Kind::Room,
        "presence" => Kind::Presence,
        other => {
            eprintln!("error: --kind is room or presence, not {other:?}");
            std::process::exit(2);
        }
    };
    let joins: usize = arg("joins", 200);
    let members: usize = arg("members", 50);
    let messages: usize = arg("messages", 200);
    let storm_size: usize = arg("storm", 0);
    let in_flight: usize = arg("in-flight", 200);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("start the runtime");
    let result = runtime.block_on(async {
        let join = joining(&url, kind, joins).await?;
        let message = talking(&url, kind, members, messages).await?;
        let storm = if storm_size > 0 {
            Some(storming(&url, storm_size, in_flight).await?)
        } else {
            None
        };
        Ok::<_, String>((join, message, storm))
    });
    match result {
        Ok((join, message, storm)) => {
            let storm = storm.map_or("null".to_owned(), |(frames, seconds)| {
                format!(
                    "{{\"joins\": {storm_size}, \"diff_frames\": {frames}, \"naive\": {}, \"seconds\": {seconds:.2}}}",
                    storm_size * (storm_size - 1) / 2
                )
            });
            println!(
                "{{\"join_ms\": [{:.2}, {:.2}], \"message_ms\": [{:.2}, {:.2}], \"storm\": {storm}}}",
                join.0, join.1, message.0, message.1
            );
        }
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(1);
        }
    }
}

fn path(url: &str, kind: Kind, room: &str, name: &str) -> String {
    match kind {
        Kind::Room => format!("{url}{room}"),
        Kind::Presence => format!("{url}{room}?name={name}"),
    }
}

async fn connect(url: &str) -> Result<Socket, String> {
    let (socket, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .map_err(|_| format!("no handshake with {url} within {PATIENCE:?}"))?
        .map_err(|err| format!("cannot connect to {url}: {err}"))?;
    Ok(socket)
}

/// The next text frame.
async fn next_text(socket: &mut Socket) -> Result<String, String> {
    loop {
        let frame = tokio::time::timeout(PATIENCE, socket.next())
            .await
            .map_err(|_| format!("nothing within {PATIENCE:?}"))?;
        match frame {
            Some(Ok(Message::Text(text))) => return Ok(text.as_str().to_owned()),
            Some(Ok(_)) => continue,
            other => return Err(format!("the connection ended: {other:?}")),
        }
    }
}

/// Connects and waits until it is in the room.
async fn join(url: &str, kind: Kind, room: &str, name: &str) -> Result<Socket, String> {
    let mut socket = connect(&path(url, kind, room, name)).await?;
    loop {
        let text = next_text(&mut socket).await?;
        let joined = match kind {
            Kind::Room => text.starts_with("🚪"),
            Kind::Presence => text.contains("\"type\":\"history\""),
        };
        if joined {
            return Ok(socket);
        }
    }
}

/// Median and 99th percentile, in milliseconds.
fn percentiles(mut times: Vec<f64>) -> (f64, f64) {
    times.sort_by(f64::total_cmp);
    let rank = |share: f64| {
        let index = ((share * times.len() as f64).ceil() as usize).saturating_sub(1);
        times[index.min(times.len() - 1)]
    };
    (rank(0.5), rank(0.99))
}

async fn joining(url: &str, kind: Kind, joins: usize) -> Result<(f64, f64), String> {
    let mut sockets = Vec::with_capacity(joins);
    let mut times = Vec::with_capacity(joins);
    for n in 0..joins {
        let started = Instant::now();
        sockets.push(join(url, kind, "bench-join", &format!("j{n}")).await?);
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(percentiles(times))
}

async fn talking(
    url: &str,
    kind: Kind,
    members: usize,
    messages: usize,
) -> Result<(f64, f64), String> {
    // The others only read, so the server never waits on them.
    let mut others = Vec::new();
    for n in 1..members {
        let socket = join(url, kind, "bench-talk", &format!("m{n}")).await?;
        others.push(tokio::spawn(async move {
            let mut socket = socket;
            while let Some(Ok(_)) = socket.next().await {}
        }));
    }
    let mut sender = join(url, kind, "bench-talk", "m0").await?;
    let mut times = Vec::with_capacity(messages);
    for n in 0..messages {
        let text = format!("message {n}");
        let frame = match kind {
            Kind::Room => text.clone(),
            Kind::Presence => format!("{{\"type\":\"message\",\"text\":\"{text}\"}}"),
        };
        let started = Instant::now();
        sender
            .send(Message::text(frame))
            .await
            .map_err(|err| format!("cannot send: {err}"))?;
        let needle = match kind {
            Kind::Room => format!("💬 {text}"),
            Kind::Presence => format!("\"text\":\"{text}\""),
        };
        loop {
            let reply = next_text(&mut sender).await?;
            if reply.contains(&needle) {
                break;
            }
        }
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    for other in others {
        other.abort();
    }
    Ok(percentiles(times))
}

/// Returns the diff frames all members got, and the storm's seconds.
async fn storming(url: &str, connections: usize, in_flight: usize) -> Result<(u64, f64), String> {
    let frames = Arc::new(AtomicU64::new(0));
    let joined = Arc::new(AtomicUsize::new(0));
    let last_diff = Arc::new(std::sync::Mutex::new(Instant::now()));
    let gate = Arc::new(Semaphore::new(in_flight));
    let started = Instant::now();
    let mut members = Vec::with_capacity(connections);
    for n in 0..connections {
        let url = path(url, Kind::Presence, "bench-storm", &format!("s{n}"));
        let frames = Arc::clone(&frames);
        let last_diff = Arc::clone(&last_diff);
        let gate = Arc::clone(&gate);
        let joined = Arc::clone(&joined);
        members.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.expect("the gate stays open");
            let mut socket = connect(&url).await?;
            drop(permit);
            while let Some(Ok(frame)) = socket.next().await {
                let Message::Text(text) = frame else { continue };
                if text.contains("\"type\":\"presence_diff\"") {
                    frames.fetch_add(1, Ordering::Relaxed);
                    *last_diff.lock().unwrap() = Instant::now();
                } else if text.contains("\"type\":\"history\"") {
                    joined.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok::<_, String>(())
        }));
    }
    // Quiet: every connection is in, and no diff for a while.
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(done) = members.iter().position(|m| m.is_finished()) {
            let member = members.remove(done);
            member
                .await
                .map_err(|err| format!("a member's task failed: {err}"))??;
            return Err("a storm member's connection ended".into());
        }
        let quiet = last_diff.lock().unwrap().elapsed() > QUIET;
        if quiet && joined.load(Ordering::Relaxed) == connections {
            break;
        }
        if started.elapsed() > PATIENCE {
            return Err(format!("the storm did not settle within {PATIENCE:?}"));
        }
    }
    let seconds = started.elapsed().as_secs_f64() - QUIET.as_secs_f64();
    for member in members {
        member.abort();
    }
    Ok((frames.load(Ordering::Relaxed), seconds))
}
