//! `[server]`: where the gateway listens and how long it gives requests and shutdown.

use std::num::NonZeroUsize;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Invalid;
use super::values::{HttpUrl, HumanDuration, above_zero};

/// Most HTTP worker threads (`server.workers`): far more than cores only adds switching.
pub const MAX_WORKERS: usize = 256;

const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// The IETF draft's example lifetime of an Idempotency-Key: long enough for any client's retries.
const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);
/// The defaults of the limits on each connection, also for stacks built without a config.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(75);
/// Far above what one gateway serves at once, and far below the 1,048,576 descriptors a
/// container usually gets (`ulimit -n`): the upstream pool, the ledger and logs keep theirs.
pub const DEFAULT_MAX_CONNECTIONS: NonZeroUsize = NonZeroUsize::new(10_000).unwrap();

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
    header_read_timeout: Option<Spanned<HumanDuration>>,
    keep_alive_timeout: Option<Spanned<HumanDuration>>,
    max_connections: Option<Spanned<usize>>,
    pub(super) idempotency_ttl: Option<Spanned<HumanDuration>>,
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
    /// Longest a connection may take to send a complete request head.
    pub header_read_timeout: Duration,
    /// Longest a connection stays open with no request in flight.
    pub keep_alive_timeout: Duration,
    /// Most connections open at once; a new one above it is closed unread.
    pub max_connections: NonZeroUsize,
    /// How long an Idempotency-Key names one request of its team: a repeat within it gets the
    /// first answer; after it the key is free, and its claim is deleted.
    pub idempotency_ttl: Duration,
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
        let header_read_timeout =
            positive_duration(raw.header_read_timeout, "header_read_timeout")?
                .unwrap_or(DEFAULT_HEADER_READ_TIMEOUT);
        let keep_alive_timeout = positive_duration(raw.keep_alive_timeout, "keep_alive_timeout")?
            .unwrap_or(DEFAULT_KEEP_ALIVE_TIMEOUT);
        let max_connections = match raw.max_connections {
            None => DEFAULT_MAX_CONNECTIONS,
            Some(max) => NonZeroUsize::new(*max.get_ref()).ok_or_else(|| {
                Invalid::at(
                    max.span(),
                    "[server] max_connections must be at least 1: with 0 nothing is served",
                )
            })?,
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
            header_read_timeout,
            keep_alive_timeout,
            max_connections,
            idempotency_ttl: above_zero(
                "[server] idempotency_ttl",
                raw.idempotency_ttl,
                DEFAULT_IDEMPOTENCY_TTL,
            )?,
        })
    }
}

/// A timeout that must be more than zero: with zero every connection would close at once.
fn positive_duration(
    value: Option<Spanned<HumanDuration>>,
    key: &str,
) -> Result<Option<Duration>, Invalid> {
    let Some(value) = value else { return Ok(None) };
    let duration = Duration::from(*value.get_ref());
    if duration.is_zero() {
        return Err(Invalid::at(
            value.span(),
            format!("[server] {key} must be more than zero: with zero every connection closes"),
        ));
    }
    Ok(Some(duration))
}

impl ServerConfig {
    /// The keys whose new value only a restart applies: the listeners, the workers, the limits on
    /// their connections and the stack that bounds each request are built once, at start.
    pub(super) fn restart_only_changes(&self, new: &Self) -> Vec<&'static str> {
        let ServerConfig {
            listen,
            workers,
            request_timeout,
            shutdown_timeout,
            metrics_listen,
            header_read_timeout,
            keep_alive_timeout,
            max_connections,
            // Read by each request (and the reconciler's purge of expired keys).
            public_url: _,
            max_body_bytes: _,
            idempotency_ttl: _,
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
            (
                "header_read_timeout",
                *header_read_timeout != new.header_read_timeout,
            ),
            (
                "keep_alive_timeout",
                *keep_alive_timeout != new.keep_alive_timeout,
            ),
            ("max_connections", *max_connections != new.max_connections),
        ])
    }
}
