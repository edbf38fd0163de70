//! Opens `--clients` idle WebSocket connections and holds them, so that
//! `cargo xtask bench` can read what they cost the server in memory.
//!
//! It speaks on standard output and listens on standard input, one line at
//! a time: once every connection is open and has read its first frame (so
//! the server has finished setting it up), it prints `ready`; on the line
//! `close` it closes them all, waits until the server has answered each
//! close, and prints `closed`. The bench reads the server's resident memory
//! at each of those points.

#[path = "../args.rs"]
mod args;

use std::time::Duration;

use args::arg;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

/// Connections opened at the same time. More would only fill the server's
/// listen backlog; fewer makes opening 10,000 slow.
const OPENING_AT_ONCE: usize = 200;

fn main() {
    let url: String = arg("url", "ws://127.0.0.1:8080/ws/system".to_owned());
    let clients: usize = arg("clients", 10_000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("start the runtime");
    if let Err(err) = runtime.block_on(run(url, clients)) {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

async fn run(url: String, clients: usize) -> Result<(), String> {
    let mut sockets = Vec::with_capacity(clients);
    let mut opening = JoinSet::new();
    let mut started = 0;
    while sockets.len() < clients {
        while started < clients && opening.len() < OPENING_AT_ONCE {
            let url = url.clone();
            opening.spawn(async move {
                let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
                    .await
                    .map_err(|err| format!("cannot connect to {url}: {err}"))?;
                // The first frame (a greeting) says the server is done with
                // the handshake.
                let first = tokio::time::timeout(Duration::from_secs(30), socket.next()).await;
                match first {
                    Ok(Some(Ok(_))) => Ok(socket),
                    _ => Err(format!("{url} sent no first frame")),
                }
            });
            started += 1;
        }
        match opening.join_next().await {
            Some(Ok(Ok(socket))) => sockets.push(socket),
            Some(Ok(Err(err))) => return Err(err),
            Some(Err(err)) => return Err(err.to_string()),
            None => break,
        }
    }
    println!("ready {}", sockets.len());

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim() == "close" {
            break;
        }
    }
    let mut closing = JoinSet::new();
    for mut socket in sockets {
        closing.spawn(async move {
            let _ = socket.send(Message::Close(None)).await;
            // Read until the server's answer ends the stream.
            while let Some(Ok(_)) = socket.next().await {}
        });
        // Keep the number of sockets being closed at once bounded too.
        while closing.len() >= OPENING_AT_ONCE {
            closing.join_next().await;
        }
    }
    while closing.join_next().await.is_some() {}
    println!("closed");
    Ok(())
}
