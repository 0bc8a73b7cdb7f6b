//! The connection every Redis-backed part other than the ledger opens (rate limits, status
//! cache): reconnecting by itself (redis's `ConnectionManager`), every call and connection
//! attempt bounded by the store's `command_timeout`, and errors that never repeat the URL.
//! [`bounded`] is how every part of the gateway, the ledger too, makes one call, and
//! [`RedisEndpoint`] what every part, the ledger too, connects to.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ClientTlsConfig, RedisResult, TlsCertificates};

use crate::config::{RedisTls, Secret};

/// A Redis to connect to: its URL, password included (so a [`Secret`]), and the certificates
/// that a `rediss://` URL needs beyond the public roots.
#[derive(Debug, Clone)]
pub struct RedisEndpoint {
    pub url: Secret,
    pub tls: RedisTls,
}

impl RedisEndpoint {
    /// A plain `redis://` URL, or a `rediss://` one whose server the public roots vouch for.
    pub fn from_url(url: impl Into<String>) -> RedisEndpoint {
        RedisEndpoint {
            url: Secret::new(url),
            tls: RedisTls::default(),
        }
    }

    /// A client for the endpoint. The certificate files are read here, so a missing or
    /// unreadable one stops the gateway at start, naming the file; what they hold never
    /// appears in an error.
    pub fn client(&self) -> Result<redis::Client, String> {
        let url = self.url.expose();
        if self.tls == RedisTls::default() {
            return redis::Client::open(url)
                .map_err(|e| format!("Redis URL not usable: {:?}", e.kind()));
        }
        let read = |setting: &str, path: &Path| {
            std::fs::read(path)
                .map_err(|e| format!("cannot read [store] {setting} {}: {e}", path.display()))
        };
        let root_cert = match &self.tls.ca_file {
            Some(path) => Some(read("ca_file", path)?),
            None => None,
        };
        let client_tls = match &self.tls.client_cert {
            Some((cert, key)) => Some(ClientTlsConfig {
                client_cert: read("client_cert_file", cert)?,
                client_key: read("client_key_file", key)?,
            }),
            None => None,
        };
        redis::Client::build_with_tls(
            url,
            TlsCertificates {
                client_tls,
                root_cert,
            },
        )
        .map_err(|e| {
            format!(
                "[store] ca_file, client_cert_file or client_key_file not usable ({:?}): {}",
                e.kind(),
                e.detail().unwrap_or("not PEM certificates and a key")
            )
        })
    }
}

/// Connects now, so a gateway started against a Redis it cannot reach says so at once; `what`
/// names the part in the error.
pub async fn connect(
    endpoint: &RedisEndpoint,
    command_timeout: Duration,
    what: &str,
) -> Result<ConnectionManager, String> {
    let client = endpoint.client()?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(command_timeout))
        .set_connection_timeout(Some(command_timeout))
        .set_number_of_retries(1)
        .set_max_delay(command_timeout);
    client
        .get_connection_manager_with_config(config)
        .await
        .map_err(|e| format!("cannot connect to Redis for {what}: {e}"))
}

/// Why a [`bounded`] call has no answer.
#[derive(Debug)]
pub enum CallError {
    Redis(redis::RedisError),
    TimedOut(Duration),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Redis(e) => write!(f, "redis: {e}"),
            CallError::TimedOut(timeout) => write!(
                f,
                "redis did not answer within {}",
                humantime::format_duration(*timeout)
            ),
        }
    }
}

/// Runs one request to Redis, cut off at `timeout`. The connection manager's own timeouts bound
/// a command and each connection attempt, but a call made while it reconnects waits for all of
/// its attempts and the backoff between them: only this bounds the whole call.
pub async fn bounded<T>(
    timeout: Duration,
    request: impl Future<Output = RedisResult<T>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(timeout, request).await {
        Ok(result) => result.map_err(CallError::Redis),
        Err(_) => Err(CallError::TimedOut(timeout)),
    }
}
