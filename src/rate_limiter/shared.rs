//! Rate limits shared by every replica on one Redis: a team's "10/s" is 10/s across all of them.
//!
//! Each check is one GCRA step in a Lua script (`gcra.lua`), atomic in Redis and timed by Redis's
//! clock. Calls are bounded by the store's `command_timeout` and sit behind a circuit breaker, so
//! an outage answers at once; what happens then (refuse, or fall back to each replica's own
//! limiters) is the caller's choice.

use std::num::NonZeroU32;
use std::sync::LazyLock;
use std::time::Duration;

use failsafe::futures::CircuitBreaker;
use redis::aio::ConnectionManager;

use super::{LimitKind, Verdict};
use ketchup_domain::config::Rate;
use ketchup_domain::ledger::breaker::{OutageBreaker, outage_breaker};
use ketchup_domain::redis_client::{RedisEndpoint, bounded};

static GCRA: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("gcra.lua")));

pub struct SharedLimits {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    breaker: OutageBreaker,
    /// With Redis unreachable: fall back to this replica's own limiters (`true`) or refuse.
    pub fail_open: bool,
}

impl SharedLimits {
    pub async fn connect(
        endpoint: &RedisEndpoint,
        key_prefix: &str,
        command_timeout: Duration,
        fail_open: bool,
    ) -> Result<SharedLimits, String> {
        let conn =
            ketchup_domain::redis_client::connect(endpoint, command_timeout, "rate limits").await?;
        Ok(SharedLimits {
            conn,
            prefix: key_prefix.to_owned(),
            timeout: command_timeout,
            breaker: outage_breaker(),
            fail_open,
        })
    }

    /// One request against the limit `name` (`{team}:generate`, `global`…) of `rate` with
    /// `burst`: the verdict, refused or not, or why Redis could not say.
    pub async fn check(
        &self,
        name: &str,
        kind: LimitKind,
        rate: Rate,
        burst: NonZeroU32,
    ) -> Result<Result<Verdict, Verdict>, String> {
        let interval = (rate.per / rate.count.get()).as_micros().max(1) as u64;
        let mut conn = self.conn.clone();
        let key = format!("{}ratelimit:{name}", self.prefix);
        let step = self.breaker.call(bounded(self.timeout, async move {
            GCRA.key(key)
                .arg(interval)
                .arg(burst.get())
                .invoke_async::<(u8, u32, u64)>(&mut conn)
                .await
        }));
        let (allowed, remaining, reset_us) = step.await.map_err(|e| e.to_string())?;
        let verdict = Verdict {
            kind,
            limit: burst.get(),
            remaining,
            reset: Duration::from_micros(reset_us),
            allowed: allowed == 1,
        };
        Ok(if verdict.allowed {
            Ok(verdict)
        } else {
            Err(verdict)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use ketchup_domain::ledger::breaker::OPEN_AFTER;
    use ketchup_test_redis::{FadingRedis, SLACK, TIMEOUT};

    fn rate(text: &str) -> Rate {
        text.parse().unwrap()
    }

    fn burst(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    /// Two replicas' views of one Redis, under a prefix of this test's own.
    async fn replicas() -> Option<(SharedLimits, SharedLimits)> {
        let endpoint = RedisEndpoint::from_url(ketchup_test_redis::url()?);
        let prefix = format!("ketchup-test:{}:", uuid::Uuid::now_v7().simple());
        let connect =
            || SharedLimits::connect(&endpoint, &prefix, Duration::from_millis(500), false);
        Some((connect().await.unwrap(), connect().await.unwrap()))
    }

    #[tokio::test]
    async fn a_burst_passes_then_the_limit_says_when_to_come_back() {
        let Some((a, _)) = replicas().await else {
            return;
        };
        let (per_minute, three) = (rate("60/min"), burst(3));
        let step = || a.check("design:generate", LimitKind::Generate, per_minute, three);
        let first = step().await.unwrap().unwrap();
        assert_eq!((first.limit, first.remaining), (3, 2));
        // Whole again one emission interval (1 s) after one request, as governor says.
        assert!(first.reset <= Duration::from_secs(1) && first.reset > Duration::from_millis(900));
        assert_eq!(step().await.unwrap().unwrap().remaining, 1);
        assert_eq!(step().await.unwrap().unwrap().remaining, 0);
        let refused = step().await.unwrap().unwrap_err();
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 0);
        assert!(refused.reset > Duration::ZERO && refused.reset <= Duration::from_secs(1));
        // Another limit has its own allowance.
        assert!(
            a.check("design:query", LimitKind::Query, rate("20/s"), burst(20))
                .await
                .unwrap()
                .is_ok()
        );
    }

    #[tokio::test]
    async fn replicas_share_one_allowance() {
        let Some((a, b)) = replicas().await else {
            return;
        };
        let (per_hour, ten) = (rate("10/h"), burst(10));
        let mut passed = 0;
        for i in 0..30 {
            let replica = if i % 2 == 0 { &a } else { &b };
            if replica
                .check("design:generate", LimitKind::Generate, per_hour, ten)
                .await
                .unwrap()
                .is_ok()
            {
                passed += 1;
            }
        }
        assert_eq!(passed, 10, "ten in all, not ten per replica");
    }

    #[tokio::test]
    async fn a_redis_that_stops_answering_costs_each_check_at_most_the_timeout() {
        for stop in [FadingRedis::stop, FadingRedis::go_away] {
            let server = FadingRedis::start().await;
            let url = format!("redis://{}/", server.address);
            let limits =
                SharedLimits::connect(&RedisEndpoint::from_url(&url), "t:", TIMEOUT, false)
                    .await
                    .unwrap();
            stop(&server);
            let mut waited = 0;
            // Until the breaker opens; after that nothing reaches Redis.
            for _ in 0..OPEN_AFTER {
                let started = Instant::now();
                let error = limits
                    .check(
                        "design:generate",
                        LimitKind::Generate,
                        rate("10/s"),
                        burst(10),
                    )
                    .await
                    .expect_err("no verdict without Redis");
                let elapsed = started.elapsed();
                assert!(elapsed < TIMEOUT + SLACK, "{elapsed:?}: {error}");
                waited += usize::from(elapsed >= TIMEOUT);
            }
            assert!(waited > 0, "no call met the silence");
        }
    }

    #[tokio::test]
    async fn a_redis_that_cannot_be_reached_at_start_is_an_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let refused = SharedLimits::connect(
            &RedisEndpoint::from_url(format!("redis://:hunter2@127.0.0.1:{port}")),
            "x:",
            Duration::from_millis(100),
            false,
        )
        .await
        .err()
        .expect("refused");
        assert!(!refused.contains("hunter2"), "{refused}");
    }
}
