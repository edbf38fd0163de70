//! The baseline of `cargo xtask bench fanout`: the plainest broadcast
//! server tokio-tungstenite and `tokio::sync::broadcast` allow, with no
//! framework and no channel layer. Every text a client sends goes to every
//! connected client, the sender included, as a room does.
//!
//! With `--batch true` a client's writer takes every message already
//! waiting for it (up to 32) and writes them in one go, as the
//! axum-channels runner does, rather than one write each: the bench runs
//! both, so the layers are compared with a bare server that writes the
//! same way as well as with the plainest one.
//!
//! `--read-buffer BYTES` sets tungstenite's read buffer (default: its own,
//! 128 KiB allocated per connection). The `scale` bench gives it the 2 KiB
//! that axum-channels' servers use, so that 100,000 of its connections fit
//! in memory and cost what the step's do.

#[path = "../args.rs"]
mod args;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Messages a slow client may fall behind before it misses some: the same
/// as the channel layers' default per-channel capacity, so the baseline
/// buffers no more than the servers it is compared with.
const CAPACITY: usize = 100;

/// With `--batch true`: the most messages written in one go, and the bytes
/// gathered before a write, as in axum-channels (`LAYER_BATCH` and the
/// default `write_buffer_size`).
const BATCH: usize = 32;
const WRITE_BUFFER: usize = 16 * 1024;

fn main() {
    let port: u16 = args::arg("port", 9002);
    let batch: bool = args::arg("batch", false);
    let read_buffer: usize = args::arg("read-buffer", WebSocketConfig::default().read_buffer_size);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
        let (room, _) = broadcast::channel::<Utf8Bytes>(CAPACITY);
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            // The servers measured against this one set TCP_NODELAY (see
            // axum_channels::serve); without it, Nagle's algorithm would
            // hold back the small frames of a busy room.
            let _ = stream.set_nodelay(true);
            let room = room.clone();
            tokio::spawn(async move {
                let config = WebSocketConfig::default()
                    .read_buffer_size(read_buffer)
                    .write_buffer_size(if batch { WRITE_BUFFER } else { 0 });
                let Ok(ws) =
                    tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
                else {
                    return;
                };
                // Subscribed before reading, so a client hears its own first
                // message.
                let mut hears = room.subscribe();
                let (mut to_client, mut from_client) = ws.split();
                let writer = tokio::spawn(async move {
                    loop {
                        match hears.recv().await {
                            Ok(text) if batch => {
                                let mut written = to_client.feed(Message::Text(text)).await;
                                for _ in 1..BATCH {
                                    let Ok(text) = hears.try_recv() else { break };
                                    if written.is_err() {
                                        break;
                                    }
                                    written = to_client.feed(Message::Text(text)).await;
                                }
                                if written.is_err() || to_client.flush().await.is_err() {
                                    break;
                                }
                            }
                            Ok(text) => {
                                if to_client.send(Message::Text(text)).await.is_err() {
                                    break;
                                }
                            }
                            // A client that fell behind misses what it
                            // missed, as a full channel would.
                            Err(RecvError::Lagged(_)) => continue,
                            Err(RecvError::Closed) => break,
                        }
                    }
                });
                while let Some(Ok(message)) = from_client.next().await {
                    if let Message::Text(text) = message {
                        let _ = room.send(text);
                    }
                }
                writer.abort();
            });
        }
    });
}
