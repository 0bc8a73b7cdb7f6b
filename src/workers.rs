//! The threads that serve HTTP: one single-threaded runtime each, about one per core.
//!
//! The acceptor (on the control runtime, beside signals and background jobs) hands each new
//! connection to the next worker in turn, and the connection stays there: every request on it is
//! read, handled and answered by that one thread, and so are the upstream connections it uses
//! (one pool per worker, see [`current`]). Unlike one work-stealing runtime, this never pays the
//! wake-ups tokio's scheduler makes to share work between its threads (a futex call and an
//! inter-processor interrupt each), which on a small machine cost more than the work they share.
//! Round robin gives every worker an equal share of the connections, whatever their addresses.

use std::cell::Cell;
use std::future::pending;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;

use axum::Router;
use prometheus::{IntCounter, IntCounterVec};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::logging;

thread_local! {
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the worker this thread is, or `None` off the workers (the control runtime).
pub fn current() -> Option<usize> {
    WORKER.with(Cell::get)
}

type Handoff = (std::net::TcpStream, SocketAddr);

/// The running workers and the acceptor's end of their hand-off queues.
pub struct Workers {
    handoffs: Vec<mpsc::UnboundedSender<Handoff>>,
    accepted: Vec<IntCounter>,
    next: usize,
    finished: Vec<oneshot::Receiver<()>>,
}

impl Workers {
    /// Starts `count` workers serving `app`. When `stop` is cancelled each stops taking
    /// connections, finishes the requests it has, then waits until `background` (closed by then)
    /// is empty, since work spawned by its handlers runs on its runtime.
    pub fn start(
        count: NonZeroUsize,
        app: Router,
        local_addr: SocketAddr,
        stop: CancellationToken,
        background: TaskTracker,
        accepted: &IntCounterVec,
    ) -> io::Result<Workers> {
        let mut workers = Workers {
            handoffs: Vec::with_capacity(count.get()),
            accepted: Vec::with_capacity(count.get()),
            next: 0,
            finished: Vec::with_capacity(count.get()),
        };
        for index in 0..count.get() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(logging::hand_over_gathered)
                .build()?;
            let (handoff, incoming) = mpsc::unbounded_channel();
            let (done, finished) = oneshot::channel::<()>();
            let listener = HandedOff {
                incoming,
                local_addr,
            };
            let (app, stop, background) = (app.clone(), stop.clone(), background.clone());
            std::thread::Builder::new()
                .name(format!("http-worker-{index}"))
                .spawn(move || {
                    WORKER.set(Some(index));
                    logging::gather_lines_on_this_thread();
                    runtime.block_on(async move {
                        let serving = axum::serve(listener, app)
                            .with_graceful_shutdown(stop.cancelled_owned())
                            .await;
                        if let Err(e) = serving {
                            tracing::error!(worker = index, error = %e, "worker stopped serving");
                        }
                        background.wait().await;
                    });
                    logging::hand_over_gathered();
                    drop(done);
                })?;
            workers.handoffs.push(handoff);
            workers
                .accepted
                .push(accepted.with_label_values(&[&index.to_string()]));
            workers.finished.push(finished);
        }
        Ok(workers)
    }

    /// Gives a newly accepted connection to the next worker.
    pub fn hand(&mut self, stream: TcpStream, remote: SocketAddr) {
        // Off this runtime's poller, to be registered with the worker's.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand over a connection; closing it");
                return;
            }
        };
        let mut handoff = (stream, remote);
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

/// A worker's listener, fed by the acceptor.
struct HandedOff {
    incoming: mpsc::UnboundedReceiver<Handoff>,
    local_addr: SocketAddr,
}

impl axum::serve::Listener for HandedOff {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            // The acceptor has gone: shutdown is under way, and its signal ends serving.
            let Some((stream, remote)) = self.incoming.recv().await else {
                return pending().await;
            };
            match TcpStream::from_std(stream) {
                Ok(stream) => return (stream, remote),
                Err(e) => tracing::warn!(error = %e, "cannot take over a connection; closing it"),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local_addr)
    }
}
