//! [`serve_http`]: our own accept loop, in place of `axum::serve`.
//!
//! `axum::serve` waits for a request head as long as the client cares to
//! take, and accepts every connection the kernel hands it. On the internet
//! that lets one client hold the server: a thousand connections that send
//! half a request and stop stay open forever, and one client with 19,990
//! sockets uses up a process allowed 20,000 files, after which `accept`
//! fails with "Too many open files" and nobody else gets an answer.
//!
//! [`serve_http`] serves the same `Router` with hyper's HTTP/1 directly and
//! adds what is missing below HTTP:
//!
//! - a header read timeout ([`HttpLimits::header_read_timeout`]): a request
//!   head, the first one or the next one on a kept-alive connection, must
//!   arrive in full within it, or the connection is closed;
//! - a cap on open sockets ([`HttpLimits::max_sockets`]), held from accept
//!   until the socket closes, so a WebSocket keeps counting after its
//!   upgrade. At the cap the loop goes on accepting, because if it stopped,
//!   everyone else's connections would queue in the kernel behind the
//!   flood; instead it makes room by closing the connection that has waited
//!   longest without a request in progress, whether it never sent one or is
//!   an idle keep-alive connection. When every connection is busy with a
//!   request or a WebSocket, it closes the new one instead;
//! - a bounded drain: on shutdown it stops accepting, lets the requests in
//!   flight finish, and drops what is left at a deadline.
//!
//! HTTP/1 only, as `axum::serve` was here: the workspace builds axum
//! without `http2`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower_service::Service as _;

/// What the accept loop enforces below HTTP.
#[derive(Debug, Clone)]
pub(crate) struct HttpLimits {
    /// A request whose head has not fully arrived within this is closed,
    /// the wait for the next request on a kept-alive connection included.
    pub header_read_timeout: Duration,
    /// The most TCP connections open at once, WebSockets included (an
    /// upgraded connection keeps counting until its socket closes).
    pub max_sockets: usize,
}

/// How many sockets the process can afford: see [`default_max_sockets`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SocketBudget {
    /// The process's open-file limit (RLIMIT_NOFILE's soft limit, after
    /// raising it); `u64::MAX` where there is none or it cannot be read.
    pub file_limit: u64,
    /// The default for [`HttpLimits::max_sockets`].
    pub max_sockets: usize,
}

/// Where the open-file limit is unknown (not Unix, or `getrlimit` failed).
const FALLBACK_MAX_SOCKETS: usize = 10_000;

/// The default for [`HttpLimits::max_sockets`]: the open-file limit, first
/// raised from the soft to the hard limit as Go's runtime does (the soft
/// limit is often 1,024 for the sake of programs using `select`, which this
/// one does not), minus a reserve for everything else the process opens.
/// Also returns the limit, so that the caller can warn when
/// `MAX_CONNECTIONS` asks for more WebSockets than it allows.
///
/// Child processes inherit the raised soft limit.
pub(crate) fn default_max_sockets() -> SocketBudget {
    match raise_file_limit() {
        Some(file_limit) => SocketBudget {
            file_limit,
            max_sockets: sockets_within(file_limit),
        },
        None => SocketBudget {
            file_limit: u64::MAX,
            max_sockets: FALLBACK_MAX_SOCKETS,
        },
    }
}

/// The sockets to allow under `file_limit` files. The reserve is a
/// twentieth of the limit, and at least 64 (half, under a limit of 128): the
/// 64 cover what the process opens whatever its load (standard streams, the
/// runtime's epoll and wakers, the listeners, Redis links, the one socket
/// the accept loop holds while it makes room); the twentieth grows with the
/// limit for what an app opens per request (files, outgoing connections),
/// which a fixed number cannot guess. (1,000 files under a limit of 20,000:
/// a WebSocket server opens few files of its own.)
fn sockets_within(file_limit: u64) -> usize {
    let reserve = (file_limit / 20).max(64.min(file_limit / 2));
    let sockets = file_limit.saturating_sub(reserve).max(1);
    usize::try_from(sockets)
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS)
}

/// Raises RLIMIT_NOFILE's soft limit to the hard one and returns the soft
/// limit in force afterwards (the old one if raising failed, as it does on
/// macOS when the hard limit is "unlimited").
#[cfg(unix)]
fn raise_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
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
    // rlim_t is u64 on most targets but 32 bits on some. RLIM_INFINITY is
    // u64::MAX on the 64-bit ones: no limit, as good as none.
    #[allow(clippy::unnecessary_cast)]
    let file_limit = limit.rlim_cur as u64;
    Some(file_limit)
}

#[cfg(not(unix))]
fn raise_file_limit() -> Option<u64> {
    None
}

/// How long the accept loop waits after an accept error other than a
/// failed handshake (EMFILE, ENFILE, ENOBUFS...): long enough not to spin,
/// short enough to notice at once that a file has been freed.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// How long the accept loop waits, after closing a waiting connection to
/// make room, for its permit to come back. It comes back as soon as that
/// connection's task runs; the bound only keeps a mistake from stalling
/// every new connection.
const SHED_WAIT: Duration = Duration::from_secs(1);

/// Serves `app` on `listener` until `shutdown` is cancelled, holding to
/// `limits` (see the module documentation). Then it stops accepting, asks
/// every HTTP connection to finish (requests in flight complete; idle
/// connections close), and returns once they have, or at the Instant
/// `drain_deadline` returns (called when shutdown begins, so the caller can
/// share one deadline with what it shuts down itself), dropping what is
/// left. Upgraded WebSockets are not waited for: they are no longer HTTP
/// connections, and the caller closes them itself.
///
/// Sets TCP_NODELAY on each accepted stream: without it a small frame can
/// wait for the client's delayed ACK of the previous one (Nagle's
/// algorithm), tens of milliseconds added to a room's broadcasts.
///
/// # Errors
///
/// None today: accept errors are logged and retried, as `axum::serve` does.
pub(crate) async fn serve_http(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
    drain_deadline: impl FnOnce() -> Instant,
) -> io::Result<()> {
    let sockets = Sockets::new(limits.max_sockets);
    serve_counted(listener, app, &limits, &sockets, shutdown, drain_deadline).await
}

/// [`serve_http`], counting its sockets in `sockets`, which tests can see.
async fn serve_counted(
    listener: TcpListener,
    app: Router,
    limits: &HttpLimits,
    sockets: &Arc<Sockets>,
    shutdown: CancellationToken,
    drain_deadline: impl FnOnce() -> Instant,
) -> io::Result<()> {
    // hyper's HTTP/1 directly, not hyper-util's auto builder: the auto
    // builder first reads a few bytes to tell HTTP/1 from HTTP/2, and that
    // read has no timeout, so a client that connects and says nothing would
    // be held forever. HTTP/1's timer starts as soon as the connection is.
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);

    let mut connections = JoinSet::new();
    let mut at_cap = AtCap::No;
    let mut accept_failing = false;
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            // That one client's handshake failed; nothing to wait for.
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                if !accept_failing {
                    tracing::warn!(
                        "accept error: {err}; retrying every {} ms",
                        ACCEPT_RETRY.as_millis()
                    );
                    accept_failing = true;
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_RETRY) => continue,
                }
            }
        };
        if accept_failing {
            tracing::info!("accepting connections again");
            accept_failing = false;
        }
        // Finished tasks keep their slot in the set until collected.
        while connections.try_join_next().is_some() {}

        let Some(permit) = sockets.make_room(&mut at_cap).await else {
            // Every open connection is busy: dropping the new one closes it.
            continue;
        };
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%err, "cannot set TCP_NODELAY");
        }
        let slot = Arc::new(ConnectionSlot {
            sockets: Arc::clone(sockets),
            shed: CancellationToken::new(),
            place: AtomicU64::new(NOT_WAITING),
        });
        slot.wait_for_request();
        let service = AppService {
            app: app.clone(),
            slot: Arc::clone(&slot),
        };
        let io = TokioIo::new(CountedStream {
            stream,
            slot: Arc::clone(&slot),
            _permit: permit,
        });
        let connection = http.serve_connection(io, service).with_upgrades();
        connections.spawn(serve_connection(
            connection,
            slot.shed.clone(),
            shutdown.clone(),
        ));
    }

    // Closing the listener now makes the kernel refuse new connections
    // instead of queueing them for nobody.
    drop(listener);
    let deadline = drain_deadline();
    let drained = tokio::time::timeout_at(deadline, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!(
            left = connections.len(),
            "drain deadline reached; closing the HTTP connections left"
        );
    }
    // Aborts what is left and waits for the tasks to drop their sockets.
    connections.shutdown().await;
    Ok(())
}

/// Errors of one incoming connection rather than of the listener, as
/// `axum::serve` tells them apart.
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// One HTTP connection's task: until it ends, it is shed, or, after
/// shutdown has begun, it has finished what it was doing.
async fn serve_connection(
    connection: http1::UpgradeableConnection<TokioIo<CountedStream>, AppService>,
    shed: CancellationToken,
    shutdown: CancellationToken,
) {
    let mut connection = std::pin::pin!(connection);
    let mut draining = false;
    loop {
        tokio::select! {
            biased;
            // Returning drops the connection, and with it the socket.
            () = shed.cancelled() => return,
            ended = connection.as_mut() => {
                if let Err(err) = ended {
                    tracing::debug!(%err, "HTTP connection ended with an error");
                }
                return;
            }
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// What the accept loop last did at the cap, so that it logs once an
/// episode rather than once a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AtCap {
    No,
    /// Closing the oldest waiting connections to make room.
    Shedding,
    /// Closing new connections, as every open one is busy.
    Refusing,
}

/// The open sockets: a permit each, and the ones waiting for a request, in
/// the order they started waiting, to close when the cap is reached.
struct Sockets {
    max: usize,
    permits: Arc<Semaphore>,
    waiting: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    /// The place last given out. Places only grow, so the first key of
    /// `oldest_first` is the connection that has waited longest.
    last_place: u64,
    oldest_first: BTreeMap<u64, Weak<ConnectionSlot>>,
}

impl Sockets {
    fn new(max: usize) -> Arc<Self> {
        // Semaphore::new panics above MAX_PERMITS; nobody has that many
        // files anyway.
        let max = max.min(Semaphore::MAX_PERMITS);
        Arc::new(Self {
            max,
            permits: Arc::new(Semaphore::new(max)),
            waiting: Mutex::new(Waiting::default()),
        })
    }

    /// Nothing under this lock panics, so a poisoned one is still sound.
    fn waiting(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A permit for a connection just accepted: a free one, or the one of
    /// the connection that has waited longest for a request, closed to
    /// make room. None when every open connection is busy: the caller
    /// drops the new one.
    async fn make_room(&self, at_cap: &mut AtCap) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
            if *at_cap != AtCap::No {
                tracing::info!(max = self.max, "below the socket limit again");
                *at_cap = AtCap::No;
            }
            return Some(permit);
        }
        if self.shed_oldest_waiting() {
            metrics::counter!("axum_channels_sockets_shed_total").increment(1);
            if *at_cap != AtCap::Shedding {
                tracing::warn!(
                    "socket limit reached ({}); closing the oldest connections that have not sent a request",
                    self.max
                );
                *at_cap = AtCap::Shedding;
            }
            let permit = Arc::clone(&self.permits).acquire_owned();
            return tokio::time::timeout(SHED_WAIT, permit).await.ok()?.ok();
        }
        metrics::counter!("axum_channels_sockets_refused_total").increment(1);
        if *at_cap != AtCap::Refusing {
            tracing::warn!(
                "socket limit reached ({}) and every connection is busy with a request or a WebSocket; closing new connections",
                self.max
            );
            *at_cap = AtCap::Refusing;
        }
        None
    }

    /// Closes the connection that has waited longest for a request, if any.
    fn shed_oldest_waiting(&self) -> bool {
        let mut waiting = self.waiting();
        while let Some((_, slot)) = waiting.oldest_first.pop_first() {
            if let Some(slot) = slot.upgrade() {
                slot.place.store(CLOSED, Ordering::Relaxed);
                slot.shed.cancel();
                return true;
            }
        }
        false
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }
}

/// [`ConnectionSlot::place`] of a connection with a request in progress,
/// or upgraded.
const NOT_WAITING: u64 = 0;
/// [`ConnectionSlot::place`] of a connection closed or being closed.
const CLOSED: u64 = u64::MAX;

/// One accepted connection's standing: waiting for a request or not, and
/// the switch that closes it to make room.
struct ConnectionSlot {
    sockets: Arc<Sockets>,
    /// Cancelled to close the connection.
    shed: CancellationToken,
    /// Its key in [`Waiting::oldest_first`] while it waits for a request,
    /// else [`NOT_WAITING`] or [`CLOSED`]. Changed only under the `waiting`
    /// lock, so that it always agrees with the map; atomic only to be
    /// changed through a shared reference.
    place: AtomicU64,
}

impl ConnectionSlot {
    /// Puts the connection at the end of the waiting line (if it is not in
    /// it, nor closed).
    fn wait_for_request(self: &Arc<Self>) {
        let mut waiting = self.sockets.waiting();
        if self.place.load(Ordering::Relaxed) == NOT_WAITING {
            waiting.last_place += 1;
            let place = waiting.last_place;
            waiting.oldest_first.insert(place, Arc::downgrade(self));
            self.place.store(place, Ordering::Relaxed);
        }
    }

    /// Takes the connection out of the waiting line, as a request head has
    /// arrived. False if it has just been shed, so that the request is not
    /// served on a connection about to be dropped.
    fn start_request(&self) -> bool {
        let mut waiting = self.sockets.waiting();
        match self.place.load(Ordering::Relaxed) {
            CLOSED => false,
            NOT_WAITING => true,
            place => {
                waiting.oldest_first.remove(&place);
                self.place.store(NOT_WAITING, Ordering::Relaxed);
                true
            }
        }
    }

    /// Takes the connection out of the waiting line for good.
    fn close(&self) {
        let mut waiting = self.sockets.waiting();
        let place = self.place.swap(CLOSED, Ordering::Relaxed);
        if place != NOT_WAITING && place != CLOSED {
            waiting.oldest_first.remove(&place);
        }
    }
}

/// An accepted TCP stream with its permit, so that the permit is given back
/// when the socket closes, whoever holds it then: hyper, or the WebSocket
/// it was upgraded to.
struct CountedStream {
    stream: TcpStream,
    slot: Arc<ConnectionSlot>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        // Before the permit goes back, so that the accept loop never sheds
        // a connection that no longer holds one.
        self.slot.close();
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The app, as hyper calls it for each request head of one connection.
struct AppService {
    app: Router,
    slot: Arc<ConnectionSlot>,
}

impl hyper::service::Service<Request<Incoming>> for AppService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        if !self.slot.start_request() {
            // Shed a moment ago: its task is about to drop it.
            let mut closing = Response::new(ResponseBody {
                body: Body::empty(),
                then_wait: None,
            });
            *closing.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            closing
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Box::pin(std::future::ready(Ok(closing)));
        }
        // A Router is always ready: no poll_ready needed.
        let response = self.app.clone().call(request.map(Body::new));
        let slot = Arc::clone(&self.slot);
        Box::pin(async move {
            let response = response.await?;
            // A 101 hands the socket to a WebSocket, which stays busy.
            let then_wait = (response.status() != StatusCode::SWITCHING_PROTOCOLS).then_some(slot);
            Ok(response.map(|body| ResponseBody { body, then_wait }))
        })
    }
}

/// A response body that puts its connection back in the waiting line once
/// hyper is done with it: a kept-alive connection with no request in
/// progress costs a client as little to lose as one that never sent any
/// (HTTP clients retry on a fresh one), and without this a client could
/// hold every socket by sending one quick request on each.
struct ResponseBody {
    body: Body,
    then_wait: Option<Arc<ConnectionSlot>>,
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(slot) = &self.then_wait {
            slot.wait_for_request();
        }
    }
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::extract::ws::{WebSocket, WebSocketUpgrade};
    use axum::routing::get;
    use futures_util::stream::FuturesUnordered;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::task::JoinHandle;
    use tokio_tungstenite::tungstenite::Message;

    use super::*;

    const HALF_A_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n";
    const A_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    const A_LAST_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    /// A header read timeout for tests that are not about it: one that
    /// never fires while they run.
    const NEVER: Duration = Duration::from_secs(30);
    /// How long a client waits for an answer it expects promptly.
    const PROMPTLY: Duration = Duration::from_secs(2);

    struct TestServer {
        addr: SocketAddr,
        sockets: Arc<Sockets>,
        shutdown: CancellationToken,
        served: JoinHandle<io::Result<()>>,
    }

    async fn start(limits: HttpLimits, drain: Duration) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sockets = Sockets::new(limits.max_sockets);
        let shutdown = CancellationToken::new();
        let served = tokio::spawn({
            let sockets = Arc::clone(&sockets);
            let shutdown = shutdown.clone();
            async move {
                let deadline = move || Instant::now() + drain;
                serve_counted(listener, app(), &limits, &sockets, shutdown, deadline).await
            }
        });
        TestServer {
            addr,
            sockets,
            shutdown,
            served,
        }
    }

    fn app() -> Router {
        Router::new()
            .route("/", get(|| async { "ok" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    "slow"
                }),
            )
            .route(
                "/ws",
                get(|upgrade: WebSocketUpgrade| async move { upgrade.on_upgrade(hold) }),
            )
    }

    /// Holds a WebSocket open until the client closes it.
    async fn hold(mut socket: WebSocket) {
        while let Some(Ok(_)) = socket.recv().await {}
    }

    async fn connect_and_send(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        stream
    }

    /// A connection idle between requests: one request answered, and it is
    /// kept alive.
    async fn kept_alive(addr: SocketAddr) -> TcpStream {
        let mut stream = connect_and_send(addr, A_REQUEST).await;
        let mut said = Vec::new();
        while !said.ends_with(b"\r\n\r\nok") {
            let read = tokio::time::timeout(PROMPTLY, stream.read_buf(&mut said)).await;
            assert!(
                matches!(read, Ok(Ok(1..))),
                "no full answer: {:?}",
                String::from_utf8_lossy(&said)
            );
        }
        stream
    }

    /// Sends `request` on a new connection; returns what the server said,
    /// and whether it closed the connection within [`PROMPTLY`].
    async fn exchange(addr: SocketAddr, request: &[u8]) -> (String, bool) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // A connection closed at once may refuse the request with a reset.
        let _ = stream.write_all(request).await;
        let mut said = Vec::new();
        let deadline = Instant::now() + PROMPTLY;
        let closed = loop {
            match tokio::time::timeout_at(deadline, stream.read_buf(&mut said)).await {
                Err(_) => break false,
                Ok(Ok(0) | Err(_)) => break true,
                Ok(Ok(_)) => {}
            }
        };
        (String::from_utf8_lossy(&said).into_owned(), closed)
    }

    /// Whether the server closes `stream` by `deadline`.
    async fn closed_by(stream: &mut TcpStream, deadline: Instant) -> bool {
        let mut buf = [0; 1024];
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    fn assert_answered((said, _): (String, bool)) {
        assert!(
            said.starts_with("HTTP/1.1 200 OK"),
            "not answered: {said:?}"
        );
    }

    #[tokio::test]
    async fn half_sent_and_silent_connections_are_closed_at_the_header_timeout() {
        let timeout = Duration::from_millis(200);
        let limits = HttpLimits {
            header_read_timeout: timeout,
            max_sockets: 100,
        };
        let server = start(limits, Duration::ZERO).await;
        let started = Instant::now();
        let mut half_sent = connect_and_send(server.addr, HALF_A_REQUEST).await;
        let mut silent = connect_and_send(server.addr, b"").await;

        assert_answered(exchange(server.addr, A_LAST_REQUEST).await);
        let deadline = started + timeout + Duration::from_secs(1);
        assert!(
            closed_by(&mut half_sent, deadline).await,
            "half a request still open"
        );
        assert!(
            closed_by(&mut silent, deadline).await,
            "silent connection still open"
        );
        assert!(started.elapsed() >= timeout, "closed before the timeout");
    }

    /// hyper restarts the header timer when a kept-alive connection goes
    /// idle (`State::idle` in hyper 1.12's proto/h1/conn.rs), so the wait
    /// for a next request is bounded too.
    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_at_the_header_timeout() {
        let timeout = Duration::from_millis(200);
        let limits = HttpLimits {
            header_read_timeout: timeout,
            max_sockets: 100,
        };
        let server = start(limits, Duration::ZERO).await;
        let mut idle = kept_alive(server.addr).await;
        let deadline = Instant::now() + timeout + Duration::from_secs(1);
        assert!(
            closed_by(&mut idle, deadline).await,
            "idle connection still open"
        );
    }

    #[tokio::test]
    async fn a_client_holding_more_sockets_than_the_cap_does_not_starve_another() {
        const CAP: usize = 50;
        let limits = HttpLimits {
            header_read_timeout: NEVER,
            max_sockets: CAP,
        };
        let server = start(limits, Duration::ZERO).await;
        // Every kind of connection that waits for a request, all of them
        // ahead of the other client's in the kernel's queue. The idle
        // keep-alive ones come first and fill the cap, so that they would
        // hold it if they could not be closed.
        let mut flood = Vec::new();
        for _ in 0..CAP {
            flood.push(kept_alive(server.addr).await);
        }
        for _ in 0..75 {
            flood.push(connect_and_send(server.addr, HALF_A_REQUEST).await);
        }
        for _ in 0..75 {
            flood.push(connect_and_send(server.addr, b"").await);
        }

        assert_answered(exchange(server.addr, A_LAST_REQUEST).await);

        let over_the_cap = flood.len() - CAP;
        let deadline = Instant::now() + PROMPTLY;
        let mut closing: FuturesUnordered<_> = flood
            .iter_mut()
            .map(|stream| closed_by(stream, deadline))
            .collect();
        let mut closed = 0;
        while closed < over_the_cap && closing.next().await == Some(true) {
            closed += 1;
        }
        assert_eq!(closed, over_the_cap, "the server closed too few sockets");
        assert!(
            server.sockets.open() <= CAP,
            "{} open",
            server.sockets.open()
        );
    }

    #[tokio::test]
    async fn an_upgraded_websocket_keeps_counting_against_the_cap() {
        let limits = HttpLimits {
            header_read_timeout: NEVER,
            max_sockets: 3,
        };
        let server = start(limits, Duration::ZERO).await;
        let url = format!("ws://{}/ws", server.addr);
        let mut websockets = Vec::new();
        for _ in 0..3 {
            let stream = TcpStream::connect(server.addr).await.unwrap();
            let (websocket, _) = tokio_tungstenite::client_async(&url, stream).await.unwrap();
            websockets.push(websocket);
        }
        assert_eq!(server.sockets.open(), 3);

        let (said, closed) = exchange(server.addr, A_LAST_REQUEST).await;
        assert!(
            said.is_empty() && closed,
            "a 4th connection: {said:?}, closed: {closed}"
        );

        let mut websocket = websockets.pop().unwrap();
        websocket.close(None).await.unwrap();
        while websocket.next().await.is_some() {}
        // The server's end closes once its handler has seen the close.
        let deadline = Instant::now() + PROMPTLY;
        loop {
            let (said, _) = exchange(server.addr, A_LAST_REQUEST).await;
            if said.starts_with("HTTP/1.1 200 OK") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no answer after a WebSocket closed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn shutdown_returns_by_the_drain_deadline() {
        let drain = Duration::from_millis(300);
        let limits = HttpLimits {
            header_read_timeout: NEVER,
            max_sockets: 100,
        };
        let server = start(limits, drain).await;
        let mut half_sent = connect_and_send(server.addr, HALF_A_REQUEST).await;
        let mut idle = kept_alive(server.addr).await;
        let stream = TcpStream::connect(server.addr).await.unwrap();
        let url = format!("ws://{}/ws", server.addr);
        let (mut websocket, _) = tokio_tungstenite::client_async(&url, stream).await.unwrap();
        // Time for hyper to read the half request: a connection it has
        // read nothing from would close at once when asked to finish.
        tokio::time::sleep(Duration::from_millis(50)).await;

        let cancelled_at = Instant::now();
        server.shutdown.cancel();
        assert!(
            closed_by(&mut idle, cancelled_at + drain / 2).await,
            "an idle connection was not closed at once"
        );
        let served = tokio::time::timeout(drain + Duration::from_secs(1), server.served)
            .await
            .expect("serve_http did not return by the drain deadline");
        assert!(served.unwrap().is_ok());
        assert!(
            cancelled_at.elapsed() >= drain,
            "did not wait for the half request"
        );
        assert!(closed_by(&mut half_sent, Instant::now() + PROMPTLY).await);

        // Not waited for, and not closed either: that is the caller's job.
        websocket
            .send(Message::Ping("still there?".into()))
            .await
            .unwrap();
        let pong = tokio::time::timeout(PROMPTLY, websocket.next())
            .await
            .unwrap();
        assert!(matches!(pong, Some(Ok(Message::Pong(_)))), "{pong:?}");
    }

    /// Through `serve_http` itself, which the other tests reach through
    /// `serve_counted` to see its sockets.
    #[tokio::test]
    async fn shutdown_lets_a_request_in_flight_finish() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = HttpLimits {
            header_read_timeout: NEVER,
            max_sockets: 100,
        };
        let shutdown = CancellationToken::new();
        let deadline = || Instant::now() + NEVER;
        let served = tokio::spawn(serve_http(
            listener,
            app(),
            limits,
            shutdown.clone(),
            deadline,
        ));
        let slow = tokio::spawn(async move {
            exchange(
                addr,
                b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;

        shutdown.cancel();
        let (said, _) = slow.await.unwrap();
        assert!(
            said.starts_with("HTTP/1.1 200 OK") && said.ends_with("slow"),
            "{said:?}"
        );
        let served = tokio::time::timeout(PROMPTLY, served).await;
        assert!(served.expect("serve_http did not return").unwrap().is_ok());
    }

    #[test]
    fn default_max_sockets_leaves_room_below_the_file_limit() {
        let budget = default_max_sockets();
        assert!(budget.max_sockets > 0);
        assert!(
            (budget.max_sockets as u64) < budget.file_limit,
            "{budget:?}"
        );
        #[cfg(unix)]
        {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit only writes the struct it is given.
            assert_eq!(
                unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
                0
            );
            #[allow(clippy::unnecessary_cast)]
            let (soft, hard) = (limit.rlim_cur as u64, limit.rlim_max as u64);
            assert_eq!(soft, budget.file_limit);
            #[cfg(target_os = "linux")]
            assert_eq!(soft, hard, "the soft limit was not raised");
        }

        assert_eq!(sockets_within(20_000), 19_000);
        assert_eq!(sockets_within(1_024), 960);
        assert_eq!(sockets_within(100), 50);
        assert_eq!(sockets_within(u64::MAX), Semaphore::MAX_PERMITS);
    }
}
