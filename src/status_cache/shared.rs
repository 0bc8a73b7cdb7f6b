//! The cluster-wide layer of the status cache, in Redis, for several replicas.
//!
//! Each replica keeps its own moka cache in front; this layer sits behind it, so a status one
//! replica read from the upstream serves the others too, and many replicas together still cost
//! the upstream about one read per task per `status_ttl`. It is only an optimisation: any
//! failure is a miss (the upstream is asked), and after repeated failures a circuit breaker
//! skips Redis entirely for a while, so an outage costs no waiting on every miss.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use failsafe::futures::CircuitBreaker;
use http::{HeaderValue, StatusCode};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

use super::Answer;
use ketchup_domain::ledger::breaker::{OutageBreaker, outage_breaker};
use ketchup_domain::redis_client::{RedisEndpoint, bounded};

/// How long Redis keeps a final status. Unlike the local cache it has no size bound of its own,
/// so final statuses expire; a day covers any client still polling a finished task.
const FINAL_TTL: Duration = Duration::from_secs(24 * 3600);

pub struct SharedStatuses {
    conn: ConnectionManager,
    prefix: String,
    /// How long a running status is kept, as in the local cache.
    running_ttl: Duration,
    timeout: Duration,
    breaker: OutageBreaker,
}

impl SharedStatuses {
    pub async fn connect(
        endpoint: &RedisEndpoint,
        key_prefix: &str,
        command_timeout: Duration,
        running_ttl: Duration,
    ) -> Result<SharedStatuses, String> {
        let conn =
            ketchup_domain::redis_client::connect(endpoint, command_timeout, "the status cache")
                .await?;
        Ok(SharedStatuses {
            conn,
            prefix: key_prefix.to_owned(),
            running_ttl,
            timeout: command_timeout,
            breaker: outage_breaker(),
        })
    }

    fn key(&self, task_id: &str) -> String {
        format!("{}status:{task_id}", self.prefix)
    }

    pub async fn get(&self, task_id: &str) -> Option<Answer> {
        let mut conn = self.conn.clone();
        let read = self.breaker.call(bounded(self.timeout, async move {
            conn.hgetall::<_, HashMap<String, Vec<u8>>>(self.key(task_id))
                .await
        }));
        match read.await {
            Ok(fields) => decode(fields),
            Err(e) => {
                tracing::debug!(error = %e, "shared status cache read failed");
                None
            }
        }
    }

    pub async fn put(&self, task_id: &str, answer: &Answer) {
        let ttl = if answer.is_final {
            FINAL_TTL
        } else {
            self.running_ttl
        };
        let key = self.key(task_id);
        let fields: [(&str, Vec<u8>); 4] = [
            ("status", answer.status.as_str().as_bytes().to_vec()),
            (
                "final",
                if answer.is_final {
                    b"1".to_vec()
                } else {
                    b"0".to_vec()
                },
            ),
            (
                "content_type",
                answer
                    .content_type
                    .as_ref()
                    .map_or_else(Vec::new, |c| c.as_bytes().to_vec()),
            ),
            ("body", answer.body.to_vec()),
        ];
        let mut conn = self.conn.clone();
        let write = self.breaker.call(bounded(self.timeout, async move {
            redis::pipe()
                .atomic()
                .hset_multiple(&key, &fields)
                .ignore()
                .pexpire(&key, ttl.as_millis() as i64)
                .ignore()
                .query_async::<()>(&mut conn)
                .await
        }));
        if let Err(e) = write.await {
            tracing::debug!(error = %e, "shared status cache write failed");
        }
    }
}

fn decode(mut fields: HashMap<String, Vec<u8>>) -> Option<Answer> {
    let status = std::str::from_utf8(&fields.remove("status")?)
        .ok()?
        .parse::<u16>()
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())?;
    let content_type = fields
        .remove("content_type")
        .filter(|c| !c.is_empty())
        .and_then(|c| HeaderValue::from_bytes(&c).ok());
    Some(Answer {
        status,
        content_type,
        is_final: fields.remove("final")? == b"1",
        body: Bytes::from(fields.remove("body")?),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use ketchup_domain::ledger::breaker::OPEN_AFTER;
    use ketchup_test_redis::{FadingRedis, SLACK, TIMEOUT};

    fn answer(is_final: bool, body: &'static [u8]) -> Answer {
        Answer {
            status: StatusCode::OK,
            content_type: Some(HeaderValue::from_static("application/json")),
            body: Bytes::from_static(body),
            is_final,
        }
    }

    async fn connect(running_ttl: Duration) -> Option<SharedStatuses> {
        let url = ketchup_test_redis::url()?;
        let prefix = format!("test-{}:", uuid::Uuid::now_v7().simple());
        Some(
            SharedStatuses::connect(
                &RedisEndpoint::from_url(url),
                &prefix,
                Duration::from_millis(250),
                running_ttl,
            )
            .await
            .expect("Redis answers"),
        )
    }

    #[tokio::test]
    async fn replicas_see_each_others_statuses_and_running_ones_expire() {
        let Some(a) = connect(Duration::from_millis(200)).await else {
            return;
        };
        let b = SharedStatuses {
            conn: a.conn.clone(),
            prefix: a.prefix.clone(),
            running_ttl: a.running_ttl,
            timeout: a.timeout,
            breaker: outage_breaker(),
        };
        assert!(b.get("ta-1").await.is_none());
        a.put("ta-1", &answer(false, b"{\"status\":\"in_progress\"}"))
            .await;
        a.put("ta-2", &answer(true, b"{\"status\":\"success\"}"))
            .await;
        let seen = b.get("ta-1").await.expect("shared");
        assert_eq!(
            seen.body,
            Bytes::from_static(b"{\"status\":\"in_progress\"}")
        );
        assert_eq!(seen.content_type.unwrap(), "application/json");
        assert!(!seen.is_final);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(b.get("ta-1").await.is_none(), "a running status expires");
        assert!(b.get("ta-2").await.expect("a final one stays").is_final);
    }

    #[tokio::test]
    async fn a_redis_that_stops_answering_costs_each_read_and_write_at_most_the_timeout() {
        for stop in [FadingRedis::stop, FadingRedis::go_away] {
            let server = FadingRedis::start().await;
            let endpoint = RedisEndpoint::from_url(format!("redis://{}/", server.address));
            let connect =
                || SharedStatuses::connect(&endpoint, "t:", TIMEOUT, Duration::from_secs(1));
            let (reader, writer) = (connect().await.unwrap(), connect().await.unwrap());
            stop(&server);
            // Each until its breaker opens; after that nothing reaches Redis.
            for _ in 0..OPEN_AFTER {
                let started = Instant::now();
                assert!(reader.get("ta-1").await.is_none());
                assert!(
                    started.elapsed() < TIMEOUT + SLACK,
                    "{:?}",
                    started.elapsed()
                );
                let started = Instant::now();
                writer.put("ta-1", &answer(true, b"{}")).await;
                assert!(
                    started.elapsed() < TIMEOUT + SLACK,
                    "{:?}",
                    started.elapsed()
                );
            }
        }
    }

    #[tokio::test]
    async fn a_redis_that_cannot_be_reached_at_start_is_an_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        // The gateway refuses to start on a Redis it cannot reach, rather than run half-blind.
        let refused = SharedStatuses::connect(
            &RedisEndpoint::from_url(format!("redis://127.0.0.1:{port}")),
            "x:",
            Duration::from_millis(100),
            Duration::from_secs(1),
        )
        .await;
        assert!(refused.is_err());
    }
}
