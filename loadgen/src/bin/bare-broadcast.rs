//! The baseline of `cargo xtask bench fanout`: the plainest broadcast
//! server tokio-tungstenite and `tokio::sync::broadcast` allow, with no
//! framework and no channel layer. Every text a client sends goes to every
//! connected client, the sender included, as a room does.

#[path = "../args.rs"]
mod args;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Messages a slow client may fall behind before it misses some: the same
/// as the channel layers' default per-channel capacity, so the baseline
/// buffers no more than the servers it is compared with.
const CAPACITY: usize = 100;

fn main() {
    let port: u16 = args::arg("port", 9002);
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
                let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                // Subscribed before reading, so a client hears its own first
                // message.
                let mut hears = room.subscribe();
                let (mut to_client, mut from_client) = ws.split();
                let writer = tokio::spawn(async move {
                    loop {
                        match hears.recv().await {
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
