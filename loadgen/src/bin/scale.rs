//! The load generator of `cargo xtask bench scale`: one process's share of
//! N connections in one group, spread over several servers, driven line by
//! line from standard input so that several of these processes act as one.
//!
//! ```text
//! scale --urls ws://127.0.0.1:P1/ws/analytics,ws://127.0.0.1:P2/ws/analytics \
//!       --connections 15000 --first 0 --sources 127.0.0.2,127.0.0.3 --in-flight 150 [--sender]
//! ```
//!
//! Connection `i` of this process is connection `first + i` of the whole
//! bench and goes to server `(first + i) % servers`, so the servers get
//! equal shares however the connections are split into processes. Each
//! binds one of `--sources` (loopback addresses: 127.0.0.2, 127.0.0.3, ...)
//! before connecting, so that no address runs out of local ports.
//!
//! Every connection is a task that reads whatever the server sends; a
//! `scale:SEQ:NS` in a text frame is a message of the bench (`NS`: when it
//! was sent, on CLOCK_MONOTONIC, which every process of the machine reads
//! the same, so a receiver in another process can take its latency). A
//! connection that ends comes back as a page would: after a jittered,
//! growing backoff, or after the `Retry-After` of a 503.
//!
//! Commands (one line each on stdin; each answered by one JSON line on
//! stdout, `{"event": COMMAND, ...}`):
//!
//! - `open`: opens every connection, at most `--in-flight` handshakes at a
//!   time, and answers once all are open (or `--open-wait` passed), with the
//!   seconds it took and the counts of `status`.
//! - `status`: connections open now (`connected`), handshakes since the last `mark` (a
//!   histogram of their times, from TCP connect to the `101`), failed
//!   handshakes and ended connections by cause.
//! - `mark`: starts a new period: resets those counts, and which
//!   connections count as "connected throughout" (those that do not end
//!   from now on).
//! - `send FIRST COUNT INTERVAL_MS` (only with `--sender`, whose connection
//!   0 is the sender): sends messages FIRST, FIRST+1, ... one every
//!   INTERVAL_MS. A message counts as sent once the sender has heard it
//!   back from the group; one not heard within 10 s is sent again (a member
//!   keeps the first copy it gets), at most 5 times; then it is `unsent`.
//! - `report FIRST COUNT WAIT_S`: waits until every connection owed
//!   messages FIRST..FIRST+COUNT has heard them, at most WAIT_S, then gives
//!   per message: how many connections heard it, how many owed it did not
//!   (`missing`), the slowest delivery, and a histogram. A connection is
//!   owed a message when it was open from before it was sent until 5 s
//!   after (in a rolling restart every connection ends once, so none is
//!   connected throughout); `throughout` counts those that never ended.
//! - `close`: closes every connection with a close frame, and answers once
//!   the servers have answered.
//!
//! Histograms are `[[LOW_US, COUNT], ...]`: 32 buckets per power of two, so
//! a value is at most about 3% above its bucket's low edge.

#[path = "../args.rs"]
mod args;

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use args::arg;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

type Socket = WebSocketStream<TcpStream>;

/// The most messages one run can tell apart (sequence numbers 0 to 1023).
const MAX_SEQ: usize = 1024;
const WORDS: usize = MAX_SEQ / 64;
/// What marks a message of the bench in a frame.
const MARK: &str = "scale:";
/// How long a handshake may take before it counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// The first and the longest wait before connecting again (before jitter).
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// How long the sender waits to hear its own message before sending again,
/// and how often it tries before it gives up on that message (a server
/// whose `group_send` keeps failing must not hang the bench). Not less:
/// each copy sent again is one more broadcast to every member, and at
/// 100,000 members on a busy machine a 3 s wait sent 64 of 60 messages
/// again, which slowed every later one (a spiral, not a measurement).
const ECHO_WAIT: Duration = Duration::from_secs(10);
const TRIES: u32 = 5;
/// How long after a message was sent a connection must have stayed open to
/// be owed it (see `Shared::tally`): one that ends sooner may lose it with
/// its server, and comes back with a new channel.
const OWED_FOR: Duration = Duration::from_secs(5);
/// Open files kept for everything but the connections.
const SPARE_FILES: usize = 64;

/// The CLOCK_MONOTONIC of the machine, in nanoseconds: one clock for every
/// process, unlike `Instant`, which cannot be handed to another process.
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A log-linear histogram of microseconds: exact below 64, then 32
/// buckets per power of two.
#[derive(Debug, Default, Clone)]
struct Histogram {
    buckets: BTreeMap<u64, u64>,
    count: u64,
    max: u64,
}

impl Histogram {
    fn low_edge(value: u64) -> u64 {
        if value < 64 {
            return value;
        }
        let shift = 63 - value.leading_zeros() - 5;
        (value >> shift) << shift
    }

    fn add(&mut self, value: u64) {
        *self.buckets.entry(Histogram::low_edge(value)).or_default() += 1;
        self.count += 1;
        self.max = self.max.max(value);
    }

    fn json(&self) -> String {
        let pairs: Vec<String> = self
            .buckets
            .iter()
            .map(|(low, count)| format!("[{low},{count}]"))
            .collect();
        format!("[{}]", pairs.join(","))
    }
}

/// Why a handshake failed or a connection ended, in a word or two, and the
/// `Retry-After` that came with it.
#[derive(Debug, PartialEq)]
struct Failure {
    cause: String,
    retry_after: Option<Duration>,
}

fn failure(err: &WsError) -> Failure {
    let cause = match err {
        WsError::Http(response) => {
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok())
                .map(Duration::from_secs);
            let status = response.status().as_u16();
            return Failure {
                cause: if retry_after.is_some() {
                    format!("http {status} retry-after")
                } else {
                    format!("http {status}")
                },
                retry_after,
            };
        }
        WsError::Io(err) => io_cause(err),
        WsError::Protocol(ProtocolError::HandshakeIncomplete) => "eof".to_owned(),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => "reset".to_owned(),
        WsError::Protocol(_) => "protocol".to_owned(),
        WsError::ConnectionClosed | WsError::AlreadyClosed => "eof".to_owned(),
        _ => "other".to_owned(),
    };
    Failure {
        cause,
        retry_after: None,
    }
}

fn io_cause(err: &io::Error) -> String {
    use io::ErrorKind::*;
    if err.raw_os_error() == Some(libc::EMFILE) {
        return "out of files".to_owned();
    }
    match err.kind() {
        ConnectionRefused => "refused",
        ConnectionReset | ConnectionAborted | BrokenPipe => "reset",
        UnexpectedEof => "eof",
        TimedOut => "timeout",
        AddrNotAvailable | AddrInUse => "no local port",
        other => return format!("io {other:?}"),
    }
    .to_owned()
}

/// The address of a `ws://HOST:PORT/path` URL (an IP address: the bench
/// runs on loopback and resolves nothing).
fn address_of(url: &str) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("{url}: only ws:// URLs"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    authority
        .parse()
        .map_err(|_| format!("{url}: want ws://IP:PORT/path"))
}

/// `scale:SEQ:NS` somewhere in `text`.
fn parse_mark(text: &str) -> Option<(usize, u64)> {
    let rest = &text[text.find(MARK)? + MARK.len()..];
    let (seq, rest) = rest.split_once(':')?;
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    Some((seq.parse().ok()?, rest[..end].parse().ok()?))
}

/// The text the sender sends: the mark alone, or in the JSON that
/// `/ws/notifications` reads.
fn payload(seq: usize, json: bool) -> String {
    let mark = format!("{MARK}{seq}:{}", now_ns());
    if json {
        format!("{{\"message\":\"{mark}\"}}")
    } else {
        mark
    }
}

/// A wait before connecting again: `Retry-After` if the server gave one,
/// otherwise from 0.5 s doubling to 8 s; either with up to 100% jitter so
/// that the clients of a stopped server do not come back all at once.
fn backoff(attempt: u32, retry_after: Option<Duration>, random: u64) -> Duration {
    let base = retry_after.unwrap_or_else(|| {
        BACKOFF_MIN
            .saturating_mul(1 << attempt.min(5))
            .min(BACKOFF_MAX)
    });
    base + base.mul_f64((random % 1000) as f64 / 1000.0)
}

/// A small xorshift: jitter only needs to differ between connections.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// What the connections and the commands share. One thread runs them all,
/// so the lock is never contended.
#[derive(Default)]
struct Counts {
    /// Per connection, the messages it heard (a bit per sequence number).
    heard: Vec<[u64; WORDS]>,
    /// Per connection, whether it ended since the last `mark`.
    ended: Vec<bool>,
    /// Per connection, when it was open since the last `mark` (CLOCK_MONOTONIC
    /// ns; no end while it still is).
    spans: Vec<Vec<(u64, Option<u64>)>>,
    /// Per message, when it was sent (0 until a connection here heard it).
    sent: Vec<u64>,
    /// Per connection, whether it was ever open.
    opened: Vec<bool>,
    /// Per message, its deliveries' latencies.
    deliveries: Vec<Histogram>,
    handshakes: Histogram,
    failed: BTreeMap<String, u64>,
    drops: BTreeMap<String, u64>,
}

struct Shared {
    counts: Mutex<Counts>,
    open: AtomicUsize,
    ever_opened: AtomicUsize,
    closing: AtomicBool,
    /// Messages the sender has heard back (the highest + 1).
    echoed: AtomicU64,
}

impl Shared {
    fn new(connections: usize) -> Shared {
        Shared {
            counts: Mutex::new(Counts {
                heard: vec![[0; WORDS]; connections],
                ended: vec![false; connections],
                spans: vec![Vec::new(); connections],
                sent: vec![0; MAX_SEQ],
                opened: vec![false; connections],
                deliveries: vec![Histogram::default(); MAX_SEQ],
                ..Counts::default()
            }),
            open: AtomicUsize::new(0),
            ever_opened: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            echoed: AtomicU64::new(0),
        }
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn heard(&self, connection: usize, text: &str) {
        let received = now_ns();
        let Some((seq, sent)) = parse_mark(text) else {
            return;
        };
        if seq >= MAX_SEQ {
            return;
        }
        let mut counts = self.counts();
        let word = &mut counts.heard[connection][seq / 64];
        let bit = 1 << (seq % 64);
        if *word & bit != 0 {
            // A copy of a message sent again: the first one counted.
            return;
        }
        *word |= bit;
        counts.sent[seq] = sent;
        let micros = received.saturating_sub(sent) / 1000;
        counts.deliveries[seq].add(micros);
    }

    fn status(&self) -> String {
        let counts = self.counts();
        format!(
            "\"connected\":{},\"ever_opened\":{},\"handshakes\":{},\"handshake_max_us\":{},\
             \"handshake_hist\":{},\"failed\":{},\"ended\":{}",
            self.open.load(Ordering::Relaxed),
            self.ever_opened.load(Ordering::Relaxed),
            counts.handshakes.count,
            counts.handshakes.max,
            counts.handshakes.json(),
            json_counts(&counts.failed),
            json_counts(&counts.drops),
        )
    }

    fn mark(&self) {
        let mut counts = self.counts();
        counts.ended.iter_mut().for_each(|ended| *ended = false);
        for spans in &mut counts.spans {
            spans.retain(|(_, end)| end.is_none());
        }
        counts.handshakes = Histogram::default();
        counts.failed.clear();
        counts.drops.clear();
    }

    /// Per message of `seqs`: heard by, and missing among the connections
    /// that were owed it; and whether none is missing.
    ///
    /// A connection is owed a message when one connection of it was open
    /// from before the message was sent until [`OWED_FOR`] after (its
    /// member was in the group, and stayed): in a rolling restart every
    /// connection ends once, so "connected since the mark" would be none
    /// of them, and say nothing. A message nobody here heard has no known
    /// send time: then it is owed to those connected since the mark.
    fn tally(&self, seqs: &std::ops::Range<usize>) -> (Vec<(usize, usize)>, bool) {
        let counts = self.counts();
        let mut complete = true;
        let rows = seqs
            .clone()
            .map(|seq| {
                let bit = 1 << (seq % 64);
                let sent = counts.sent[seq];
                let owed_from = sent.saturating_add(OWED_FOR.as_nanos() as u64);
                let mut heard = 0;
                let mut missing = 0;
                for ((words, ended), spans) in
                    counts.heard.iter().zip(&counts.ended).zip(&counts.spans)
                {
                    let owed = if sent == 0 {
                        !ended
                    } else {
                        spans.iter().any(|&(start, end)| {
                            start <= sent && end.is_none_or(|end| end >= owed_from)
                        })
                    };
                    if words[seq / 64] & bit != 0 {
                        heard += 1;
                    } else if owed {
                        missing += 1;
                    }
                }
                complete &= missing == 0;
                (heard, missing)
            })
            .collect();
        (rows, complete)
    }
}

fn json_counts(counts: &BTreeMap<String, u64>) -> String {
    let pairs: Vec<String> = counts
        .iter()
        .map(|(cause, n)| format!("\"{cause}\":{n}"))
        .collect();
    format!("{{{}}}", pairs.join(","))
}

/// One connection's place in the bench.
struct Member {
    index: usize,
    url: String,
    address: SocketAddr,
    source: IpAddr,
    shared: Arc<Shared>,
    places: Arc<Semaphore>,
    closing: watch::Receiver<bool>,
    /// For the sender only: the messages to send.
    sends: Option<mpsc::UnboundedReceiver<usize>>,
    json: bool,
}

impl Member {
    /// Opens a connection from `source`, timed from the TCP connect to the
    /// `101`.
    async fn connect(&self) -> Result<(Socket, Duration), Failure> {
        let _place = self.places.acquire().await;
        let started = Instant::now();
        let io = |err: io::Error| Failure {
            cause: io_cause(&err),
            retry_after: None,
        };
        let attempt = async {
            let socket = TcpSocket::new_v4().map_err(io)?;
            socket.bind(SocketAddr::new(self.source, 0)).map_err(io)?;
            let stream = socket.connect(self.address).await.map_err(io)?;
            let _ = stream.set_nodelay(true);
            // Small buffers: tungstenite's 128 KiB read buffer, allocated
            // up front, would cost 2 GB per 16,000 clients. And no larger
            // than the bench's frames need (a frame that does not fit
            // grows it): tungstenite zero-fills the free part of the
            // buffer before every read, two reads a frame, and with 4 KiB
            // that filling was a fifth of this process's CPU in a
            // broadcast (`perf record`), on the cores the servers share.
            let config = WebSocketConfig::default()
                .read_buffer_size(512)
                .write_buffer_size(0);
            tokio_tungstenite::client_async_with_config(self.url.as_str(), stream, Some(config))
                .await
                .map_err(|err| failure(&err))
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await {
            Ok(Ok((socket, _))) => Ok((socket, started.elapsed())),
            Ok(Err(failure)) => Err(failure),
            Err(_) => Err(Failure {
                cause: "timeout".to_owned(),
                retry_after: None,
            }),
        }
    }

    /// Connects, reads until the connection ends, and connects again, until
    /// the bench closes.
    async fn run(mut self) {
        let mut random = (self.index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut attempt = 0;
        while !self.shared.closing.load(Ordering::Relaxed) {
            let wait = match self.connect().await {
                Ok((socket, took)) => {
                    attempt = 0;
                    let first_time = {
                        let mut counts = self.shared.counts();
                        counts.handshakes.add(took.as_micros() as u64);
                        !std::mem::replace(&mut counts.opened[self.index], true)
                    };
                    if first_time {
                        self.shared.ever_opened.fetch_add(1, Ordering::Relaxed);
                    }
                    self.shared.open.fetch_add(1, Ordering::Relaxed);
                    self.shared.counts().spans[self.index].push((now_ns(), None));
                    let ended = self.hold(socket).await;
                    self.shared.open.fetch_sub(1, Ordering::Relaxed);
                    let Some(ended) = ended else { return };
                    let mut counts = self.shared.counts();
                    if let Some(span) = counts.spans[self.index].last_mut() {
                        span.1 = Some(now_ns());
                    }
                    counts.ended[self.index] = true;
                    *counts.drops.entry(ended).or_default() += 1;
                    backoff(0, None, next_random(&mut random))
                }
                Err(failure) => {
                    attempt += 1;
                    *self
                        .shared
                        .counts()
                        .failed
                        .entry(failure.cause)
                        .or_default() += 1;
                    backoff(attempt, failure.retry_after, next_random(&mut random))
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.closing.changed() => {}
            }
        }
    }

    /// Reads what the server sends (and, for the sender, sends), until the
    /// connection ends (`Some(cause)`) or the bench closes it (`None`).
    async fn hold(&mut self, mut socket: Socket) -> Option<String> {
        // One wait for the bench's close for the connection's life: made
        // again at every frame, its registration with the watch channel
        // was a measurable share of this process's CPU in a broadcast.
        let mut closing = self.closing.clone();
        let closed = closing.changed();
        tokio::pin!(closed);
        loop {
            let send = async {
                match self.sends.as_mut() {
                    Some(sends) => sends.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                frame = socket.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        self.shared.heard(self.index, &text);
                        if self.sends.is_some() && let Some((seq, _)) = parse_mark(&text) {
                            self.shared.echoed.fetch_max(seq as u64 + 1, Ordering::Relaxed);
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        // tungstenite answers it; the stream ends next.
                        let code = frame.map_or(1005, |f| u16::from(f.code));
                        while let Some(Ok(_)) = socket.next().await {}
                        return Some(format!("closed {code}"));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => return Some(failure(&err).cause),
                    None => return Some("eof".to_owned()),
                },
                seq = send => {
                    // The channel lives as long as `main`'s sender.
                    let Some(seq) = seq else { continue };
                    if let Err(err) = socket.send(Message::text(payload(seq, self.json))).await {
                        return Some(failure(&err).cause);
                    }
                }
                _ = &mut closed => {
                    let _ = socket.close(None).await;
                    let drain = async { while let Some(Ok(_)) = socket.next().await {} };
                    let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
                    return None;
                }
            }
        }
    }
}

struct Options {
    urls: Vec<String>,
    connections: usize,
    first: usize,
    sources: Vec<IpAddr>,
    in_flight: usize,
    sender: bool,
    json: bool,
    open_wait: Duration,
}

fn options() -> Result<Options, String> {
    let urls: String = arg("urls", String::new());
    let urls: Vec<String> = urls
        .split(',')
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    if urls.is_empty() {
        return Err("--urls: give at least one ws://IP:PORT/path".to_owned());
    }
    for url in &urls {
        address_of(url)?;
    }
    let sources: String = arg("sources", "127.0.0.1".to_owned());
    let sources = sources
        .split(',')
        .map(|s| s.parse().map_err(|_| format!("--sources: {s} is no IP")))
        .collect::<Result<Vec<IpAddr>, String>>()?;
    let args: Vec<String> = std::env::args().collect();
    Ok(Options {
        urls,
        connections: arg("connections", 100),
        first: arg("first", 0),
        sources,
        in_flight: arg::<usize>("in-flight", 100).max(1),
        sender: args.iter().any(|a| a == "--sender"),
        json: args.iter().any(|a| a == "--json"),
        open_wait: Duration::from_secs(arg("open-wait", 300)),
    })
}

/// The three numbers after a command's name.
fn three(words: &[&str]) -> Option<(u64, u64, u64)> {
    match words {
        [a, b, c] => Some((a.parse().ok()?, b.parse().ok()?, c.parse().ok()?)),
        _ => None,
    }
}

/// Waits until `done`, polling, for at most `wait`.
async fn wait_until(wait: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run(o: Options) -> Result<(), String> {
    let shared = Arc::new(Shared::new(o.connections));
    let places = Arc::new(Semaphore::new(o.in_flight));
    let (close_tx, close_rx) = watch::channel(false);
    let (send_tx, send_rx) = mpsc::unbounded_channel();
    let mut send_rx = o.sender.then_some(send_rx);
    let mut members = JoinSet::new();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            ["open"] => {
                let started = Instant::now();
                for index in 0..o.connections {
                    let global = o.first + index;
                    let url = o.urls[global % o.urls.len()].clone();
                    let member = Member {
                        index,
                        address: address_of(&url)?,
                        url,
                        source: o.sources[index % o.sources.len()],
                        shared: shared.clone(),
                        places: places.clone(),
                        closing: close_rx.clone(),
                        sends: if index == 0 { send_rx.take() } else { None },
                        json: o.json,
                    };
                    members.spawn(member.run());
                }
                let all = o.connections;
                wait_until(o.open_wait, || shared.open.load(Ordering::Relaxed) >= all).await;
                format!(
                    "\"seconds\":{:.3},{}",
                    started.elapsed().as_secs_f64(),
                    shared.status()
                )
            }
            ["status"] => shared.status(),
            ["mark"] => {
                shared.mark();
                String::new()
            }
            ["send", rest @ ..] if o.sender => {
                let Some((first, count, interval)) = three(rest) else {
                    return Err(format!("bad command: {line}"));
                };
                let (first, count) = (first as usize, count as usize);
                if first + count > MAX_SEQ {
                    return Err(format!("at most {MAX_SEQ} messages in a run"));
                }
                let interval = Duration::from_millis(interval);
                let started = Instant::now();
                let (mut resent, mut unsent) = (0, 0);
                for (k, seq) in (first..first + count).enumerate() {
                    tokio::time::sleep_until(started + interval * k as u32).await;
                    for tries in 1..=TRIES {
                        send_tx
                            .send(seq)
                            .map_err(|_| "the sender is gone".to_owned())?;
                        let heard = wait_until(ECHO_WAIT, || {
                            shared.echoed.load(Ordering::Relaxed) > seq as u64
                        })
                        .await;
                        if heard {
                            break;
                        }
                        if tries == TRIES {
                            unsent += 1;
                        } else {
                            resent += 1;
                        }
                    }
                }
                format!(
                    "\"first\":{first},\"count\":{count},\"resent\":{resent},\"unsent\":{unsent}"
                )
            }
            ["report", rest @ ..] => {
                let Some((first, count, wait)) = three(rest) else {
                    return Err(format!("bad command: {line}"));
                };
                let seqs = first as usize..(first + count).min(MAX_SEQ as u64) as usize;
                let started = Instant::now();
                wait_until(Duration::from_secs(wait), || shared.tally(&seqs).1).await;
                let waited = started.elapsed().as_secs_f64();
                let (rows, _) = shared.tally(&seqs);
                let counts = shared.counts();
                let throughout = counts.ended.iter().filter(|e| !**e).count();
                let messages: Vec<String> = seqs
                    .clone()
                    .zip(rows)
                    .map(|(seq, (heard, missing))| {
                        let h = &counts.deliveries[seq];
                        format!(
                            "{{\"seq\":{seq},\"heard\":{heard},\"missing\":{missing},\"max_us\":{},\"hist\":{}}}",
                            h.max,
                            h.json()
                        )
                    })
                    .collect();
                format!(
                    "\"waited_s\":{waited:.3},\"throughout\":{throughout},\"messages\":[{}]",
                    messages.join(",")
                )
            }
            ["close"] => {
                shared.closing.store(true, Ordering::Relaxed);
                let _ = close_tx.send(true);
                while members.join_next().await.is_some() {}
                String::new()
            }
            _ => return Err(format!("unknown command: {line:?}")),
        };
        let event = words.first().copied().unwrap_or("");
        if reply.is_empty() {
            println!("{{\"event\":\"{event}\"}}");
        } else {
            println!("{{\"event\":\"{event}\",{reply}}}");
        }
        if event == "close" {
            break;
        }
    }
    Ok(())
}

/// Raises the open-file limit's soft value to the hard one and returns it.
fn raise_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    limit.rlim_cur
}

fn main() {
    let options = match options() {
        Ok(options) => options,
        Err(err) => {
            eprintln!("scale: {err}");
            std::process::exit(2);
        }
    };
    let limit = raise_file_limit();
    let needed = options.connections + SPARE_FILES;
    if limit < needed as u64 {
        eprintln!(
            "scale: {} connections need {needed} open files, and this process may open {limit} \
             (the hard limit, `ulimit -Hn`); give this process fewer and start more processes",
            options.connections
        );
        std::process::exit(2);
    }
    // One thread: many of these share the machine with the servers, and the
    // operating system spreads processes better than one of them would.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Err(err) = runtime.block_on(run(options)) {
        eprintln!("scale: {err}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {

    /// Who is owed a message in a rolling restart: a connection open from
    /// before it was sent until 5 s after, and no other.
    #[test]
    fn a_message_is_owed_to_connections_open_across_it() {
        let shared = Shared::new(4);
        let s = 1_000_000_000u64;
        {
            let mut counts = shared.counts();
            counts.sent[7] = 100 * s;
            counts.spans[0] = vec![(50 * s, None)]; // open across it
            counts.spans[1] = vec![(50 * s, Some(101 * s)), (103 * s, None)]; // its server stopped
            counts.spans[2] = vec![(50 * s, Some(110 * s))]; // across it, then gone
            counts.spans[3] = vec![(101 * s, None)]; // came after it
            counts.ended[1] = true;
            counts.ended[2] = true;
        }
        assert_eq!(
            shared.tally(&(7..8)).0,
            vec![(0, 2)],
            "0 and 2 were owed it"
        );
        shared.counts().heard[0][0] |= 1 << 7;
        shared.counts().heard[2][0] |= 1 << 7;
        let (rows, complete) = shared.tally(&(7..8));
        assert_eq!(rows, vec![(2, 0)]);
        assert!(complete);
        // Sent when nobody here heard it: owed to those never disconnected.
        assert_eq!(shared.tally(&(8..9)).0, vec![(0, 2)]);
    }

    use super::*;

    #[test]
    fn histogram_buckets_are_within_three_percent() {
        for value in [0, 1, 63, 64, 65, 1000, 123_456, 9_999_999] {
            let low = Histogram::low_edge(value);
            assert!(
                low <= value && value as f64 <= low as f64 * 1.032 + 1.0,
                "{value} {low}"
            );
        }
        let mut h = Histogram::default();
        h.add(5);
        h.add(5);
        h.add(1000);
        assert_eq!(h.json(), "[[5,2],[992,1]]");
        assert_eq!((h.count, h.max), (3, 1000));
    }

    #[test]
    fn reads_the_mark_in_any_frame() {
        assert_eq!(parse_mark("📊 Analytics: scale:7:123"), Some((7, 123)));
        assert_eq!(
            parse_mark(r#"{"type":"user","message":"🔔 Notification: scale:12:99"}"#),
            Some((12, 99))
        );
        assert_eq!(parse_mark("🔔 Connected to notifications!"), None);
        assert_eq!(parse_mark("scale:x:1"), None);
        let json = payload(3, true);
        assert!(json.starts_with("{\"message\":\"scale:3:"), "{json}");
        assert_eq!(parse_mark(&json).map(|m| m.0), Some(3));
    }

    #[test]
    fn backs_off_with_jitter_and_honours_retry_after() {
        assert_eq!(backoff(0, None, 0), BACKOFF_MIN);
        assert_eq!(backoff(10, None, 0), BACKOFF_MAX);
        assert_eq!(backoff(1, None, 500), Duration::from_millis(1500));
        let retry = Some(Duration::from_secs(5));
        assert_eq!(backoff(3, retry, 0), Duration::from_secs(5));
        assert!(backoff(3, retry, 999) < Duration::from_secs(10));
    }

    #[test]
    fn reads_addresses_and_names_failures() {
        assert_eq!(
            address_of("ws://127.0.0.1:9000/ws/analytics"),
            Ok("127.0.0.1:9000".parse().unwrap())
        );
        assert!(address_of("wss://127.0.0.1:9000/").is_err());
        assert!(address_of("ws://localhost:9000/").is_err());
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(io_cause(&refused), "refused");
    }
}
