//! A closed-loop WebSocket load generator.
//!
//! `--clients` connections each send a `--size`-byte text message, wait for
//! the reply, and send again, for `--seconds`. It prints one JSON line with
//! the round trips per second and the latency percentiles, for
//! `cargo xtask bench` to compare against a baseline run the same way.
//! `--skip-first N` reads and ignores N greeting messages per connection
//! before measuring.

mod args;

use std::time::{Duration, Instant};

use args::arg;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn main() {
    let url: String = arg("url", "ws://127.0.0.1:8080/ws/system".to_owned());
    let clients: usize = arg("clients", 32);
    let seconds: f64 = arg("seconds", 5.0);
    let size: usize = arg("size", 32);
    let skip_first: usize = arg("skip-first", 0);

    // One thread: the generator is pinned to one core and must not compete
    // with the server for the other.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let latencies = runtime.block_on(run(url, clients, seconds, size, skip_first));

    let mut micros: Vec<u64> = latencies.into_iter().flatten().collect();
    micros.sort_unstable();
    let percentile = |p: f64| {
        micros
            .get(((micros.len() as f64 * p) as usize).min(micros.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{{\"round_trips\":{},\"seconds\":{seconds:.1},\"rps\":{:.1},\"p50_us\":{},\"p99_us\":{}}}",
        micros.len(),
        micros.len() as f64 / seconds,
        percentile(0.50),
        percentile(0.99),
    );
}

async fn run(
    url: String,
    clients: usize,
    seconds: f64,
    size: usize,
    skip_first: usize,
) -> Vec<Vec<u64>> {
    let mut connections = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (mut ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .unwrap_or_else(|err| panic!("cannot connect to {url}: {err}"));
        for _ in 0..skip_first {
            ws.next().await.expect("a greeting").expect("a greeting");
        }
        connections.push(ws);
    }
    // Every client starts together, after all are connected.
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let payload = "x".repeat(size);
    let tasks: Vec<_> = connections
        .into_iter()
        .map(|mut ws| {
            let payload = payload.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    ws.send(Message::text(payload.as_str()))
                        .await
                        .expect("send");
                    loop {
                        match ws.next().await {
                            Some(Ok(Message::Text(_) | Message::Binary(_))) => break,
                            Some(Ok(_)) => continue,
                            other => panic!("connection ended: {other:?}"),
                        }
                    }
                    latencies.push(sent.elapsed().as_micros() as u64);
                }
                let _ = ws.close(None).await;
                latencies
            })
        })
        .collect();
    let mut all = Vec::with_capacity(tasks.len());
    for task in tasks {
        all.push(task.await.expect("a client task"));
    }
    all
}
