//! The baseline for `cargo xtask bench`: the plainest echo server
//! tokio-tungstenite allows, with no framework around it.

#[path = "../args.rs"]
mod args;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;

fn main() {
    let port: u16 = args::arg("port", 9001);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
}
