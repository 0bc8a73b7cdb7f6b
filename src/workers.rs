//! The threads that serve HTTP: one single-threaded runtime each, about one per core.
//!
//! The acceptor (on the control runtime, beside signals and background jobs) hands each new
//! connection to the next worker in turn, and the connection stays there: every request on it is
//! read, handled and answered by that one thread, and so are the upstream connections it uses
//! (one pool per worker, see [`current`]). Unlike one work-stealing runtime, this never pays the
//! wake-ups tokio's scheduler makes to share work between its threads (a futex call and an
//! inter-processor interrupt each), which on a small machine cost more than the work they share.
//! Round robin gives every worker an equal share of the connections, whatever their addresses.
//!
//! Every connection is bounded (see [`ConnectionLimits`]): at most `server.max_connections` are
//! open at once, a client that is slow to send a request head is dropped, and so is a connection
//! idle for `server.keep_alive_timeout`, or an HTTP/2 one that stops answering pings. Without these, silent or half-sent connections pile up until file descriptors or memory
//! run out for everyone.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::pending;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounter, IntGauge};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use crate::logging;

thread_local! {
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the worker this thread is, or `None` off the workers (the control runtime).
pub fn current() -> Option<usize> {
    WORKER.with(Cell::get)
}

/// A connection, and its place among the most open ones (freed on close).
type Handoff = (std::net::TcpStream, Place);

/// An open connection's place under the most open ones, counted in the open gauge.
struct Place {
    _permit: OwnedSemaphorePermit,
    open: IntGauge,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// How long a connection may take over its parts, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Most open connections; above it new ones are closed at once.
    pub max_connections: usize,
    /// Longest wait for a complete request head.
    pub header_read_timeout: Duration,
    /// Longest a connection stays open with no request in flight.
    pub keep_alive_timeout: Duration,
}

/// Where the workers count their connections.
pub struct ConnectionCounts {
    /// Accepted, one counter per worker: as many workers start as there are counters.
    pub accepted: Vec<IntCounter>,
    /// Open now.
    pub open: IntGauge,
    /// Closed unread at the most open connections.
    pub refused: IntCounter,
}

/// Most bytes of an HTTP/1 request head (hyper answers 431 above it; HTTP/2 has hyper's own
/// 16 KiB). Real heads, a bearer key among them, take a few KiB; hyper's default of 400 KiB let
/// each slow client hold that much until its head-read timeout.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Between HTTP/2 pings to a connection that has gone quiet, and the longest wait for each
/// answer: a peer that vanished without closing is found within both.
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(20);
const HTTP2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// The running workers and the acceptor's end of their hand-off queues.
pub struct Workers {
    handoffs: Vec<mpsc::UnboundedSender<Handoff>>,
    accepted: Vec<IntCounter>,
    places: Arc<Semaphore>,
    open: IntGauge,
    refused: IntCounter,
    next: usize,
    finished: Vec<oneshot::Receiver<()>>,
}

impl Workers {
    /// Starts a worker per counter in `counts.accepted`, threads named `{name}-{index}`, serving
    /// `app`. When `stop` is cancelled each stops taking connections, finishes the requests it
    /// has, then waits until `background` (closed by then) is empty, since work spawned by its
    /// handlers runs on its runtime.
    pub fn start(
        name: &str,
        app: Router,
        limits: ConnectionLimits,
        stop: CancellationToken,
        background: TaskTracker,
        counts: ConnectionCounts,
    ) -> io::Result<Workers> {
        let count = counts.accepted.len();
        let mut workers = Workers {
            handoffs: Vec::with_capacity(count),
            accepted: counts.accepted,
            places: Arc::new(Semaphore::new(limits.max_connections)),
            open: counts.open,
            refused: counts.refused,
            next: 0,
            finished: Vec::with_capacity(count),
        };
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(logging::hand_over_gathered)
                .build()?;
            let (handoff, incoming) = mpsc::unbounded_channel();
            let (done, finished) = oneshot::channel::<()>();
            let (app, stop, background) = (app.clone(), stop.clone(), background.clone());
            std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    WORKER.set(Some(index));
                    logging::gather_lines_on_this_thread();
                    runtime.block_on(async move {
                        serve(incoming, app, limits, stop).await;
                        background.wait().await;
                    });
                    logging::hand_over_gathered();
                    drop(done);
                })?;
            workers.handoffs.push(handoff);
            workers.finished.push(finished);
        }
        Ok(workers)
    }

    /// Gives a newly accepted connection to the next worker.
    pub fn hand(&mut self, stream: TcpStream, remote: SocketAddr) {
        let Ok(permit) = self.places.clone().try_acquire_owned() else {
            self.refused.inc();
            // Closed unread: the client sees the connection end and may retry later, and the
            // process keeps the descriptors it needs for the connections it serves. Debug: a
            // flood would otherwise be a flood of log lines too.
            tracing::debug!(%remote, "at the most open connections; closing a new connection");
            return;
        };
        self.open.inc();
        let place = Place {
            _permit: permit,
            open: self.open.clone(),
        };
        // Off this runtime's poller, to be registered with the worker's.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand over a connection; closing it");
                return;
            }
        };
        let mut handoff = (stream, place);
        for _ in 0..self.handoffs.len() {
            let worker = self.next;
            self.next = (self.next + 1) % self.handoffs.len();
            match self.handoffs[worker].send(handoff) {
                Ok(()) => {
                    self.accepted[worker].inc();
                    return;
                }
                Err(mpsc::error::SendError(back)) => {
                    tracing::error!(worker, "a worker has stopped; trying the next");
                    handoff = back;
                }
            }
        }
        tracing::error!("every worker has stopped; closing a new connection");
    }

    /// Resolves when every worker has finished (after `stop` was cancelled).
    pub async fn finished(self) {
        drop(self.handoffs);
        for finished in self.finished {
            let _ = finished.await;
        }
    }
}

/// Serves the connections handed to this worker until `stop`, then lets them finish.
async fn serve(
    mut incoming: mpsc::UnboundedReceiver<Handoff>,
    app: Router,
    limits: ConnectionLimits,
    stop: CancellationToken,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(HTTP2_PING_INTERVAL)
        .keep_alive_timeout(HTTP2_PING_TIMEOUT);
    let builder = Arc::new(builder);
    let connections = TaskTracker::new();
    loop {
        let handoff = tokio::select! {
            _ = stop.cancelled() => break,
            handoff = incoming.recv() => handoff,
        };
        // The acceptor has gone: shutdown is under way, and `stop` ends serving.
        let Some((stream, place)) = handoff else {
            stop.cancelled().await;
            break;
        };
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "cannot take over a connection; closing it");
                continue;
            }
        };
        connections.spawn(serve_connection(
            stream,
            app.clone(),
            builder.clone(),
            limits,
            stop.clone(),
            place,
        ));
    }
    connections.close();
    connections.wait().await;
}

/// Serves one connection until the client closes it, or it stays idle for `keep_alive_timeout`,
/// or `stop` is cancelled (the last two let the requests in flight finish first). One whose
/// first request has not begun within `header_read_timeout` is dropped: hyper times each request
/// head, but not the bytes it first reads to tell HTTP/1 from HTTP/2.
async fn serve_connection(
    stream: TcpStream,
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: ConnectionLimits,
    stop: CancellationToken,
    _place: Place,
) {
    let activity = Arc::new(Activity::new());
    let mut idle = pin!(idle_for(activity.clone(), limits.keep_alive_timeout));
    let mut no_first_request = pin!({
        let activity = activity.clone();
        async move {
            tokio::time::sleep(limits.header_read_timeout).await;
            if activity.has_begun() {
                pending::<()>().await;
            }
        }
    });
    let service = tower::service_fn(move |request: hyper::Request<Incoming>| {
        let guard = InFlight::start(activity.clone());
        let response = app.clone().oneshot(request);
        async move {
            let response = response.await?;
            Ok::<_, Infallible>(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _ = &guard;
                    frame
                }))
            }))
        }
    });
    let connection = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service));
    let mut connection = pin!(connection);
    let mut stopping = pin!(stop.cancelled());
    let mut closing = false;
    loop {
        tokio::select! {
            // The connection first: it is the branch that is ready on nearly every wake-up.
            biased;
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = &mut no_first_request => {
                tracing::debug!("no request head in time; closing the connection");
                return;
            }
            () = &mut idle, if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            () = &mut stopping, if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// Resolves once no request has been in flight for `timeout`. Its timer fires at most once
/// per `timeout` and reads what the requests left in [`Activity`], so a request neither arms nor
/// wakes it.
async fn idle_for(activity: Arc<Activity>, timeout: Duration) {
    let mut timer = pin!(tokio::time::sleep_until(activity.opened + timeout));
    loop {
        timer.as_mut().await;
        let next_look = match activity.quiet_since() {
            Some(since) if since + timeout <= Instant::now() => return,
            Some(since) => since + timeout,
            // Busy: no sooner idle than a whole timeout after it ends.
            None => Instant::now() + timeout,
        };
        timer.as_mut().reset(next_look);
    }
}

/// What a connection's requests tell its timers: how many have begun and ended, and when the
/// last one ended. Each request writes it with three atomic operations; the timers read it only
/// when they fire.
struct Activity {
    opened: Instant,
    begun: AtomicU64,
    ended: AtomicU64,
    /// When the last request ended, in microseconds since `opened`.
    last_end_micros: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            opened: Instant::now(),
            begun: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            last_end_micros: AtomicU64::new(0),
        }
    }

    fn has_begun(&self) -> bool {
        self.begun.load(Ordering::Relaxed) > 0
    }

    /// Since when no request has been in flight, or `None` while one is.
    fn quiet_since(&self) -> Option<Instant> {
        // `ended` first: a request that ends between the two loads is then still counted busy.
        let ended = self.ended.load(Ordering::Acquire);
        if self.begun.load(Ordering::Acquire) != ended {
            return None;
        }
        let micros = self.last_end_micros.load(Ordering::Relaxed);
        Some(self.opened + Duration::from_micros(micros))
    }
}

/// One request in flight on a connection: from the call until its response body is dropped
/// (sent, or abandoned with the connection), so a slow download is not taken for idleness.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> InFlight {
        activity.begun.fetch_add(1, Ordering::Release);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        let micros = u64::try_from(activity.opened.elapsed().as_micros()).unwrap_or(u64::MAX);
        activity.last_end_micros.store(micros, Ordering::Relaxed);
        activity.ended.fetch_add(1, Ordering::Release);
    }
}
