//! The connection every Redis-backed part other than the ledger opens (rate limits, status
//! cache): reconnecting by itself (redis's `ConnectionManager`), every call and connection
//! attempt bounded by the store's `command_timeout`, and errors that never repeat the URL.

use std::time::Duration;

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
        .set_number_of_retries(1);
    client
        .get_connection_manager_with_config(config)
        .await
        .map_err(|e| format!("cannot connect to Redis for {what}: {e}"))
}
