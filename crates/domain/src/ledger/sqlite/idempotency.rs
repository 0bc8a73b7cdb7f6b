//! Idempotency-Key claims in SQLite: looked at and taken by `reserve`, answered and their earlier
//! unknown attempts resolved by `attach_task`, each inside that operation's transaction; and
//! deleted once expired.

use rusqlite::{Connection, OptionalExtension, params};

use super::reservations::move_reservation;
use super::{execute, millis, query_row, unavailable};
use crate::ledger::{KeyClaim, ReservationId, StoreError, StoredAnswer, TaskState};

/// What a live claim of a key means for a request that brings it.
pub(super) enum KeyState {
    /// The request may claim the key. `retry_of`: the last earlier attempt with the key whose
    /// outcome is unknown, which a task for this one resolves.
    Free { retry_of: Option<String> },
    /// The key's request was answered: its repeats get this.
    Answered(StoredAnswer),
    /// The key's request is still waiting for the upstream.
    InUse,
    /// The key was claimed for another request.
    Mismatch,
}

/// How `claim` stands for `team` at `now`.
pub(super) fn look(
    conn: &Connection,
    team: &str,
    claim: &KeyClaim,
    now: i64,
) -> Result<KeyState, StoreError> {
    type Row = (
        String,
        String,
        i64,
        Option<i64>,
        Option<String>,
        Option<Vec<u8>>,
    );
    let row: Option<Row> = query_row(
        conn,
        "SELECT fingerprint, reservation, expires_at, status, content_type, body
         FROM idempotency_keys WHERE team = ?1 AND key = ?2",
        params![team, claim.key],
        |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        },
    )
    .optional()
    .map_err(unavailable)?;
    // An expired claim is no claim, whether purged yet or not.
    let Some((fingerprint, holder, _, status, content_type, body)) = row.filter(|row| row.2 > now)
    else {
        return Ok(KeyState::Free { retry_of: None });
    };
    if fingerprint != claim.fingerprint {
        return Ok(KeyState::Mismatch);
    }
    if let Some(status) = status {
        return Ok(KeyState::Answered(StoredAnswer {
            status: u16::try_from(status).map_err(unavailable)?,
            content_type: content_type.unwrap_or_default(),
            body: body.unwrap_or_default(),
        }));
    }
    let attempt: Option<(String, Option<String>)> = query_row(
        conn,
        "SELECT state, retry_of FROM reservations WHERE id = ?1",
        params![holder],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
    .map_err(unavailable)?;
    Ok(match attempt {
        Some((state, _)) if state == TaskState::UnknownOutcome.as_str() => KeyState::Free {
            retry_of: Some(holder),
        },
        // Refused: nothing started, so the attempt before it is still the one to resolve.
        Some((state, retry_of)) if state == TaskState::Released.as_str() => {
            KeyState::Free { retry_of }
        }
        None => KeyState::Free { retry_of: None },
        // Waiting for the upstream. A task, once attached, stores its answer in the same step,
        // so no other state comes without one; should it, refusing is the side that cannot start
        // a second render.
        Some(_) => KeyState::InUse,
    })
}

/// Claims the key for reservation `id`, replacing a claim that `look` found free.
pub(super) fn claim(
    conn: &Connection,
    team: &str,
    id: ReservationId,
    claim: &KeyClaim,
) -> Result<(), StoreError> {
    execute(
        conn,
        "INSERT INTO idempotency_keys (team, key, fingerprint, reservation, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (team, key) DO UPDATE
         SET fingerprint = excluded.fingerprint, reservation = excluded.reservation,
             expires_at = excluded.expires_at, status = NULL, content_type = NULL, body = NULL",
        params![
            team,
            claim.key,
            claim.fingerprint,
            id.0.to_string(),
            millis(claim.expires_at)
        ],
    )
    .map_err(unavailable)?;
    Ok(())
}

/// Stores the answer of reservation `id`'s request under its key, if the key is still its own.
pub(super) fn answer(
    conn: &Connection,
    team: &str,
    key: &str,
    id: ReservationId,
    answer: &StoredAnswer,
) -> Result<(), StoreError> {
    execute(
        conn,
        "UPDATE idempotency_keys SET status = ?4, content_type = ?5, body = ?6
         WHERE team = ?1 AND key = ?2 AND reservation = ?3",
        params![
            team,
            key,
            id.0.to_string(),
            answer.status,
            answer.content_type,
            answer.body
        ],
    )
    .map_err(unavailable)?;
    Ok(())
}

/// Releases the attempts along the `retry_of` chain from `earlier` whose outcome is still
/// unknown, each noting `by` as the retry that resolved it; returns them. The chain only ever
/// points at older reservations, so it ends.
pub(super) fn resolve_earlier(
    conn: &Connection,
    by: ReservationId,
    mut earlier: Option<String>,
) -> Result<Vec<ReservationId>, StoreError> {
    let mut resolved = Vec::new();
    while let Some(id) = earlier {
        let attempt: Option<(String, Option<String>)> = query_row(
            conn,
            "SELECT state, retry_of FROM reservations WHERE id = ?1",
            params![id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(unavailable)?;
        let Some((state, next)) = attempt else { break };
        if state == TaskState::UnknownOutcome.as_str() {
            move_reservation(
                conn,
                &id,
                TaskState::UnknownOutcome,
                TaskState::Released,
                false,
                None,
            )?;
            execute(
                conn,
                "UPDATE reservations SET resolved_by = ?2 WHERE id = ?1",
                params![id, by.0.to_string()],
            )
            .map_err(unavailable)?;
            resolved.push(ReservationId(
                uuid::Uuid::parse_str(&id).map_err(unavailable)?,
            ));
        }
        earlier = next;
    }
    Ok(resolved)
}

/// Deletes up to `limit` claims expired by `now`; how many.
pub(super) fn purge(conn: &Connection, now: i64, limit: usize) -> Result<u64, StoreError> {
    let deleted = execute(
        conn,
        "DELETE FROM idempotency_keys WHERE (team, key) IN (
             SELECT team, key FROM idempotency_keys WHERE expires_at <= ?1 LIMIT ?2)",
        params![now, i64::try_from(limit).unwrap_or(i64::MAX)],
    )
    .map_err(unavailable)?;
    Ok(deleted as u64)
}
