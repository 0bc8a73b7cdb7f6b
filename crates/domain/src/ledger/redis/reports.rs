//! Reports from Redis: a team's standing is its period hash and its tasks in flight a set; the
//! reservations listing reads the ids in a state's sorted set, then their hashes; usage pages
//! through `created` by time and adds the rows up here.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::Value;

use super::{RedisStore, credits, fields, from_millis, millis, parse, task_state, unexpected};
use crate::credits::Credits;
use crate::ledger::{
    FinalStatus, OutcomeReason, Reports, ReservationRecord, Standing, StoreError, TaskState,
    UsageRow,
};

/// The family of a reservation recorded before reservations had one: every generation was an
/// image generation then, as the SQLite engine's migration also says of its old rows.
const FAMILY_BEFORE_ROUTES: &str = "image";

/// Reservations read per round trip by `usage`: big enough to keep round trips few, small enough
/// that no single answer holds Redis up.
const USAGE_PAGE: usize = 512;

const RESERVATION_FIELDS: [&str; 14] = [
    "id",
    "task_id",
    "team",
    "model",
    "period",
    "reserved",
    "state",
    "request_id",
    "created_at",
    "reason",
    "dispatched_at",
    "idempotency_key",
    "retry_of",
    "resolved_by",
];
const USAGE_FIELDS: [&str; 9] = [
    "team",
    "key_label",
    "family",
    "model",
    "state",
    "final_status",
    "reserved",
    "consumed",
    "created_at",
];

#[async_trait]
impl Reports for RedisStore {
    async fn standing(&self, team: &str, period: &str) -> Result<Standing, StoreError> {
        let (spent, reserved): (Option<i64>, Option<i64>) = self
            .query(
                redis::cmd("HMGET")
                    .arg(self.keys.period(team, period))
                    .arg("spent")
                    .arg("reserved"),
            )
            .await?;
        Ok(Standing {
            spent: Credits::from_units(spent.unwrap_or(0)),
            reserved: Credits::from_units(reserved.unwrap_or(0)),
        })
    }

    async fn in_flight(&self, team: &str) -> Result<u64, StoreError> {
        self.query(redis::cmd("SCARD").arg(self.keys.in_flight(team)))
            .await
    }

    async fn reservations(
        &self,
        state: TaskState,
        limit: usize,
    ) -> Result<Vec<ReservationRecord>, StoreError> {
        let ids = self.newest(self.keys.by_state(state), limit).await?;
        let rows = self
            .read_hashes(
                ids.iter().map(|id| self.keys.reservation(id)),
                &RESERVATION_FIELDS,
            )
            .await?;
        let mut records = Vec::with_capacity(rows.len());
        for row in rows {
            let [
                id,
                task_id,
                team,
                model,
                period,
                reserved,
                now,
                request_id,
                created_at,
                reason,
                dispatched_at,
                idempotency_key,
                retry_of,
                resolved_by,
            ] = fields(row)?;
            // Moved on between the two reads.
            if parse::<String>(now)? != state.as_str() {
                continue;
            }
            let reason: Option<String> = parse(reason)?;
            records.push(ReservationRecord {
                id: parse(id)?,
                task_id: parse(task_id)?,
                team: parse(team)?,
                model: parse(model)?,
                period: parse(period)?,
                reserved: credits(reserved)?,
                state: state.as_str(),
                reason: reason
                    .as_deref()
                    .and_then(OutcomeReason::parse)
                    .map(OutcomeReason::as_str),
                dispatched_at: parse::<Option<i64>>(dispatched_at)?.map(from_millis),
                idempotency_key: parse(idempotency_key)?,
                retry_of: parse(retry_of)?,
                resolved_by: parse(resolved_by)?,
                request_id: parse(request_id)?,
                created_at: from_millis(parse(created_at)?),
            });
        }
        Ok(records)
    }

    async fn usage(
        &self,
        team: Option<&str>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let index = self.keys.created(team);
        let end = format!("({}", millis(to));
        let mut start = millis(from).to_string();
        let mut page = USAGE_PAGE;
        let mut rows: BTreeMap<UsageKey, UsageRow> = BTreeMap::new();
        loop {
            let batch: Vec<(String, i64)> = self
                .query(
                    redis::cmd("ZRANGEBYSCORE")
                        .arg(&index)
                        .arg(&start)
                        .arg(&end)
                        .arg("WITHSCORES")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(page),
                )
                .await?;
            let last_page = batch.len() < page;
            let mut ids: Vec<&str> = batch.iter().map(|(id, _)| id.as_str()).collect();
            if !last_page && let Some(&(_, last)) = batch.last() {
                // Pages are cut by score, so reservations made meanwhile cannot shift them; the
                // run of equal times the page ends in is read again, whole, by the next page.
                let run = batch.iter().position(|&(_, at)| at == last).unwrap_or(0);
                if run == 0 {
                    page *= 2;
                    continue;
                }
                ids.truncate(run);
                start = last.to_string();
            }
            let hashes = self
                .read_hashes(
                    ids.iter().map(|id| self.keys.reservation(id)),
                    &USAGE_FIELDS,
                )
                .await?;
            for hash in hashes {
                tally(&mut rows, hash)?;
            }
            if last_page {
                break;
            }
        }
        Ok(rows.into_values().collect())
    }
}

/// A usage row's day, team, key, family and model: its group, and its place in the report.
type UsageKey = (String, String, String, String, String);

/// Adds one reservation to its usage row, as the SQLite engine's `GROUP BY` does.
fn tally(rows: &mut BTreeMap<UsageKey, UsageRow>, hash: Vec<Value>) -> Result<(), StoreError> {
    let [
        team,
        key,
        family,
        model,
        state,
        final_status,
        reserved,
        consumed,
        created_at,
    ] = fields(hash)?;
    let state = task_state(state)?;
    if state == TaskState::Released {
        return Ok(());
    }
    let team: String = parse(team)?;
    // No key name on those recorded before keys were.
    let key = parse::<Option<String>>(key)?.unwrap_or_default();
    let family = parse::<Option<String>>(family)?.unwrap_or_else(|| FAMILY_BEFORE_ROUTES.into());
    let model: String = parse(model)?;
    let final_status: Option<String> = parse(final_status)?;
    let charged = match state {
        TaskState::Settled => parse::<Option<i64>>(consumed)?.unwrap_or(0),
        TaskState::Expired | TaskState::UnknownOutcome => parse(reserved)?,
        _ => 0,
    };
    // Whole seconds first, truncating as SQLite's `created_at / 1000` does.
    let created_at: i64 = parse(created_at)?;
    let day = from_millis(created_at / 1000 * 1000)
        .format("%Y-%m-%d")
        .to_string();
    let row = rows
        .entry((
            day.clone(),
            team.clone(),
            key.clone(),
            family.clone(),
            model.clone(),
        ))
        .or_insert_with(|| UsageRow {
            day,
            team,
            key,
            family,
            model,
            tasks: 0,
            succeeded: 0,
            failed: 0,
            unsettled: 0,
            credits: Credits::ZERO,
        });
    row.tasks += 1;
    match final_status.as_deref() {
        Some(status) if status == FinalStatus::Success.as_str() => row.succeeded += 1,
        Some(status) if status == FinalStatus::Failed.as_str() => row.failed += 1,
        _ => {}
    }
    if matches!(state, TaskState::Reserved | TaskState::Open) {
        row.unsettled += 1;
    }
    row.credits = row
        .credits
        .checked_add(Credits::from_units(charged))
        .ok_or_else(|| unexpected("usage credits overflow"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::conformance::{at, open_task, reservation};
    use crate::ledger::redis::test_store;
    use crate::ledger::{NewReservation, Reservations};

    #[tokio::test]
    async fn a_reservation_recorded_without_a_family_counts_as_an_image() {
        let Some(store) = test_store().await else {
            return;
        };
        let old = NewReservation {
            family: "video".into(),
            ..reservation("design", "0.50", None)
        };
        let key = store.keys.reservation(&old.id.0.to_string());
        store.reserve(old).await.unwrap();
        // As a version before route families wrote it.
        let removed: u64 = store
            .query(redis::cmd("HDEL").arg(&key).arg("family"))
            .await
            .unwrap();
        assert_eq!(removed, 1);
        let rows = store
            .usage(None, at("2026-11-23T00:00:00Z"), at("2026-11-24T00:00:00Z"))
            .await
            .unwrap();
        let families: Vec<&str> = rows.iter().map(|r| r.family.as_str()).collect();
        assert_eq!(families, ["image"]);
    }

    #[tokio::test]
    async fn a_reservation_recorded_without_a_key_name_is_reported_with_an_empty_one() {
        let Some(store) = test_store().await else {
            return;
        };
        let old = reservation("design", "0.50", None);
        let key = store.keys.reservation(&old.id.0.to_string());
        store.reserve(old).await.unwrap();
        // As a version before keys were recorded wrote it.
        let removed: u64 = store
            .query(redis::cmd("HDEL").arg(&key).arg("key_label"))
            .await
            .unwrap();
        assert_eq!(removed, 1);
        let rows = store
            .usage(None, at("2026-11-23T00:00:00Z"), at("2026-11-24T00:00:00Z"))
            .await
            .unwrap();
        let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, [""]);
    }

    #[tokio::test]
    async fn usage_reads_past_a_page_of_equal_times() {
        let Some(store) = test_store().await else {
            return;
        };
        // More reservations in one millisecond than a page holds, then more after it.
        for _ in 0..USAGE_PAGE + 40 {
            store
                .reserve(reservation("design", "0.01", None))
                .await
                .unwrap();
        }
        for minute in 0..30 {
            let r = NewReservation {
                created_at: at("2026-11-23T10:00:00Z") + chrono::Duration::minutes(minute + 1),
                ..reservation("design", "0.01", None)
            };
            store.reserve(r).await.unwrap();
        }
        open_task(&store, "ads", "0.01", "ta-ads").await;
        let from = at("2026-11-23T00:00:00Z");
        let to = at("2026-11-24T00:00:00Z");
        let design = store.usage(Some("design"), from, to).await.unwrap();
        assert_eq!(design.len(), 1);
        assert_eq!(design[0].tasks, USAGE_PAGE as u64 + 70);
        assert_eq!(design[0].unsettled, USAGE_PAGE as u64 + 70);
        let all = store.usage(None, from, to).await.unwrap();
        let tasks: Vec<(&str, u64)> = all.iter().map(|r| (r.team.as_str(), r.tasks)).collect();
        assert_eq!(tasks, [("ads", 1), ("design", USAGE_PAGE as u64 + 70)]);
    }
}
