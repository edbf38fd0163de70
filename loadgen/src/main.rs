//! A closed-loop WebSocket load generator.
//!
//! `--clients` connections each send a `--size`-byte text message, wait for
//! the reply that contains it, and send again, for `--seconds`. It prints one
//! JSON line with the round trips per second and the latency percentiles, for
//! `cargo xtask bench` to compare against a baseline run the same way.
//!
//! Nothing about the endpoint is assumed beyond "it answers a text message
//! with a text that contains it". Before measuring, each client sends a probe
//! and reads until the probe's echo comes back, so whatever the server says
//! first (a greeting, a join notice) is skipped without loadgen knowing about
//! it; during the run, frames that don't contain the client's own message
//! (another client's broadcast) are skipped the same way.

mod args;

use std::time::{Duration, Instant};

use args::arg;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a new connection may take to echo its probe. A server that never
/// does is not an echo endpoint, and saying so beats hanging.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    let url: String = arg("url", "ws://127.0.0.1:8080/ws/system".to_owned());
    let clients: usize = arg("clients", 32);
    let seconds: f64 = arg("seconds", 5.0);
    let size: usize = arg("size", 32);

    // One thread: the generator is pinned to one core and must not compete
    // with the server for the other.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let latencies = runtime.block_on(run(url, clients, seconds, size));

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

/// This client's message: its number first, so that no two clients send the
/// same text and each can tell its own reply from anyone else's.
fn payload(client: usize, size: usize) -> String {
    let mut text = format!("{client}:");
    text.extend(std::iter::repeat_n('x', size.saturating_sub(text.len())));
    text
}

/// Sends `text` and reads until a text frame containing it comes back,
/// skipping every other frame.
async fn round_trip(ws: &mut Socket, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(reply))) if reply.contains(text) => return,
            Some(Ok(_)) => continue,
            other => panic!("connection ended: {other:?}"),
        }
    }
}

async fn run(url: String, clients: usize, seconds: f64, size: usize) -> Vec<Vec<u64>> {
    let mut connections = Vec::with_capacity(clients);
    for client in 0..clients {
        let (mut ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .unwrap_or_else(|err| panic!("cannot connect to {url}: {err}"));
        // The colon ends the number: "probe 1:" is no part of "probe 12:".
        let probe = format!("probe {client}:");
        tokio::time::timeout(PROBE_TIMEOUT, round_trip(&mut ws, &probe))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{url} did not echo a text message within {} s: not an echo endpoint?",
                    PROBE_TIMEOUT.as_secs()
                )
            });
        connections.push(ws);
    }
    // Every client starts together, after all are connected.
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = connections
        .into_iter()
        .enumerate()
        .map(|(client, mut ws)| {
            let text = payload(client, size);
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    round_trip(&mut ws, &text).await;
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

#[cfg(test)]
mod tests {
    use super::payload;

    #[test]
    fn payloads_are_distinct_and_sized() {
        assert_eq!(payload(7, 8), "7:xxxxxx");
        assert_eq!(payload(12, 32).len(), 32);
        assert_ne!(payload(1, 32), payload(2, 32));
        // A client number longer than the size still yields a distinct text.
        assert_eq!(payload(1234, 2), "1234:");
    }
}
