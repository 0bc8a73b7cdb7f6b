//! The connection every Redis-backed part other than the ledger opens (rate limits, status
//! cache): reconnecting by itself (redis's `ConnectionManager`), every call and connection
//! attempt bounded by the store's `command_timeout`, and errors that never repeat the URL.
//! [`bounded`] is how every part of the gateway, the ledger too, makes one call.

use std::future::Future;
use std::time::Duration;

use redis::RedisResult;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Connects now, so a gateway started against a Redis it cannot reach says so at once; `what`
/// names the part in the error.
pub async fn connect(
    url: &str,
    command_timeout: Duration,
    what: &str,
) -> Result<ConnectionManager, String> {
    let client =
        redis::Client::open(url).map_err(|e| format!("Redis URL not usable: {:?}", e.kind()))?;
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
