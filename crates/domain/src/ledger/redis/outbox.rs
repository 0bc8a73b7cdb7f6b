//! The webhook outbox in Redis: a hash per delivery, and per team a sorted set of its pending
//! ones by due time (or, while an attempt holds one, the end of that attempt's lease).

use std::sync::LazyLock;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::{Script, Value};

use super::{RedisStore, fields, flag, from_millis, millis, optional, parse};
use crate::ledger::{
    AttemptOutcome, ClaimLimits, Delivery, DeliveryRecord, DeliveryState, NewDelivery, Outbox,
    StoreError,
};

static ENQUEUE: LazyLock<Script> = ledger_script!("enqueue.lua");
static CLAIM: LazyLock<Script> = ledger_script!("claim.lua");
static FINISH: LazyLock<Script> = ledger_script!("finish.lua");
static PRUNE: LazyLock<Script> = ledger_script!("prune.lua");

const DELIVERY_RECORD_FIELDS: [&str; 9] = [
    "id",
    "task_id",
    "team",
    "url",
    "state",
    "attempts",
    "last_error",
    "created_at",
    "updated_at",
];

#[async_trait]
impl Outbox for RedisStore {
    async fn enqueue_delivery(&self, d: NewDelivery) -> Result<bool, StoreError> {
        let mut call = self.script(&ENQUEUE);
        call.arg(&d.id)
            .arg(&d.task_id)
            .arg(&d.team)
            .arg(&d.url)
            .arg(d.body.as_ref())
            .arg(millis(d.created_at))
            .arg(millis(d.deadline));
        let queued: i64 = self.eval(&call).await?;
        Ok(queued == 1)
    }

    async fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limits: &ClaimLimits,
    ) -> Result<Vec<Delivery>, StoreError> {
        if limits.total == 0 {
            return Ok(Vec::new());
        }
        let mut call = self.script(&CLAIM);
        call.arg(millis(now))
            .arg(millis(lease_until))
            .arg(limits.total)
            .arg(limits.per_team);
        for (team, busy) in &limits.busy {
            call.arg(team).arg(*busy);
        }
        let claimed: Vec<Vec<Value>> = self.eval(&call).await?;
        claimed
            .into_iter()
            .map(|row| {
                let [id, task_id, team, url, body, attempts, created_at, deadline] = fields(row)?;
                Ok(Delivery {
                    id: parse(id)?,
                    task_id: parse(task_id)?,
                    team: parse(team)?,
                    url: parse(url)?,
                    body: parse(body)?,
                    attempts: parse(attempts)?,
                    created_at: from_millis(parse(created_at)?),
                    deadline: from_millis(parse(deadline)?),
                })
            })
            .collect()
    }

    async fn finish_attempt(
        &self,
        id: &str,
        attempt: u32,
        outcome: AttemptOutcome,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let (state, next_attempt, error) = match outcome {
            AttemptOutcome::Delivered => (DeliveryState::Delivered, None, None),
            AttemptOutcome::RetryAt(next, error) => {
                (DeliveryState::Pending, Some(millis(next)), Some(error))
            }
            AttemptOutcome::Dead(error) => (DeliveryState::Dead, None, Some(error)),
        };
        let mut call = self.script(&FINISH);
        call.arg(id)
            .arg(state.as_str())
            .arg(optional(next_attempt))
            .arg(flag(error.is_some()))
            .arg(error.unwrap_or_default())
            .arg(millis(at))
            .arg(attempt);
        self.eval::<()>(&call).await
    }

    async fn deliveries(
        &self,
        state: DeliveryState,
        limit: usize,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let ids = self.newest(self.keys.deliveries(state), limit).await?;
        let rows = self
            .read_hashes(
                ids.iter().map(|id| self.keys.delivery(id)),
                &DELIVERY_RECORD_FIELDS,
            )
            .await?;
        let mut records = Vec::with_capacity(rows.len());
        for row in rows {
            let [
                id,
                task_id,
                team,
                url,
                now,
                attempts,
                last_error,
                created_at,
                updated_at,
            ] = fields(row)?;
            // Moved on between the two reads.
            if parse::<String>(now)? != state.as_str() {
                continue;
            }
            records.push(DeliveryRecord {
                id: parse(id)?,
                task_id: parse(task_id)?,
                team: parse(team)?,
                url: parse(url)?,
                state: state.as_str(),
                attempts: parse(attempts)?,
                last_error: parse(last_error)?,
                created_at: from_millis(parse(created_at)?),
                updated_at: from_millis(parse(updated_at)?),
            });
        }
        Ok(records)
    }

    async fn delete_finished_deliveries(
        &self,
        finished_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64, StoreError> {
        let mut call = self.script(&PRUNE);
        call.arg(millis(finished_before)).arg(limit);
        self.eval(&call).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::conformance::at;
    use crate::ledger::conformance::outbox::{any, claim, deliveries_ended_three_ways, delivery};
    use crate::ledger::redis::test_store;

    #[tokio::test]
    async fn bodies_are_kept_byte_for_byte() {
        let Some(store) = test_store().await else {
            return;
        };
        let body: Vec<u8> = (0..=255u8).chain([0, b'\r', b'\n', 0xff]).collect();
        store
            .enqueue_delivery(NewDelivery {
                body: body.clone().into(),
                ..delivery("msg_bin", "ta-bin")
            })
            .await
            .unwrap();
        let claimed = claim(&store, "2026-11-23T10:00:00Z", "2026-11-23T10:00:30Z").await;
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].body, body);
    }

    #[tokio::test]
    async fn a_finished_delivery_keeps_no_body() {
        let Some(store) = test_store().await else {
            return;
        };
        deliveries_ended_three_ways(&store).await;
        let mut kept = Vec::new();
        for id in ["msg_delivered", "msg_dead", "msg_retried"] {
            let mut command = redis::cmd("HEXISTS");
            command.arg(store.keys.delivery(id)).arg("body");
            kept.push(store.query::<bool>(&command).await.unwrap());
        }
        assert_eq!(kept, [false, false, true]);
    }

    #[tokio::test]
    async fn deliveries_queued_before_per_team_due_sets_are_still_claimed() {
        let Some(store) = test_store().await else {
            return;
        };
        let now = at("2026-11-23T10:00:00Z");
        for (id, task, team, minutes_ago) in [
            ("msg_old_d", "ta-1", "design", 2),
            ("msg_old_a", "ta-2", "ads", 1),
        ] {
            let mut queued = delivery(id, task);
            queued.team = team.into();
            queued.created_at = now - chrono::Duration::minutes(minutes_ago);
            assert!(store.enqueue_delivery(queued).await.unwrap());
        }
        // Put them back as an earlier version kept them: one set of every team's due deliveries.
        let prefix = &store.keys.prefix;
        let mut legacy = vec![redis::cmd("DEL")];
        legacy[0].arg(format!("{prefix}deliveries-due-teams"));
        for (id, team, minutes_ago) in [("msg_old_d", "design", 2), ("msg_old_a", "ads", 1)] {
            let mut own = redis::cmd("DEL");
            own.arg(format!("{prefix}deliveries-due:{team}"));
            let mut shared = redis::cmd("ZADD");
            shared
                .arg(format!("{prefix}deliveries-due"))
                .arg(millis(now - chrono::Duration::minutes(minutes_ago)))
                .arg(id);
            legacy.extend([own, shared]);
        }
        for command in &legacy {
            store.query::<()>(command).await.unwrap();
        }

        let claimed = store
            .claim_deliveries(now, at("2026-11-23T10:00:30Z"), &any(10))
            .await
            .unwrap();
        let ids: Vec<_> = claimed.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["msg_old_d", "msg_old_a"], "oldest first, as before");
        let mut exists = redis::cmd("EXISTS");
        exists.arg(format!("{prefix}deliveries-due"));
        assert!(!store.query::<bool>(&exists).await.unwrap());
        // Leased in their team's own sets: not claimed again until the lease ends.
        assert!(
            store
                .claim_deliveries(now, at("2026-11-23T10:00:30Z"), &any(10))
                .await
                .unwrap()
                .is_empty()
        );
        let again = claim(&store, "2026-11-23T10:00:31Z", "2026-11-23T10:01:00Z").await;
        assert_eq!(again.len(), 2);
    }
}
