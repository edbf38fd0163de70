//! The fan-out load generator of `cargo xtask bench fanout`: one sender and
//! `--receivers` receivers in one room, counting what reaches the
//! receivers.
//!
//! ```text
//! fanout --url ws://127.0.0.1:9003/ws/bench --receivers 100 --seconds 5
//! ```
//!
//! It assumes only that the endpoint is a room: every text a client sends
//! reaches every client, unchanged or inside a longer text (a step's room
//! puts `💬 ` in front). `--url` may list several URLs separated by commas,
//! for a room that spans server processes: the sender uses the first, and
//! the receivers take turns.
//!
//! 1. **Join.** The receivers connect first, then the sender, which sends
//!    `#probe;` every 50 ms until every connection (its own too) has heard
//!    one, so the run starts only once the whole room is in place (a layer
//!    may still be subscribing after the handshake).
//! 2. **Run.** For `--seconds`, the sender sends `#SEQ@MICROS;` padded to
//!    `--size` bytes, keeping at most `--window` (default 16) messages that
//!    someone in the room (the sender included) has not heard yet: a closed
//!    loop, so a slow server slows the sender instead of piling up
//!    messages, and a window below the layers' channel capacity (100) means
//!    a healthy server drops nothing.
//! 3. **Drain.** It sends `#end;` and gives the receivers up to 2 s more to
//!    hear everything that was sent, to count what never arrived.
//!
//! It prints one JSON line: deliveries (messages heard by receivers before
//! the end of the run) per second, messages sent, deliveries `missing`
//! after the drain (and the sender's own copies, `own_missing`),
//! connections `closed` early, whether the sender `stalled`, how busy its
//! own core was during the run (`cpu_busy`, 1.0 = all of it: then the
//! figure says more about the load generator than the server), and the
//! delivery latency (send to receipt by a receiver) p50/p99 in
//! microseconds, which with a full window is mostly the time a message
//! waits behind the others in flight. A message a layer drops shows up as `missing` and as
//! fewer deliveries, never as a hang: every wait has a deadline, and a
//! window that does not open within 2 s stops the run (`stalled: 1`).

#[path = "../args.rs"]
mod args;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use args::arg;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, Stream, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long one connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the whole room may take to hear the sender's probe.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the sender repeats its probe while the room is joining.
const PROBE_EVERY: Duration = Duration::from_millis(50);
/// How long the window may stay shut (or one send take) before the run is
/// declared stalled and stops.
const STALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the receivers get after the run to hear what was sent.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// What a receiver made of a text frame.
#[derive(Debug, PartialEq)]
enum Heard {
    Probe,
    Data {
        seq: u64,
        sent_us: u64,
    },
    End,
    /// Anything else the server says (a greeting, a notice): ignored.
    Other,
}

/// Finds the sender's marker, `#...;`, anywhere in the text.
fn parse(text: &str) -> Heard {
    let Some(start) = text.find('#') else {
        return Heard::Other;
    };
    let rest = &text[start + 1..];
    let Some(body) = rest.find(';').map(|end| &rest[..end]) else {
        return Heard::Other;
    };
    match body {
        "probe" => Heard::Probe,
        "end" => Heard::End,
        _ => match body.split_once('@') {
            Some((seq, sent)) => match (seq.parse(), sent.parse()) {
                (Ok(seq), Ok(sent_us)) => Heard::Data { seq, sent_us },
                _ => Heard::Other,
            },
            None => Heard::Other,
        },
    }
}

/// Message `seq`, sent `sent_us` microseconds after the start, padded with
/// `x` to `size` bytes.
fn payload(seq: u64, sent_us: u64, size: usize) -> String {
    let mut text = format!("#{seq}@{sent_us};");
    text.extend(std::iter::repeat_n('x', size.saturating_sub(text.len())));
    text
}

/// CPU time used by this process so far, in seconds, from
/// `/proc/self/stat` (Linux; `None` elsewhere). With the bench's pinning,
/// the share of the run it covers says whether the load generator's core
/// was the limit.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    ticks_of(&stat).map(|ticks| ticks as f64 / 100.0)
}

/// utime + stime of a `/proc/PID/stat` line, in clock ticks (USER_HZ,
/// 100 per second on Linux). The fields are counted after the `)` that
/// ends the command name, which may itself hold spaces.
fn ticks_of(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Receiver `i` connects to `urls[i % urls.len()]`.
fn receiver_url(urls: &[String], receiver: usize) -> &str {
    &urls[receiver % urls.len()]
}

/// What the sender and the receivers share.
struct Shared {
    /// Time zero of the `MICROS` in each message.
    start: Instant,
    /// Per receiver, and last the sender's own copies: one more than the
    /// highest sequence number heard (0 before any), or `u64::MAX` once the
    /// connection ended, so that a gone receiver does not hold the window
    /// shut.
    progress: Vec<AtomicU64>,
    /// Connections (receivers and the sender) that heard a probe.
    joined: AtomicUsize,
    /// Connections that ended before `#end;`.
    gone: AtomicUsize,
    /// The end of the run, set once the room has joined: deliveries after
    /// it are not counted as throughput.
    until: OnceLock<Instant>,
    /// Listeners wake the sender when they progress, join or go.
    wake: Notify,
}

/// What one receiver counted.
#[derive(Default)]
struct Tally {
    /// Data messages heard before the end of the run.
    in_run: u64,
    /// Data messages heard at all, the drain included.
    total: u64,
    /// Send-to-receipt times of the messages counted in `in_run`, in µs.
    latencies: Vec<u32>,
}

/// Reads one connection of the room until `#end;`, its end, or `stop`:
/// a receiver's, or the sender's own copies (`slot` = the receivers'
/// count).
async fn listen<S>(
    mut ws: S,
    slot: usize,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Tally
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let mut tally = Tally::default();
    let mut joined = false;
    loop {
        let next = tokio::select! {
            next = ws.next() => next,
            // The drain is over; whatever has not arrived is missing.
            _ = stop.changed() => return tally,
        };
        let text = match next {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => {
                shared.progress[slot].store(u64::MAX, Ordering::Relaxed);
                shared.gone.fetch_add(1, Ordering::Relaxed);
                shared.wake.notify_one();
                return tally;
            }
        };
        match parse(&text) {
            Heard::Data { seq, sent_us } => {
                let now = Instant::now();
                tally.total += 1;
                if shared.until.get().is_some_and(|until| now <= *until) {
                    tally.in_run += 1;
                    let latency = now.duration_since(shared.start).as_micros() as u64;
                    let latency = latency.saturating_sub(sent_us);
                    tally
                        .latencies
                        .push(latency.min(u64::from(u32::MAX)) as u32);
                }
                shared.progress[slot].fetch_max(seq + 1, Ordering::Relaxed);
                shared.wake.notify_one();
            }
            Heard::Probe if !joined => {
                joined = true;
                shared.joined.fetch_add(1, Ordering::Relaxed);
                shared.wake.notify_one();
            }
            Heard::End => return tally,
            Heard::Probe | Heard::Other => {}
        }
    }
}

async fn connect(url: &str) -> Result<Socket, String> {
    // No Nagle: the sender keeps several small messages in flight.
    let connecting = tokio_tungstenite::connect_async_with_config(url, None, true);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(err)) => Err(format!("cannot connect to {url}: {err}")),
        Err(_) => Err(format!(
            "{url} did not complete the handshake within {CONNECT_TIMEOUT:?}"
        )),
    }
}

type Sink = SplitSink<Socket, Message>;

async fn send(sink: &mut Sink, text: String) -> Result<(), String> {
    match tokio::time::timeout(STALL_TIMEOUT, sink.send(Message::text(text))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(format!("the sender's connection failed: {err}")),
        Err(_) => Err(format!(
            "one send took over {STALL_TIMEOUT:?}: the server stopped reading"
        )),
    }
}

/// Sends probes until every connection of the room (`members`: the
/// receivers and the sender) has heard one.
async fn join(sink: &mut Sink, shared: &Shared, members: usize) -> Result<(), String> {
    let deadline = Instant::now() + JOIN_TIMEOUT;
    loop {
        send(sink, "#probe;".to_owned()).await?;
        let next_probe = Instant::now() + PROBE_EVERY;
        loop {
            let gone = shared.gone.load(Ordering::Relaxed);
            if gone > 0 {
                return Err(format!(
                    "{gone} receiver(s) lost their connection while joining"
                ));
            }
            if shared.joined.load(Ordering::Relaxed) == members {
                return Ok(());
            }
            if tokio::time::timeout_at(next_probe, shared.wake.notified())
                .await
                .is_err()
            {
                break;
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "only {} of {members} connections heard the sender within {JOIN_TIMEOUT:?}: \
                 is this a room, where every client hears every text?",
                shared.joined.load(Ordering::Relaxed)
            ));
        }
    }
}

/// How the run ended.
struct Sent {
    messages: u64,
    stalled: bool,
}

/// Sends for the run, never more than `window` messages ahead of the
/// slowest listener still connected. The sender's own copies count too:
/// its consumer does twice the work of the others (it takes each message
/// in and hears it back), and a sender that ran ahead of it would only
/// fill its channel.
async fn run_sender(
    sink: &mut Sink,
    shared: &Shared,
    until: Instant,
    window: u64,
    size: usize,
) -> Result<Sent, String> {
    let mut seq = 0;
    while Instant::now() < until {
        let stall_at = Instant::now() + STALL_TIMEOUT;
        loop {
            let slowest = shared
                .progress
                .iter()
                .map(|p| p.load(Ordering::Relaxed))
                .min()
                .unwrap_or(u64::MAX);
            if slowest.saturating_add(window) > seq {
                break;
            }
            let now = Instant::now();
            if now >= until {
                return Ok(Sent {
                    messages: seq,
                    stalled: false,
                });
            }
            if now >= stall_at {
                let behind = shared
                    .progress
                    .iter()
                    .filter(|p| p.load(Ordering::Relaxed).saturating_add(window) <= seq)
                    .count();
                eprintln!(
                    "fanout: stalled: {behind} connection(s) heard nothing new for {STALL_TIMEOUT:?} \
                     with the window of {window} full, at message {seq}; stopping the run"
                );
                return Ok(Sent {
                    messages: seq,
                    stalled: true,
                });
            }
            // A wake-up between the check and this wait is kept by Notify
            // as a permit, so none is missed.
            let _ = tokio::time::timeout_at(stall_at.min(until), shared.wake.notified()).await;
        }
        let sent_us = shared.start.elapsed().as_micros() as u64;
        send(sink, payload(seq, sent_us, size)).await?;
        seq += 1;
    }
    Ok(Sent {
        messages: seq,
        stalled: false,
    })
}

/// The result, as the one JSON line `cargo xtask bench` reads.
struct Report {
    receivers: usize,
    seconds: f64,
    window: u64,
    sent: u64,
    deliveries: u64,
    /// Deliveries to the receivers that never arrived.
    missing: u64,
    /// The sender's own copies that never arrived.
    own_missing: u64,
    /// Connections that ended before the end of the run.
    closed: usize,
    /// This process's CPU time during the run over the run's duration (1.0:
    /// all of one core), or `None` where it cannot be read.
    cpu_busy: Option<f64>,
    stalled: bool,
    p50_us: u32,
    p99_us: u32,
}

impl Report {
    fn json(&self) -> String {
        format!(
            "{{\"receivers\":{},\"seconds\":{:.1},\"window\":{},\"sent\":{},\"deliveries\":{},\
             \"deliveries_per_s\":{:.1},\"missing\":{},\"own_missing\":{},\"closed\":{},\"stalled\":{},\
             \"cpu_busy\":{:.2},\"p50_us\":{},\"p99_us\":{}}}",
            self.receivers,
            self.seconds,
            self.window,
            self.sent,
            self.deliveries,
            self.deliveries as f64 / self.seconds,
            self.missing,
            self.own_missing,
            self.closed,
            u8::from(self.stalled),
            // -1: unknown.
            self.cpu_busy.unwrap_or(-1.0),
            self.p50_us,
            self.p99_us,
        )
    }
}

/// The value at `p` (0 to 1) of sorted values, 0 if there are none.
fn percentile(sorted: &[u32], p: f64) -> u32 {
    let index = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(index).copied().unwrap_or(0)
}

async fn run(
    urls: Vec<String>,
    receivers: usize,
    seconds: f64,
    size: usize,
    window: u64,
) -> Result<Report, String> {
    // Slots 0..receivers are the receivers; slot `receivers` is the sender.
    let members = receivers + 1;
    let shared = Arc::new(Shared {
        start: Instant::now(),
        progress: (0..members).map(|_| AtomicU64::new(0)).collect(),
        joined: AtomicUsize::new(0),
        gone: AtomicUsize::new(0),
        until: OnceLock::new(),
        wake: Notify::new(),
    });
    let (stop, stopped) = watch::channel(false);
    let mut listening = Vec::with_capacity(members);
    for slot in 0..receivers {
        let ws = connect(receiver_url(&urls, slot)).await?;
        listening.push(tokio::spawn(listen(
            ws,
            slot,
            shared.clone(),
            stopped.clone(),
        )));
    }
    // The sender hears its own messages too, on the read half of its
    // connection.
    let (mut sink, own_copies) = connect(&urls[0]).await?.split();
    listening.push(tokio::spawn(listen(
        own_copies,
        receivers,
        shared.clone(),
        stopped,
    )));

    join(&mut sink, &shared, members).await?;
    let (started, cpu_before) = (Instant::now(), cpu_seconds());
    let until = started + Duration::from_secs_f64(seconds);
    let _ = shared.until.set(until);
    let sent = run_sender(&mut sink, &shared, until, window, size).await?;
    let cpu_busy = match (cpu_before, cpu_seconds()) {
        (Some(before), Some(after)) => Some((after - before) / started.elapsed().as_secs_f64()),
        _ => None,
    };
    // Best effort: a listener that misses it stops at the drain's deadline.
    let _ = send(&mut sink, "#end;".to_owned()).await;

    let drain_until = Instant::now().max(until) + DRAIN_TIMEOUT;
    let mut tallies = Vec::with_capacity(members);
    for mut task in listening {
        let tally = match tokio::time::timeout_at(drain_until, &mut task).await {
            Ok(tally) => tally,
            Err(_) => {
                // Drain over: every listener still waiting stops now.
                let _ = stop.send(true);
                task.await
            }
        };
        tallies.push(tally.map_err(|err| format!("a listener failed: {err}"))?);
    }
    let own = tallies.pop().unwrap_or_default();

    let deliveries: u64 = tallies.iter().map(|t| t.in_run).sum();
    let heard: u64 = tallies.iter().map(|t| t.total).sum();
    let mut latencies: Vec<u32> = tallies.into_iter().flat_map(|t| t.latencies).collect();
    latencies.sort_unstable();
    Ok(Report {
        receivers,
        seconds,
        window,
        sent: sent.messages,
        deliveries,
        missing: (sent.messages * receivers as u64).saturating_sub(heard),
        own_missing: sent.messages.saturating_sub(own.total),
        closed: shared.gone.load(Ordering::Relaxed),
        stalled: sent.stalled,
        cpu_busy,
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
    })
}

fn main() {
    let urls: String = arg("url", "ws://127.0.0.1:9003/ws/bench".to_owned());
    let receivers: usize = arg("receivers", 100);
    let seconds: f64 = arg("seconds", 5.0);
    let size: usize = arg("size", 32);
    let window: u64 = arg("window", 16);
    let urls: Vec<String> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    if urls.is_empty() || receivers == 0 || window == 0 || seconds.is_nan() || seconds <= 0.0 {
        eprintln!("error: --url, and --receivers, --window and --seconds above 0, are needed");
        std::process::exit(2);
    }

    // One thread: the generator is pinned to one core and must not compete
    // with the server for the other.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run(urls, receivers, seconds, size, window)) {
        Ok(report) => println!("{}", report.json()),
        Err(err) => {
            eprintln!("fanout: {err}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_markers_anywhere_in_a_text() {
        assert_eq!(
            parse(&payload(42, 1234, 32)),
            Heard::Data {
                seq: 42,
                sent_us: 1234
            }
        );
        assert_eq!(payload(42, 1234, 32).len(), 32);
        assert_eq!(payload(123_456, 1_000_000, 4), "#123456@1000000;");
        // A step's room prefixes what it forwards.
        assert_eq!(parse("💬 #7@9;xxx"), Heard::Data { seq: 7, sent_us: 9 });
        assert_eq!(parse("💬 #probe;"), Heard::Probe);
        assert_eq!(parse("#end;"), Heard::End);
        for other in [
            "🚪 Someone joined room 'bench'",
            "#7@;",
            "#x@1;",
            "#7@9",
            "#probe",
        ] {
            assert_eq!(parse(other), Heard::Other, "{other}");
        }
    }

    #[test]
    fn receivers_take_turns_over_the_urls() {
        let urls = vec!["ws://a".to_owned(), "ws://b".to_owned()];
        let picked: Vec<&str> = (0..4).map(|i| receiver_url(&urls, i)).collect();
        assert_eq!(picked, ["ws://a", "ws://b", "ws://a", "ws://b"]);
    }

    #[test]
    fn reads_cpu_ticks_after_the_command_name() {
        let stat = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 37 0 0 20 0";
        assert_eq!(ticks_of(stat), Some(287));
        assert_eq!(ticks_of("42 (x) S 1"), None);
        if cfg!(target_os = "linux") {
            assert!(cpu_seconds().is_some());
        }
    }

    #[test]
    fn percentiles_of_sorted_values() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.5), 51);
        assert_eq!(percentile(&values, 0.99), 100);
        assert_eq!(percentile(&[], 0.5), 0);
    }
}
