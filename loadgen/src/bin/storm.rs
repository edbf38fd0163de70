//! The reconnect-storm load generator of `cargo xtask bench storm`: many
//! connections arrive in a step's rooms at once, then all leave at once,
//! and one observer per room counts the announcements it hears.
//!
//! ```text
//! storm --url ws://127.0.0.1:PORT/ws/room/ --connections 18000 --in-flight 2000 --room-size 10
//! ```
//!
//! It speaks the protocol of step 05's `/ws/room/{name}` (appended to
//! `--url`): clients send nothing, and every member of a room hears
//! `🚪 Someone joined room 'NAME'` when anyone joins, itself included, and
//! `👋 Someone left room 'NAME'` when anyone else leaves.
//!
//! 1. **Observers.** One connection per room (`storm-0`, `storm-1`, ...;
//!    rooms = connections / room size, rounded up), at most `--in-flight`
//!    handshakes at a time. Each waits to hear its own join, which proves
//!    it is subscribed before anyone else arrives.
//! 2. **Arrival.** The other connections, all at once but at most
//!    `--in-flight` handshakes in flight, spread over the rooms in turn.
//!    Each handshake is timed from its TCP connect to the server's `101`
//!    (not counting its wait for a place among those in flight); a failed
//!    one is counted by cause: `http 503` (any status), `refused`, `reset`,
//!    `eof` (closed before answering), `timeout` (`--handshake-timeout`,
//!    30 s), `no local port`, `out of files`, `protocol`, `io KIND`.
//! 3. **Joins.** It waits until every observer has heard the join of every
//!    member of its room that opened, at most `--join-wait` (30 s).
//! 4. **Departure.** Every connection but the observers is dropped at once,
//!    *without* a close frame: the socket is just closed (a FIN, or a RST
//!    where announcements were still unread), as when a client's process
//!    dies or its network goes during a deploy. The server sees the stream
//!    end, not a goodbye, and each consumer's `disconnect` announces the
//!    leave. The observers get at most `--leave-wait` (20 s) to hear them.
//!
//! It prints one JSON line: connections opened and failed by cause (both
//! phases), the seconds the arrival took, the p50/p99/max handshake time of
//! those that opened in phase 2, the joins and leaves the observers heard
//! against those they should have, how long each took (`-1`: not all
//! within the wait), connections the server closed before the drop, by
//! reason, and announcements that named another room (`misrouted`).
//!
//! With `--markers`, it prints `phase storm` (before phase 2), `phase drop`
//! (before the drop) and `phase done` (after phase 4) on stdout, and waits
//! for a line on stdin after each, so the bench can mark the server's log at
//! exactly those points.
//!
//! One process holds every socket: it raises its open-file limit to the
//! hard one and refuses to start if the connections would not fit.

#[path = "../args.rs"]
// Only `arg_in`: this binary parses a slice, to test its options.
#[allow(dead_code)]
mod args;

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use args::arg_in;
use futures_util::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader, Lines, Stdin};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What a member hears when someone joins or leaves, up to the room name.
const JOINED: &str = "🚪 Someone joined room '";
const LEFT: &str = "👋 Someone left room '";
/// How often the waits look at the counts.
const POLL: Duration = Duration::from_millis(10);
/// Files the process needs besides its sockets: standard streams, the
/// runtime's epoll and wakers, and a margin.
const SPARE_FILES: usize = 64;

/// The options that take a value; `--markers` takes none.
const VALUED: [&str; 7] = [
    "url",
    "connections",
    "in-flight",
    "room-size",
    "handshake-timeout",
    "join-wait",
    "leave-wait",
];

#[derive(Debug, Clone, PartialEq)]
struct Options {
    /// Up to the room name, e.g. `ws://127.0.0.1:8080/ws/room/`.
    url: String,
    connections: usize,
    in_flight: usize,
    room_size: usize,
    handshake_timeout: Duration,
    join_wait: Duration,
    leave_wait: Duration,
    markers: bool,
}

/// The options in `args` (the process's arguments, program name first).
/// An unknown option is an error rather than ignored, so that a typo never
/// measures something else than what was asked.
fn options(args: &[String]) -> Result<Options, String> {
    let mut rest = args.iter().skip(1);
    while let Some(flag) = rest.next() {
        match flag.strip_prefix("--") {
            Some("markers") => {}
            Some(name) if VALUED.contains(&name) => {
                rest.next();
            }
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    let seconds = |name: &str, default: f64| -> Result<Duration, String> {
        let value: f64 = arg_in(args, name, default)?;
        if value.is_finite() && value > 0.0 {
            Ok(Duration::from_secs_f64(value))
        } else {
            Err(format!("--{name} must be a number of seconds above 0"))
        }
    };
    let options = Options {
        url: arg_in(args, "url", "ws://127.0.0.1:8080/ws/room/".to_owned())?,
        connections: arg_in(args, "connections", 18_000)?,
        in_flight: arg_in(args, "in-flight", 2_000)?,
        room_size: arg_in(args, "room-size", 10)?,
        handshake_timeout: seconds("handshake-timeout", 30.0)?,
        join_wait: seconds("join-wait", 30.0)?,
        leave_wait: seconds("leave-wait", 20.0)?,
        markers: args.iter().any(|arg| arg == "--markers"),
    };
    if options.room_size < 2 {
        return Err("--room-size must be at least 2: an observer and someone to observe".into());
    }
    if options.connections < 2 {
        return Err("--connections must be at least 2".into());
    }
    if options.in_flight == 0 {
        return Err("--in-flight must be at least 1".into());
    }
    Ok(options)
}

/// Who goes where: one observer per room, the others in turn.
#[derive(Debug, PartialEq)]
struct Plan {
    rooms: usize,
    /// The connections of phase 2.
    others: usize,
}

impl Plan {
    fn new(connections: usize, room_size: usize) -> Plan {
        let rooms = connections.div_ceil(room_size);
        Plan {
            rooms,
            others: connections - rooms,
        }
    }

    /// The room of the `other`-th connection of phase 2.
    fn room_of(&self, other: usize) -> usize {
        other % self.rooms
    }
}

fn room_name(room: usize) -> String {
    format!("storm-{room}")
}

/// What an observer made of a text frame.
#[derive(Debug, PartialEq)]
enum Heard {
    Join,
    Leave,
    /// A join or leave of another room: the layer mixed up its groups.
    Misrouted,
    Other,
}

fn classify(text: &str, room: &str) -> Heard {
    let (heard, rest) = if let Some(rest) = text.strip_prefix(JOINED) {
        (Heard::Join, rest)
    } else if let Some(rest) = text.strip_prefix(LEFT) {
        (Heard::Leave, rest)
    } else {
        return Heard::Other;
    };
    if rest.strip_suffix('\'') == Some(room) {
        heard
    } else {
        Heard::Misrouted
    }
}

/// Why a handshake failed, or a connection ended early, in a word or two.
fn cause(err: &WsError) -> String {
    match err {
        WsError::Http(response) => format!("http {}", response.status().as_u16()),
        WsError::Io(err) => io_cause(err),
        WsError::Protocol(ProtocolError::HandshakeIncomplete) => "eof".to_owned(),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => "reset".to_owned(),
        WsError::Protocol(_) => "protocol".to_owned(),
        WsError::ConnectionClosed | WsError::AlreadyClosed => "eof".to_owned(),
        _ => "other".to_owned(),
    }
}

fn io_cause(err: &io::Error) -> String {
    use io::ErrorKind::*;
    #[cfg(unix)]
    if err.raw_os_error() == Some(libc::EMFILE) {
        return "out of files".to_owned();
    }
    match err.kind() {
        ConnectionRefused => "refused",
        ConnectionReset | ConnectionAborted | BrokenPipe => "reset",
        UnexpectedEof => "eof",
        TimedOut => "timeout",
        AddrNotAvailable => "no local port",
        other => return format!("io {other:?}"),
    }
    .to_owned()
}

/// Opens one connection, within `timeout`; on failure, its cause.
async fn connect(url: &str, timeout: Duration) -> Result<Socket, String> {
    // Small buffers: tungstenite's 128 KiB default read buffer, allocated
    // up front, would reserve 2.3 GB for 18,000 clients that each hear a
    // few short announcements.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let connecting = tokio_tungstenite::connect_async_with_config(url, Some(config), false);
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok((socket, _))) => Ok(socket),
        Ok(Err(err)) => Err(cause(&err)),
        Err(_) => Err("timeout".to_owned()),
    }
}

/// What the observers and the arriving connections share.
struct Shared {
    /// Per room: the joins its observer heard, its own excepted.
    joins: Vec<AtomicU32>,
    /// Per room: the leaves its observer heard.
    leaves: Vec<AtomicU32>,
    /// Per room: whether its observer heard its own join.
    in_place: Vec<AtomicBool>,
    misrouted: AtomicU32,
    /// Observers whose connection ended before the end.
    observers_lost: AtomicU32,
    /// Phase 2 connections that ended before the drop, by reason.
    closed_early: Mutex<BTreeMap<String, u32>>,
}

impl Shared {
    fn new(rooms: usize) -> Shared {
        Shared {
            joins: (0..rooms).map(|_| AtomicU32::new(0)).collect(),
            leaves: (0..rooms).map(|_| AtomicU32::new(0)).collect(),
            in_place: (0..rooms).map(|_| AtomicBool::new(false)).collect(),
            misrouted: AtomicU32::new(0),
            observers_lost: AtomicU32::new(0),
            closed_early: Mutex::new(BTreeMap::new()),
        }
    }

    fn closed_early(&self, reason: String) {
        let mut closed = self
            .closed_early
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *closed.entry(reason).or_default() += 1;
    }

    /// Whether every observed room has heard at least `expected[room]` of
    /// what `counts` counts.
    fn heard_all(&self, counts: &[AtomicU32], expected: &[Option<u32>]) -> bool {
        expected.iter().zip(counts).all(|(expected, heard)| {
            expected.is_none_or(|expected| heard.load(Ordering::Relaxed) >= expected)
        })
    }
}

/// An observer: counts the joins and leaves of its room until the end.
async fn observe(mut socket: Socket, room: usize, shared: Arc<Shared>) {
    let name = room_name(room);
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => match classify(&text, &name) {
                // The first join is its own (it connects alone).
                Heard::Join => {
                    if shared.in_place[room].swap(true, Ordering::Relaxed) {
                        shared.joins[room].fetch_add(1, Ordering::Relaxed);
                    }
                }
                Heard::Leave => {
                    shared.leaves[room].fetch_add(1, Ordering::Relaxed);
                }
                Heard::Misrouted => {
                    shared.misrouted.fetch_add(1, Ordering::Relaxed);
                }
                Heard::Other => {}
            },
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                shared.observers_lost.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

/// How one handshake of phase 2 went.
struct Arrival {
    room: usize,
    took: Duration,
    /// When it ended.
    at: Instant,
    /// Why it failed; `None` if it opened.
    failed: Option<String>,
}

/// One connection of phase 2: waits for a place among those in flight,
/// opens, reports, then reads what its room says (so that the server never
/// waits on it) until the drop, or until the server ends it.
async fn arrive(
    url: String,
    room: usize,
    places: Arc<Semaphore>,
    timeout: Duration,
    report: mpsc::UnboundedSender<Arrival>,
    mut dropped: watch::Receiver<bool>,
    shared: Arc<Shared>,
) {
    let Ok(place) = places.acquire().await else {
        return;
    };
    let started = Instant::now();
    let opened = connect(&url, timeout).await;
    let at = Instant::now();
    drop(place);
    let (socket, failed) = match opened {
        Ok(socket) => (Some(socket), None),
        Err(cause) => (None, Some(cause)),
    };
    let _ = report.send(Arrival {
        room,
        took: at - started,
        at,
        failed,
    });
    let Some(mut socket) = socket else {
        return;
    };
    let mut reason = None;
    loop {
        let next = tokio::select! {
            next = socket.next() => next,
            // The drop: the socket closes as this returns, no close frame.
            _ = dropped.wait_for(|dropped| *dropped) => return,
        };
        match next {
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map_or(1005, |frame| u16::from(frame.code));
                reason.get_or_insert(format!("close {code}"));
            }
            Some(Ok(_)) => {}
            Some(Err(err)) => {
                shared.closed_early(reason.unwrap_or_else(|| cause(&err)));
                return;
            }
            None => {
                shared.closed_early(reason.unwrap_or_else(|| "eof".to_owned()));
                return;
            }
        }
    }
}

/// Polls `done` until it holds (returning how long that took) or `wait`
/// has passed (`None`).
async fn wait_until(wait: Duration, done: impl Fn() -> bool) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if done() {
            return Some(started.elapsed());
        }
        if started.elapsed() >= wait {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Says which phase begins and, with `--markers`, waits for the bench's
/// go-ahead on stdin.
async fn marker(phase: &str, stdin: &mut Option<Lines<BufReader<Stdin>>>) -> Result<(), String> {
    // A line on a pipe: Rust's stdout flushes it at the newline.
    println!("phase {phase}");
    match stdin {
        None => Ok(()),
        Some(lines) => match lines.next_line().await {
            Ok(Some(_)) => Ok(()),
            _ => Err(format!("stdin closed while waiting to begin phase {phase}")),
        },
    }
}

/// The nearest-rank percentile of sorted values (the smallest value with
/// at least a share `p` of them at or below it); 0 if there are none.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// What a run found; see the module documentation.
#[derive(Debug, Default)]
struct Report {
    connections: usize,
    rooms: usize,
    room_size: usize,
    in_flight: usize,
    opened: usize,
    failures: BTreeMap<String, u32>,
    observers_unjoined: usize,
    open_seconds: f64,
    /// Handshake times of phase 2, in µs, sorted.
    handshakes_us: Vec<u64>,
    joins_heard: u64,
    joins_expected: u64,
    join_seconds: Option<f64>,
    leaves_heard: u64,
    leaves_expected: u64,
    leave_seconds: Option<f64>,
    closed_early: BTreeMap<String, u32>,
    observers_lost: u32,
    misrouted: u32,
}

/// `{"a":1,"b":2}` of counts by cause.
fn json_counts(counts: &BTreeMap<String, u32>) -> String {
    let fields: Vec<String> = counts
        .iter()
        .map(|(cause, count)| format!("\"{cause}\":{count}"))
        .collect();
    format!("{{{}}}", fields.join(","))
}

impl Report {
    fn json(&self) -> String {
        let ms = |p: f64| percentile(&self.handshakes_us, p) as f64 / 1000.0;
        // -1: not everything arrived within the wait.
        let seconds = |s: Option<f64>| s.unwrap_or(-1.0);
        format!(
            "{{\"connections\":{},\"rooms\":{},\"room_size\":{},\"in_flight\":{},\"opened\":{},\
             \"failed\":{},\"failures\":{},\"observers_unjoined\":{},\"open_s\":{:.2},\
             \"p50_ms\":{:.1},\"p99_ms\":{:.1},\"max_ms\":{:.1},\"joins_heard\":{},\
             \"joins_expected\":{},\"join_s\":{:.2},\"leaves_heard\":{},\"leaves_expected\":{},\
             \"leave_s\":{:.2},\"closed_early\":{},\"observers_lost\":{},\"misrouted\":{}}}",
            self.connections,
            self.rooms,
            self.room_size,
            self.in_flight,
            self.opened,
            self.failures.values().sum::<u32>(),
            json_counts(&self.failures),
            self.observers_unjoined,
            self.open_seconds,
            ms(0.50),
            ms(0.99),
            ms(1.0),
            self.joins_heard,
            self.joins_expected,
            seconds(self.join_seconds),
            self.leaves_heard,
            self.leaves_expected,
            seconds(self.leave_seconds),
            json_counts(&self.closed_early),
            self.observers_lost,
            self.misrouted,
        )
    }
}

async fn run(o: Options) -> Result<Report, String> {
    let plan = Plan::new(o.connections, o.room_size);
    let shared = Arc::new(Shared::new(plan.rooms));
    let places = Arc::new(Semaphore::new(o.in_flight));
    let mut stdin = o
        .markers
        .then(|| BufReader::new(tokio::io::stdin()).lines());
    let url = |room: usize| format!("{}{}", o.url, room_name(room));
    let mut report = Report {
        connections: o.connections,
        rooms: plan.rooms,
        room_size: o.room_size,
        in_flight: o.in_flight,
        ..Report::default()
    };

    // Phase 1: the observers.
    let mut opening = JoinSet::new();
    for room in 0..plan.rooms {
        let (url, places, timeout) = (url(room), places.clone(), o.handshake_timeout);
        opening.spawn(async move {
            let _place = places.acquire().await;
            (room, connect(&url, timeout).await)
        });
    }
    let mut observed = vec![false; plan.rooms];
    while let Some(opened) = opening.join_next().await {
        match opened.map_err(|err| format!("an observer failed: {err}"))? {
            (room, Ok(socket)) => {
                observed[room] = true;
                report.opened += 1;
                tokio::spawn(observe(socket, room, shared.clone()));
            }
            (_, Err(cause)) => *report.failures.entry(cause).or_default() += 1,
        }
    }
    let in_place = |room: usize| shared.in_place[room].load(Ordering::Relaxed);
    let observers = report.opened;
    let settled = wait_until(o.join_wait, || {
        (0..plan.rooms).all(|room| !observed[room] || in_place(room))
    })
    .await;
    report.observers_unjoined = (0..plan.rooms)
        .filter(|&room| observed[room] && !in_place(room))
        .count();
    eprintln!(
        "storm: {observers} of {} observers open{}",
        plan.rooms,
        match settled {
            Some(took) => format!(
                ", each heard its own join within {:.1} s",
                took.as_secs_f64()
            ),
            None => format!(", {} never heard their own join", report.observers_unjoined),
        }
    );

    // Phase 2: everyone else at once.
    marker("storm", &mut stdin).await?;
    eprintln!(
        "storm: {} connections arriving, {} handshakes in flight",
        plan.others, o.in_flight
    );
    let started = Instant::now();
    let (arrivals, mut arrived) = mpsc::unbounded_channel();
    let (drop_all, dropped) = watch::channel(false);
    for other in 0..plan.others {
        let room = plan.room_of(other);
        tokio::spawn(arrive(
            url(room),
            room,
            places.clone(),
            o.handshake_timeout,
            arrivals.clone(),
            dropped.clone(),
            shared.clone(),
        ));
    }
    drop(arrivals);
    let mut opened = vec![0u32; plan.rooms];
    let mut last = started;
    for _ in 0..plan.others {
        let arrival = arrived
            .recv()
            .await
            .ok_or("a connection of phase 2 ended without a word")?;
        last = last.max(arrival.at);
        match arrival.failed {
            None => {
                opened[arrival.room] += 1;
                report.opened += 1;
                report.handshakes_us.push(arrival.took.as_micros() as u64);
            }
            Some(cause) => *report.failures.entry(cause).or_default() += 1,
        }
    }
    report.handshakes_us.sort_unstable();
    report.open_seconds = (last - started).as_secs_f64();
    eprintln!(
        "storm: {} of {} opened in {:.1} s; waiting for the observers to hear them",
        report.opened - observers,
        plan.others,
        report.open_seconds
    );

    // Phase 3: every observer hears its room fill. A room without an
    // observer expects nothing.
    let expected: Vec<Option<u32>> = (0..plan.rooms)
        .map(|room| observed[room].then_some(opened[room]))
        .collect();
    let expected_total: u64 = expected.iter().flatten().map(|&n| u64::from(n)).sum();
    report.joins_expected = expected_total;
    report.leaves_expected = expected_total;
    let joins_done = wait_until(o.join_wait, || shared.heard_all(&shared.joins, &expected)).await;
    report.join_seconds = joins_done.map(|_| started.elapsed().as_secs_f64());

    // Phase 4: everyone but the observers drops at once.
    marker("drop", &mut stdin).await?;
    eprintln!("storm: dropping them all at once, without a close frame");
    let dropped_at = Instant::now();
    drop_all.send_replace(true);
    let leaves_done =
        wait_until(o.leave_wait, || shared.heard_all(&shared.leaves, &expected)).await;
    report.leave_seconds = leaves_done.map(|_| dropped_at.elapsed().as_secs_f64());
    marker("done", &mut stdin).await?;

    let total = |counts: &[AtomicU32]| -> u64 {
        counts
            .iter()
            .map(|n| u64::from(n.load(Ordering::Relaxed)))
            .sum()
    };
    report.joins_heard = total(&shared.joins);
    report.leaves_heard = total(&shared.leaves);
    report.misrouted = shared.misrouted.load(Ordering::Relaxed);
    report.observers_lost = shared.observers_lost.load(Ordering::Relaxed);
    report.closed_early = shared
        .closed_early
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Ok(report)
}

/// Raises the open-file limit's soft value to the hard one (where 18,000
/// sockets need it: the soft limit is often 1,024) and returns the limit
/// in force.
#[cfg(unix)]
fn raise_file_limit() -> Result<u64, String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(format!(
            "cannot read the open-file limit: {}",
            io::Error::last_os_error()
        ));
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
    Ok(limit.rlim_cur)
}

#[cfg(not(unix))]
fn raise_file_limit() -> Result<u64, String> {
    Ok(u64::MAX)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let options = match options(&args) {
        Ok(options) => options,
        Err(err) => {
            eprintln!("storm: {err}");
            std::process::exit(2);
        }
    };
    let needed = options.connections + SPARE_FILES;
    match raise_file_limit() {
        Ok(limit) if limit >= needed as u64 => {}
        Ok(limit) => {
            eprintln!(
                "storm: {} connections need {needed} open files, and this process may open \
                 {limit} (the hard limit, `ulimit -Hn`); ask for fewer",
                options.connections
            );
            std::process::exit(2);
        }
        Err(err) => {
            eprintln!("storm: {err}");
            std::process::exit(1);
        }
    }
    // One thread: the bench pins the generator to one core, the other
    // being the server's.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run(options)) {
        Ok(report) => println!("{}", report.json()),
        Err(err) => {
            eprintln!("storm: {err}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio_tungstenite::tungstenite::http::Response;

    use super::*;

    fn argv(list: &[&str]) -> Vec<String> {
        std::iter::once("storm")
            .chain(list.iter().copied())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn options_and_defaults() {
        let defaults = options(&argv(&[])).unwrap();
        assert_eq!(
            defaults,
            Options {
                url: "ws://127.0.0.1:8080/ws/room/".into(),
                connections: 18_000,
                in_flight: 2_000,
                room_size: 10,
                handshake_timeout: Duration::from_secs(30),
                join_wait: Duration::from_secs(30),
                leave_wait: Duration::from_secs(20),
                markers: false,
            }
        );
        let given = options(&argv(&[
            "--connections",
            "4000",
            "--markers",
            "--in-flight",
            "500",
            "--leave-wait",
            "0.5",
        ]))
        .unwrap();
        assert_eq!((given.connections, given.in_flight), (4000, 500));
        assert_eq!(given.leave_wait, Duration::from_millis(500));
        assert!(given.markers);
        for bad in [
            &["--room-size", "1"][..],
            &["--connections", "1"],
            &["--in-flight", "0"],
            &["--join-wait", "0"],
            &["--connections", "many"],
            &["--connections"],
            &["--conections", "10"],
            &["stray"],
        ] {
            assert!(options(&argv(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn one_observer_per_room_and_the_rest_in_turn() {
        let plan = Plan::new(18_000, 10);
        assert_eq!(
            plan,
            Plan {
                rooms: 1_800,
                others: 16_200
            }
        );
        let mut sizes = vec![1; plan.rooms];
        (0..plan.others).for_each(|other| sizes[plan.room_of(other)] += 1);
        assert!(sizes.iter().all(|&size| size == 10));
        // Not a multiple: the last rooms are a member short.
        let plan = Plan::new(25, 10);
        let mut sizes = vec![1; plan.rooms];
        (0..plan.others).for_each(|other| sizes[plan.room_of(other)] += 1);
        assert_eq!(sizes, [9, 8, 8]);
    }

    #[test]
    fn reads_the_room_announcements() {
        let room = room_name(7);
        assert_eq!(
            classify("🚪 Someone joined room 'storm-7'", &room),
            Heard::Join
        );
        assert_eq!(
            classify("👋 Someone left room 'storm-7'", &room),
            Heard::Leave
        );
        assert_eq!(
            classify("🚪 Someone joined room 'storm-70'", &room),
            Heard::Misrouted
        );
        assert_eq!(
            classify("💬 🚪 Someone joined room 'storm-7'", &room),
            Heard::Other
        );
    }

    #[test]
    fn names_the_causes_of_failure() {
        let response = Response::builder().status(503).body(None).unwrap();
        assert_eq!(cause(&WsError::Http(Box::new(response))), "http 503");
        let io = |kind| WsError::Io(io::Error::from(kind));
        assert_eq!(cause(&io(io::ErrorKind::ConnectionRefused)), "refused");
        assert_eq!(cause(&io(io::ErrorKind::ConnectionReset)), "reset");
        assert_eq!(cause(&io(io::ErrorKind::AddrNotAvailable)), "no local port");
        assert_eq!(
            cause(&io(io::ErrorKind::PermissionDenied)),
            "io PermissionDenied"
        );
        #[cfg(unix)]
        assert_eq!(
            cause(&WsError::Io(io::Error::from_raw_os_error(libc::EMFILE))),
            "out of files"
        );
        assert_eq!(
            cause(&WsError::Protocol(ProtocolError::HandshakeIncomplete)),
            "eof"
        );
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 0.50), 50);
        assert_eq!(percentile(&values, 0.99), 99);
        assert_eq!(percentile(&values, 1.0), 100);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn the_json_line_has_every_figure() {
        let report = Report {
            connections: 20,
            rooms: 2,
            opened: 19,
            failures: BTreeMap::from([("http 503".to_owned(), 1)]),
            handshakes_us: vec![1_000, 2_500],
            joins_heard: 17,
            joins_expected: 17,
            join_seconds: Some(0.25),
            ..Report::default()
        };
        let json = report.json();
        for field in [
            "\"failed\":1,",
            "\"failures\":{\"http 503\":1}",
            "\"p50_ms\":1.0,",
            "\"max_ms\":2.5,",
            "\"join_s\":0.25,",
            "\"leave_s\":-1.00,",
            "\"closed_early\":{}",
        ] {
            assert!(json.contains(field), "{field} in {json}");
        }
    }

    #[test]
    fn raises_the_file_limit_to_the_hard_one() {
        assert!(raise_file_limit().unwrap() > 0);
    }
}
