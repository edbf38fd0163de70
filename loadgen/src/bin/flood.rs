//! A flood into a room of members that never read, so that `cargo xtask
//! bench flood` can read what it costs the server in memory.
//!
//! It opens `--members` connections to `--url` (a room) that read their
//! first frame and then nothing at all: their sockets fill, and everything
//! the room says to them waits in the server. One more client, the sender,
//! then sends `--size`-byte text messages for `--seconds` as fast as the
//! server takes them, reading (and dropping) what comes back so that it is
//! not a slow reader itself.
//!
//! It speaks one line at a time on standard output: `ready N` once the
//! members are in, `flooded {json}` when the sender stops (what it sent,
//! and whether and how the server closed it), and `closed` once the
//! members are gone. The bench reads the server's memory around them.

#[path = "../args.rs"]
mod args;

use std::time::{Duration, Instant};

use args::arg;
use futures_util::{SinkExt, StreamExt};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Connections opened at the same time.
const OPENING_AT_ONCE: usize = 100;

fn main() {
    let url: String = arg("url", "ws://127.0.0.1:8080/ws/room/flood".to_owned());
    let members: usize = arg("members", 200);
    let seconds: u64 = arg("seconds", 12);
    let size: usize = arg("size", 60 * 1024);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("start the runtime");
    if let Err(err) = runtime.block_on(run(url, members, Duration::from_secs(seconds), size)) {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

async fn run(url: String, members: usize, seconds: Duration, size: usize) -> Result<(), String> {
    let mut silent = Vec::with_capacity(members);
    let mut opening = JoinSet::new();
    let mut started = 0;
    while silent.len() < members {
        while started < members && opening.len() < OPENING_AT_ONCE {
            let url = url.clone();
            opening.spawn(async move {
                let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
                    .await
                    .map_err(|err| format!("cannot connect to {url}: {err}"))?;
                // The first frame says the server has set the member up;
                // after it, this member reads nothing more.
                match tokio::time::timeout(Duration::from_secs(30), socket.next()).await {
                    Ok(Some(Ok(_))) => Ok(socket),
                    _ => Err(format!("{url} sent no first frame")),
                }
            });
            started += 1;
        }
        match opening.join_next().await {
            Some(Ok(Ok(socket))) => silent.push(socket),
            Some(Ok(Err(err))) => return Err(err),
            Some(Err(err)) => return Err(err.to_string()),
            None => break,
        }
    }
    println!("ready {}", silent.len());

    let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .map_err(|err| format!("the sender cannot connect to {url}: {err}"))?;
    let (mut to_server, mut from_server) = socket.split();
    // The sender is in the room too: it reads everything, so that the
    // only slow readers are the silent members.
    let reader = tokio::spawn(async move {
        while let Some(Ok(message)) = from_server.next().await {
            if let Message::Close(frame) = message {
                return frame.map(|f| (u16::from(f.code), f.reason.to_string()));
            }
        }
        None
    });
    let text = "x".repeat(size);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut send_error = None;
    while started.elapsed() < seconds {
        let send = to_server.send(Message::text(text.clone()));
        match tokio::time::timeout(seconds.saturating_sub(started.elapsed()), send).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(err)) => {
                send_error = Some(err.to_string());
                break;
            }
            Err(_) => break,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = to_server.send(Message::Close(None)).await;
    let closed_by = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .ok()
        .and_then(|joined| joined.ok())
        .flatten();
    let (code, reason) = match closed_by {
        Some((code, reason)) if code != u16::from(CloseCode::Normal) => {
            (code.to_string(), format!("{reason:?}"))
        }
        _ => ("null".to_owned(), "null".to_owned()),
    };
    println!(
        "flooded {{\"sent\": {sent}, \"bytes\": {}, \"seconds\": {elapsed:.1}, \
         \"close_code\": {code}, \"close_reason\": {reason}, \"send_error\": {}}}",
        sent * size as u64,
        send_error.map_or("null".to_owned(), |e| format!("{e:?}")),
    );

    // The members go without a goodbye, as a closed laptop does.
    drop(silent);
    println!("closed");
    Ok(())
}
