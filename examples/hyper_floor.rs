//! The floor under ketchup-gateway's figures in `bench/run`: the gateway's own HTTP serving (its
//! workers, axum and hyper, an upstream pool per worker) with none of its logic: no key, limit,
//! owner, cache, metric or log line. What the gateway costs above this row is what its features
//! cost; what this row costs above nginx is what the stack costs.
//!
//! ```text
//! hyper_floor proxy <listen> <upstream>   forward each GET's path, query and Authorization
//! hyper_floor fixed <listen> <file>       answer every request with the file's bytes
//! ```

use std::{net::SocketAddr, num::NonZeroUsize, sync::Arc};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    response::{IntoResponse, Response},
};
use http::{StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use ketchup_domain::config::{
    DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_KEEP_ALIVE_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
};
use ketchup_gateway::workers::{ConnectionCounts, ConnectionLimits, Workers};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

thread_local! {
    /// A pool per worker, as the gateway has.
    static POOL: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(256).build_http();
}

async fn forward(State(upstream): State<Arc<str>>, request: Request) -> Response {
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut forwarded = http::Request::get(format!("{upstream}{path}"));
    if let Some(authorization) = request.headers().get(header::AUTHORIZATION) {
        forwarded = forwarded.header(header::AUTHORIZATION, authorization);
    }
    let Ok(forwarded) = forwarded.body(Empty::new()) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let Ok(answer) = POOL.with(Client::clone).request(forwarded).await else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    let (mut parts, body) = answer.into_parts();
    let Ok(body) = body.collect().await else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    let mut response = (parts.status, body.to_bytes()).into_response();
    if let Some(content_type) = parts.headers.remove(header::CONTENT_TYPE) {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type);
    }
    response
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, listen, target] = args.as_slice() else {
        return Err("usage: hyper_floor proxy|fixed <listen> <upstream URL | body file>".into());
    };
    let listen: SocketAddr = listen.parse().map_err(|e| format!("{listen}: {e}"))?;
    let app = match mode.as_str() {
        "proxy" => Router::new()
            .fallback(forward)
            .with_state(Arc::from(target.trim_end_matches('/'))),
        "fixed" => {
            let body = Bytes::from(std::fs::read(target).map_err(|e| format!("{target}: {e}"))?);
            Router::new().fallback(move || async move {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    Body::from(body),
                )
            })
        }
        _ => return Err(format!("unknown mode {mode}: proxy or fixed")),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let mut listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("{listen}: {e}"))?;
        let workers = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
        let accepted =
            prometheus::IntCounterVec::new(prometheus::Opts::new("accepted", "-"), &["worker"])
                .map_err(|e| e.to_string())?;
        let open = prometheus::IntGauge::new("open", "-").map_err(|e| e.to_string())?;
        let refused = prometheus::IntCounter::new("refused", "-").map_err(|e| e.to_string())?;
        let mut workers = Workers::start(
            "http-worker",
            app,
            // The gateway's defaults: the floor serves each connection as the gateway does.
            ConnectionLimits {
                max_connections: DEFAULT_MAX_CONNECTIONS.get(),
                header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
                keep_alive_timeout: DEFAULT_KEEP_ALIVE_TIMEOUT,
            },
            CancellationToken::new(),
            TaskTracker::new(),
            ConnectionCounts {
                accepted: (0..workers.get())
                    .map(|index| accepted.with_label_values(&[&index.to_string()]))
                    .collect(),
                open,
                refused,
            },
        )
        .map_err(|e| e.to_string())?;
        loop {
            let (stream, remote) = axum::serve::Listener::accept(&mut listener).await;
            workers.hand(stream, remote);
        }
    })
}
