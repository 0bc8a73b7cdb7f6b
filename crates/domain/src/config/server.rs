//! `[server]`: where the gateway listens and how long it gives requests and shutdown.

use std::num::NonZeroUsize;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Invalid;
use super::values::{HttpUrl, HumanDuration};

/// Most HTTP worker threads (`server.workers`): far more than cores only adds switching.
pub const MAX_WORKERS: usize = 256;

const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// `[server]` as written; a key left out takes the default above.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    listen: Option<String>,
    public_url: Option<Spanned<HttpUrl>>,
    max_body_bytes: Option<usize>,
    request_timeout: Option<HumanDuration>,
    metrics_listen: Option<String>,
    shutdown_timeout: Option<HumanDuration>,
    workers: Option<Spanned<usize>>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: String,
    pub public_url: Option<url::Url>,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub metrics_listen: Option<String>,
    pub shutdown_timeout: Duration,
    /// Threads that serve HTTP, each on its own share of the connections.
    pub workers: NonZeroUsize,
}

impl TryFrom<RawServer> for ServerConfig {
    type Error = Invalid;

    fn try_from(raw: RawServer) -> Result<Self, Invalid> {
        let workers = match raw.workers {
            None => std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            Some(workers) => NonZeroUsize::new(*workers.get_ref())
                .filter(|n| n.get() <= MAX_WORKERS)
                .ok_or_else(|| {
                    Invalid::at(
                        workers.span(),
                        format!("[server] workers must be between 1 and {MAX_WORKERS}"),
                    )
                })?,
        };
        let public_url = match raw.public_url {
            None => None,
            Some(url)
                if url.get_ref().0.query().is_some() || url.get_ref().0.fragment().is_some() =>
            {
                return Err(Invalid::at(
                    url.span(),
                    "[server] public_url must not have a query or fragment: callback paths are \
                     appended to it",
                ));
            }
            Some(url) => Some(url.into_inner().0),
        };
        Ok(ServerConfig {
            listen: raw.listen.unwrap_or_else(|| DEFAULT_LISTEN.into()),
            public_url,
            max_body_bytes: raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
            request_timeout: raw
                .request_timeout
                .map_or(DEFAULT_REQUEST_TIMEOUT, Duration::from),
            metrics_listen: raw.metrics_listen,
            shutdown_timeout: raw
                .shutdown_timeout
                .map_or(DEFAULT_SHUTDOWN_TIMEOUT, Duration::from),
            workers,
        })
    }
}

impl ServerConfig {
    /// The keys whose new value only a restart applies: the listeners, the workers and the stack
    /// that bounds each request are built once, at start.
    pub(super) fn restart_only_changes(&self, new: &Self) -> Vec<&'static str> {
        let ServerConfig {
            listen,
            workers,
            request_timeout,
            shutdown_timeout,
            metrics_listen,
            // Read by each request.
            public_url: _,
            max_body_bytes: _,
        } = self;
        super::changed([
            ("listen", *listen != new.listen),
            ("workers", *workers != new.workers),
            ("request_timeout", *request_timeout != new.request_timeout),
            (
                "shutdown_timeout",
                *shutdown_timeout != new.shutdown_timeout,
            ),
            ("metrics_listen", *metrics_listen != new.metrics_listen),
        ])
    }
}
