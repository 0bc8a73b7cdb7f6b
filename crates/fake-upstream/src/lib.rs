//! A faithful fake of the Ketchup upstream (api.defapi.org), for tests, the demo and benchmarks.
//!
//! It answers the asynchronous endpoints, the task query, the balance and the three text
//! dialects with the contract's exact bodies and status codes
//! (`/work/shared/upstream/CONTRACT.md`), renders on a clock-driven schedule (pending → submitted
//! → in_progress → success | failed), calls webhooks, counts everything a test may want to
//! assert, and injects faults on demand. Out of process it is driven through `/_fake/*`.
//!
//! It is served with hyper directly rather than `axum::serve`, because one fault must close the
//! TCP connection without any response: each connection runs in its own task, and a handler can
//! ask that task (through a `ConnectionHandle` in the request's extensions) to drop it.

mod api;
mod callbacks;
mod catalog;
mod faults;
mod state;
mod text;
mod wire;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tower::ServiceExt;

pub use faults::{Fault, FaultCounts, FaultRates, Faults};
pub use state::{FakeAccountView, FakeStats, FakeTaskView, RECORD_CAP, TaskStatus};
pub use text::{TextConfig, TextExchange, TextFault, TextFaults};

use ketchup_domain::clock::{self, SharedClock};
use ketchup_domain::credits::Credits;

/// The name of the account of [`FakeConfig::token`].
pub const DEFAULT_ACCOUNT: &str = "default";

/// An account beside the default one: its own token, its own balance, its own tasks (which only
/// its token can read).
#[derive(Clone)]
pub struct FakeAccount {
    pub name: String,
    pub token: String,
    pub initial_balance: Credits,
}

/// How the fake behaves. [`FakeConfig::new`] gives working defaults; adjust the fields.
#[derive(Clone)]
pub struct FakeConfig {
    /// The default account's bearer token (the only one, unless `accounts` adds more).
    pub token: String,
    /// More accounts, each with its own token and balance.
    pub accounts: Vec<FakeAccount>,
    /// Model → what one unit of a successful task consumes: an image (times `n`, and 2 or 4
    /// for an `image_size` of `2k` or `4k`), a second of video, or the task for endpoints
    /// without either. A model missing here gets a 400.
    pub consumed: BTreeMap<String, Credits>,
    /// How long a task stays `pending`, then `submitted`, then `in_progress` before it is final.
    pub pending_for: Duration,
    pub submitted_for: Duration,
    pub in_progress_for: Duration,
    /// A new task answers 404 "task not found" to queries for this long (the contract's open
    /// point: a new task can briefly be unknown to the query endpoint).
    pub unknown_for: Duration,
    /// Task states are computed from `clock.now() - created_at`.
    pub clock: SharedClock,
    /// The default account's `/api/user` balance before any task finished.
    pub initial_balance: Credits,
    /// The text models and how their answers come.
    pub text: TextConfig,
}

impl FakeConfig {
    /// Every model of the contract at its [`default_prices`] (the guide's two image models at
    /// 0.50 an image), one second per phase, no early-404 window, the system clock and a
    /// balance of 100.50.
    pub fn new(token: impl Into<String>) -> Self {
        FakeConfig {
            token: token.into(),
            accounts: Vec::new(),
            consumed: default_prices(),
            pending_for: Duration::from_secs(1),
            submitted_for: Duration::from_secs(1),
            in_progress_for: Duration::from_secs(1),
            unknown_for: Duration::ZERO,
            clock: clock::system(),
            initial_balance: Credits::from_units(10_050_000_000),
            text: TextConfig::default(),
        }
    }
}

/// What the fake charges a unit of each model by default: made-up prices of a plausible size,
/// video by the second.
pub fn default_prices() -> BTreeMap<String, Credits> {
    let cents = |n: i64| Credits::from_units(n * 1_000_000);
    [
        ("google/gempix2", cents(50)),
        ("google/gemini-2.5-flash-image", cents(50)),
        ("google/nano-banana", cents(4)),
        ("google/nano-banana-2", cents(6)),
        ("google/nano-banana-pro", cents(15)),
        ("google/gemini-3.1-flash-image-preview", cents(6)),
        ("openai/gpt-image-1.5", cents(8)),
        ("openai/gpt-image-2", cents(10)),
        ("wan-2.7-image", cents(5)),
        ("midjourney/imagine", cents(20)),
        ("midjourney/edits", cents(25)),
        ("sora-2", cents(10)),
        ("sora-2-hd", cents(20)),
        ("sora-2-pro", cents(30)),
        ("grok-imagine-video", cents(8)),
        ("seedance-2.0", cents(12)),
        ("google/veo3.1-fast", cents(150)),
        ("chirp-v4-5", cents(10)),
    ]
    .into_iter()
    .map(|(model, price)| (model.to_owned(), price))
    .collect()
}

impl fmt::Debug for FakeConfig {
    /// Leaves out the token (a secret in spirit) and the clock (not `Debug`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeConfig")
            .field("consumed", &self.consumed)
            .field("pending_for", &self.pending_for)
            .field("submitted_for", &self.submitted_for)
            .field("in_progress_for", &self.in_progress_for)
            .field("unknown_for", &self.unknown_for)
            .field("initial_balance", &self.initial_balance)
            .field(
                "accounts",
                &self.accounts.iter().map(|a| &a.name).collect::<Vec<_>>(),
            )
            .field("text", &self.text)
            .finish_non_exhaustive()
    }
}

/// A running fake. Dropping it (or [`FakeHandle::shutdown`]) stops the server, its open
/// connections and pending callback deliveries.
pub struct FakeHandle {
    addr: SocketAddr,
    shared: Arc<state::Shared>,
    text: Arc<text::TextShared>,
    server: JoinHandle<()>,
    callbacks: JoinHandle<()>,
}

impl FakeHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A snapshot of everything counted so far, with every task as of now.
    pub fn stats(&self) -> FakeStats {
        self.shared.stats(true)
    }

    /// Revokes account `name`'s token: every call with it is answered 401 until
    /// [`FakeHandle::restore`]. Panics if there is no such account.
    pub fn revoke(&self, name: &str) {
        assert!(
            self.shared.set_revoked(name, true),
            "no fake account {name}"
        );
    }

    /// Accepts account `name`'s token again.
    pub fn restore(&self, name: &str) {
        assert!(
            self.shared.set_revoked(name, false),
            "no fake account {name}"
        );
    }

    /// Adds `amount` to account `name`'s balance (a negative amount takes it away).
    pub fn top_up(&self, name: &str, amount: Credits) {
        assert!(self.shared.top_up(name, amount), "no fake account {name}");
    }

    /// Zeroes the statistics, as `POST /_fake/reset` does; tasks and balance stay.
    pub fn reset_stats(&self) {
        self.shared.reset_stats();
        self.text.log.clear();
    }

    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// The failures queued for the next text requests.
    pub fn text_faults(&self) -> &TextFaults {
        &self.text.faults
    }

    /// Every text request so far (the first [`RECORD_CAP`]), as it was answered.
    pub fn text_exchanges(&self) -> Vec<TextExchange> {
        self.text.log.exchanges()
    }

    /// When the first event of each text stream was handed to its connection, in order: an
    /// `Instant` of this process, to set beside when a client in it received the event.
    pub fn text_first_chunks_sent(&self) -> Vec<std::time::Instant> {
        self.text.log.first_chunks_sent()
    }

    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for FakeHandle {
    fn drop(&mut self) {
        self.server.abort();
        self.callbacks.abort();
    }
}

/// Starts a fake on `127.0.0.1` with an ephemeral port.
pub async fn start(config: FakeConfig) -> io::Result<FakeHandle> {
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
    serve(config, listener).await
}

/// Serves a fake on `listener` in background tasks. Must run inside a tokio runtime.
pub async fn serve(config: FakeConfig, listener: TcpListener) -> io::Result<FakeHandle> {
    let addr = listener.local_addr()?;
    let text_config = config.text.clone();
    let shared = Arc::new(state::Shared::new(
        config,
        format!("http://{addr}/_fake/files"),
    ));
    let text = Arc::new(text::TextShared::new(shared.clone(), text_config));
    let router = api::router(shared.clone()).merge(text::router(text.clone()));
    let server = tokio::spawn(accept_loop(listener, router));
    let callbacks = tokio::spawn(callbacks::run(shared.clone()));
    Ok(FakeHandle {
        addr,
        shared,
        text,
        server,
        callbacks,
    })
}

/// Serves a fake on `listen` until ctrl-c: the `fake-upstream` subcommand of the binary.
pub async fn run_standalone(listen: SocketAddr, config: FakeConfig) -> io::Result<()> {
    let handle = serve(config, TcpListener::bind(listen).await?).await?;
    tracing::info!(addr = %handle.addr(), "fake upstream listening");
    tokio::signal::ctrl_c().await?;
    tracing::info!("fake upstream stopping");
    handle.shutdown();
    Ok(())
}

/// Accepts connections forever; they live in a `JoinSet`, so aborting this task ends them too.
async fn accept_loop(listener: TcpListener, router: Router) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, router.clone()));
                }
                Err(error) => {
                    // Typically out of file descriptors: pause instead of spinning.
                    tracing::warn!(%error, "fake upstream: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Serves one connection (HTTP/1.1 or HTTP/2) until it ends or a handler asks to drop it.
async fn serve_connection(stream: TcpStream, router: Router) {
    // Benchmarks send many small requests; Nagle would only add latency.
    let _ = stream.set_nodelay(true);
    let kill = Arc::new(Notify::new());
    let handle = ConnectionHandle(kill.clone());
    let service = router.map_request(move |mut request: http::Request<Incoming>| {
        request.extensions_mut().insert(handle.clone());
        request
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection =
        builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
    tokio::select! {
        served = connection => {
            if let Err(error) = served {
                tracing::debug!(%error, "fake upstream: connection ended with an error");
            }
        }
        // Dropping the unfinished connection closes the socket: the client gets no response.
        () = kill.notified() => {}
    }
}

/// Lets a handler end its own connection without answering (the `DropConnection` fault).
#[derive(Clone)]
pub(crate) struct ConnectionHandle(Arc<Notify>);

impl ConnectionHandle {
    /// Asks the connection task to drop the connection, then waits to be dropped with it.
    async fn drop_now(&self) -> Response {
        self.0.notify_one();
        std::future::pending().await
    }
}
