//! The embedded ledger: SQLite in WAL mode with `synchronous = FULL`, so a write that returned
//! survives a crash or a SIGKILL.
//!
//! All writes go through one writer thread that applies them in batches: every waiting write
//! joins the next transaction, and one fsync commits them all (group commit). That keeps durable
//! writes cheap under load, and because only one thread writes, each check-and-reserve sees every
//! earlier one: two reservations can never both take the last credits. Reads use their own
//! connections, which WAL lets run beside the writer.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::{
    AttemptOutcome, CallbackTarget, ClaimLimits, Delivery, DeliveryRecord, DeliveryState,
    FinalStatus, Ledger, NewDelivery, NewReservation, Outbox, Reports, ReservationId,
    ReservationRecord, Reservations, ReserveOutcome, SettleOutcome, SettledTask, Settlement,
    Standing, StoreError, TaskCursor, TaskRecord, TaskState, Tasks, UsageRow,
};
use crate::credits::Credits;

/// Most writes committed by one transaction.
const MAX_BATCH: usize = 512;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS reservations (
    id          TEXT PRIMARY KEY,       -- reservation id, made before the upstream call
    task_id     TEXT UNIQUE,            -- the upstream's task id, once it answered
    team        TEXT NOT NULL,
    model       TEXT NOT NULL,
    period      TEXT NOT NULL,          -- budget period the cost belongs to, e.g. '2026-11'
    reserved    INTEGER NOT NULL,       -- credits held, in units of 1e-8
    consumed    INTEGER,                -- credits charged once settled, in units of 1e-8
    state       TEXT NOT NULL,          -- reserved | open | unknown_outcome | settled | released | expired
    final_status TEXT,                  -- success | failed, once settled
    request_id  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,       -- unix milliseconds
    settled_at  INTEGER,
    observed_at INTEGER                 -- last time the task's status was read
);
CREATE INDEX IF NOT EXISTS reservations_in_flight ON reservations (team, state);
CREATE INDEX IF NOT EXISTS reservations_created ON reservations (created_at);
-- The reconciler's work list stays small however long the history grows.
CREATE INDEX IF NOT EXISTS reservations_open ON reservations (coalesce(observed_at, created_at))
    WHERE state = 'open';
CREATE INDEX IF NOT EXISTS reservations_waiting ON reservations (created_at)
    WHERE state = 'reserved';

-- Per team and period: what is spent and what is held. Kept in the same transaction as every
-- change of a reservation's state, so it always equals the sum over `reservations`.
CREATE TABLE IF NOT EXISTS budget_periods (
    team     TEXT NOT NULL,
    period   TEXT NOT NULL,
    spent    INTEGER NOT NULL DEFAULT 0,
    reserved INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (team, period)
) WITHOUT ROWID;
"#;

/// Changes to a ledger made by an earlier version, applied in order; `PRAGMA user_version`
/// records how many have run, so each runs once and an old ledger file keeps its history.
const MIGRATIONS: &[&str] = &[
    // Webhooks: the callback token (as a digest) and the team's own URL of each reservation,
    // and the outbox of deliveries to teams.
    r#"
    ALTER TABLE reservations ADD COLUMN callback_digest TEXT;
    ALTER TABLE reservations ADD COLUMN forward_to TEXT;
    CREATE UNIQUE INDEX reservations_callback ON reservations (callback_digest)
        WHERE callback_digest IS NOT NULL;
    CREATE TABLE deliveries (
        id              TEXT PRIMARY KEY,   -- sent as webhook-id
        task_id         TEXT NOT NULL UNIQUE,
        team            TEXT NOT NULL,
        url             TEXT NOT NULL,
        body            BLOB NOT NULL,      -- the upstream's payload, byte for byte
        state           TEXT NOT NULL,      -- pending | delivered | dead
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,   -- unix ms: due time, or the end of a claim's lease
        last_error      TEXT,
        created_at      INTEGER NOT NULL,
        deadline        INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL
    );
    CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE state = 'pending';
    CREATE INDEX deliveries_by_state ON deliveries (state, updated_at);
    "#,
    // Claims read each team's due deliveries from its own range, so that a team whose share of
    // the attempts is taken costs a claim nothing however many of its deliveries are due.
    r#"
    CREATE INDEX deliveries_due_by_team ON deliveries (team, next_attempt_at, id)
        WHERE state = 'pending';
    DROP INDEX deliveries_due;
    "#,
];

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let applied: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(unavailable)?;
    for (version, migration) in (1..).zip(MIGRATIONS).skip(applied.max(0) as usize) {
        let tx = conn.transaction().map_err(unavailable)?;
        tx.execute_batch(migration)
            .and_then(|()| tx.pragma_update(None, "user_version", version))
            .and_then(|()| tx.commit())
            .map_err(|e| unavailable(format!("migration {version} failed: {e}")))?;
    }
    Ok(())
}

type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// A write: run against the open transaction (or told why there is none), it returns what to do
/// once the transaction's fate is known.
type Job = Box<dyn FnOnce(Result<&Connection, StoreError>) -> Completion + Send>;

pub struct SqliteStore {
    writer: mpsc::Sender<Job>,
    readers: Arc<ReaderPool>,
}

struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the ledger at `path` and starts its writer thread.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| unavailable(format!("cannot create {}: {e}", dir.display())))?;
        }
        let mut conn = Connection::open(path)
            .map_err(|e| unavailable(format!("cannot open {}: {e}", path.display())))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA busy_timeout = 5000;",
        )
        .map_err(unavailable)?;
        conn.execute_batch(SCHEMA).map_err(unavailable)?;
        migrate(&mut conn)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);

        let (writer, jobs) = mpsc::channel(4 * MAX_BATCH);
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || write_batches(conn, jobs))
            .map_err(unavailable)?;
        Ok(SqliteStore {
            writer,
            readers: Arc::new(ReaderPool {
                path: path.to_owned(),
                idle: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Runs `op` inside the next batch's transaction; returns once that batch is durable.
    async fn write<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = conn.and_then(|conn| in_savepoint(conn, op));
            Box::new(move |committed| {
                let _ = reply.send(committed.and(result));
            })
        });
        self.writer
            .send(job)
            .await
            .map_err(|_| unavailable("ledger writer stopped"))?;
        answer
            .await
            .map_err(|_| unavailable("ledger writer stopped"))?
    }

    /// A point lookup by key (a task's owner, a callback token, a period's totals), run right
    /// here on the async worker. In WAL mode a reader never waits for the writer, and such a
    /// lookup takes microseconds; handing it to the blocking pool cost three times its own CPU
    /// (29 µs against 9 µs per lookup at a million tasks), which made the ledger the bottleneck
    /// of status reads whose owner is not in the ownership index.
    fn read_point<T>(
        &self,
        op: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.readers.take()?;
        let result = op(&conn);
        self.readers.give_back(conn);
        result
    }

    /// Reads that scan (listings, usage) run on the blocking pool, off the async workers.
    async fn read<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let conn = readers.take()?;
            let result = op(&conn);
            readers.give_back(conn);
            result
        })
        .await
        .map_err(unavailable)?
    }
}

impl ReaderPool {
    fn take(&self) -> Result<Connection, StoreError> {
        if let Some(conn) = self.idle.lock().expect("reader pool lock").pop() {
            return Ok(conn);
        }
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(unavailable)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(unavailable)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(conn)
    }

    fn give_back(&self, conn: Connection) {
        self.idle.lock().expect("reader pool lock").push(conn);
    }
}

/// The teams that have pending deliveries, each found by one seek in `deliveries_due_by_team`
/// past the one before: as many steps as teams, however many deliveries each has. The index is
/// named because without statistics SQLite would rather walk every pending delivery by state.
fn teams_with_pending_deliveries(conn: &Connection) -> Result<Vec<String>, StoreError> {
    let mut statement = conn
        .prepare_cached(
            "SELECT team FROM deliveries INDEXED BY deliveries_due_by_team
             WHERE state = 'pending' AND team > ?1 ORDER BY team LIMIT 1",
        )
        .map_err(unavailable)?;
    let mut teams: Vec<String> = Vec::new();
    loop {
        let after = teams.last().map_or("", String::as_str);
        match statement
            .query_row([after], |r| r.get(0))
            .optional()
            .map_err(unavailable)?
        {
            Some(team) => teams.push(team),
            None => return Ok(teams),
        }
    }
}

/// Runs one write in a savepoint, so a failing write leaves the rest of its batch intact.
fn in_savepoint<T>(
    conn: &Connection,
    op: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    conn.execute_batch("SAVEPOINT job").map_err(unavailable)?;
    let result = op(conn);
    let end = if result.is_ok() {
        "RELEASE job"
    } else {
        "ROLLBACK TO job; RELEASE job"
    };
    conn.execute_batch(end).map_err(unavailable)?;
    result
}

fn write_batches(conn: Connection, mut jobs: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while jobs.blocking_recv_many(&mut batch, MAX_BATCH) > 0 {
        let completions: Vec<Completion> = match conn.execute_batch("BEGIN IMMEDIATE") {
            Ok(()) => batch.drain(..).map(|job| job(Ok(&conn))).collect(),
            Err(e) => batch
                .drain(..)
                .map(|job| job(Err(unavailable(&e))))
                .collect(),
        };
        let committed = match conn.execute_batch("COMMIT") {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                Err(unavailable(format!("commit failed: {e}")))
            }
        };
        for complete in completions {
            complete(committed.as_ref().map(|_| ()).map_err(unavailable));
        }
    }
}

/// Statements are parsed once per connection and reused: parsing cost more than running them.
fn execute(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

fn query_row<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    row: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached(sql)?.query_row(params, row)
}

/// Enough for every statement of the store, so none is ever parsed twice on a connection.
const STATEMENT_CACHE: usize = 64;

fn millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

fn from_millis(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Adds to a period's totals; every change of a reservation's state calls it in the same
/// transaction, so the totals always equal the sum over the reservations.
fn adjust_period(
    conn: &Connection,
    team: &str,
    period: &str,
    reserved: i64,
    spent: i64,
) -> Result<(), StoreError> {
    execute(
        conn,
        "INSERT INTO budget_periods (team, period, reserved, spent) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (team, period) DO UPDATE
         SET reserved = reserved + excluded.reserved, spent = spent + excluded.spent",
        params![team, period, reserved, spent],
    )
    .map_err(unavailable)?;
    Ok(())
}

/// Moves a reservation out of `from`; `charge` says whether its held amount becomes spent
/// (unknown outcome) or is given back. Refused when the reservation is not in `from`.
fn move_reservation(
    conn: &Connection,
    id: ReservationId,
    from: TaskState,
    to: TaskState,
    charge: bool,
) -> Result<(), StoreError> {
    let row: Option<(String, String, i64)> = query_row(
        conn,
        "UPDATE reservations SET state = ?3 WHERE id = ?1 AND state = ?2
             RETURNING team, period, reserved",
        params![id.0.to_string(), from.as_str(), to.as_str()],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .optional()
    .map_err(unavailable)?;
    let (team, period, amount) = row.ok_or_else(|| {
        StoreError::Conflict(format!("reservation {} is not {}", id.0, from.as_str()))
    })?;
    match (from, charge) {
        (TaskState::Reserved, true) => adjust_period(conn, &team, &period, -amount, amount),
        (TaskState::Reserved, false) => adjust_period(conn, &team, &period, -amount, 0),
        // Leaving a state that counted as spent.
        _ => adjust_period(conn, &team, &period, 0, -amount),
    }
}

/// Closes an open task as `to`, charging `consumed` (or its reservation when `None`).
fn close_open_task(
    conn: &Connection,
    task_id: &str,
    to: TaskState,
    status: Option<FinalStatus>,
    consumed: Option<Credits>,
    at: DateTime<Utc>,
) -> Result<SettleOutcome, StoreError> {
    let row: Option<(String, String, String, i64, i64)> = query_row(
        conn,
        "UPDATE reservations
             SET state = ?2, consumed = coalesce(?3, reserved), final_status = ?4,
                 settled_at = ?5, observed_at = ?5
             WHERE task_id = ?1 AND state = 'open'
             RETURNING team, model, period, reserved, consumed",
        params![
            task_id,
            to.as_str(),
            consumed.map(Credits::units),
            status.map(FinalStatus::as_str),
            millis(at)
        ],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
    )
    .optional()
    .map_err(unavailable)?;
    let Some((team, model, period, reserved, consumed)) = row else {
        let closed: Option<String> = query_row(
            conn,
            "SELECT state FROM reservations WHERE task_id = ?1",
            params![task_id],
            |r| r.get(0),
        )
        .optional()
        .map_err(unavailable)?;
        return Ok(match closed.as_deref().and_then(TaskState::parse) {
            Some(state) if state.is_closed() => SettleOutcome::AlreadyClosed,
            _ => SettleOutcome::NotOpen,
        });
    };
    adjust_period(conn, &team, &period, -reserved, consumed)?;
    Ok(SettleOutcome::Settled(SettledTask {
        team,
        model,
        reserved: Credits::from_units(reserved),
        consumed: Credits::from_units(consumed),
    }))
}

fn task_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<TaskRecord> {
    let state: String = row.get(4)?;
    Ok(TaskRecord {
        task_id: row.get(0)?,
        team: row.get(1)?,
        model: row.get(2)?,
        reserved: Credits::from_units(row.get(3)?),
        state: TaskState::parse(&state).unwrap_or(TaskState::Open),
        created_at: from_millis(row.get(5)?),
    })
}

/// The columns `task_record` reads, as a macro so that each query is one `concat!`ed literal
/// rather than a string formatted on every call.
macro_rules! task_columns {
    () => {
        "task_id, team, model, reserved, state, created_at"
    };
}

#[async_trait]
impl Reservations for SqliteStore {
    async fn reserve(&self, r: NewReservation) -> Result<ReserveOutcome, StoreError> {
        self.write(move |conn| {
            let (spent, reserved): (i64, i64) = query_row(
                conn,
                "SELECT spent, reserved FROM budget_periods WHERE team = ?1 AND period = ?2",
                params![r.team, r.period],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(unavailable)?
            .unwrap_or((0, 0));
            if let Some(limit) = r.limit {
                let needed = spent
                    .checked_add(reserved)
                    .and_then(|held| held.checked_add(r.amount.units()));
                if needed.is_none_or(|needed| needed > limit.units()) {
                    return Ok(ReserveOutcome::BudgetExhausted {
                        spent: Credits::from_units(spent),
                        reserved: Credits::from_units(reserved),
                    });
                }
            }
            if let Some(max) = r.max_in_flight {
                let in_flight: i64 = query_row(
                    conn,
                    "SELECT count(*) FROM reservations
                         WHERE team = ?1 AND state IN ('reserved', 'open')",
                    params![r.team],
                    |row| row.get(0),
                )
                .map_err(unavailable)?;
                let in_flight = in_flight.unsigned_abs();
                if in_flight >= u64::from(max) {
                    return Ok(ReserveOutcome::TooManyInFlight { in_flight });
                }
            }
            execute(
                conn,
                "INSERT INTO reservations (id, team, model, period, reserved, state, request_id,
                                           created_at, callback_digest, forward_to)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'reserved', ?6, ?7, ?8, ?9)",
                params![
                    r.id.0.to_string(),
                    r.team,
                    r.model,
                    r.period,
                    r.amount.units(),
                    r.request_id,
                    millis(r.created_at),
                    r.callback.as_ref().map(|c| &c.token_digest),
                    r.callback.as_ref().and_then(|c| c.forward_to.as_ref()),
                ],
            )
            .map_err(unavailable)?;
            adjust_period(conn, &r.team, &r.period, r.amount.units(), 0)?;
            Ok(ReserveOutcome::Reserved(Standing {
                spent: Credits::from_units(spent),
                reserved: Credits::from_units(reserved + r.amount.units()),
            }))
        })
        .await
    }

    async fn attach_task(&self, id: ReservationId, task_id: &str) -> Result<(), StoreError> {
        let task_id = task_id.to_owned();
        self.write(move |conn| {
            let changed = execute(
                conn,
                "UPDATE reservations SET task_id = ?2, state = 'open'
                     WHERE id = ?1 AND state = 'reserved'",
                params![id.0.to_string(), task_id],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    StoreError::Conflict(format!("task {task_id} is already recorded"))
                }
                other => unavailable(other),
            })?;
            if changed == 0 {
                return Err(StoreError::Conflict(format!(
                    "reservation {} is not held",
                    id.0
                )));
            }
            Ok(())
        })
        .await
    }

    async fn release(&self, id: ReservationId) -> Result<(), StoreError> {
        self.write(move |conn| {
            move_reservation(conn, id, TaskState::Reserved, TaskState::Released, false)
        })
        .await
    }

    async fn mark_unknown_outcome(&self, id: ReservationId) -> Result<(), StoreError> {
        self.write(move |conn| {
            move_reservation(
                conn,
                id,
                TaskState::Reserved,
                TaskState::UnknownOutcome,
                true,
            )
        })
        .await
    }

    async fn settle(
        &self,
        task_id: &str,
        settlement: Settlement,
    ) -> Result<SettleOutcome, StoreError> {
        let task_id = task_id.to_owned();
        self.write(move |conn| {
            close_open_task(
                conn,
                &task_id,
                TaskState::Settled,
                Some(settlement.status),
                Some(settlement.consumed),
                settlement.at,
            )
        })
        .await
    }

    async fn expire(&self, task_id: &str, at: DateTime<Utc>) -> Result<SettleOutcome, StoreError> {
        let task_id = task_id.to_owned();
        self.write(move |conn| close_open_task(conn, &task_id, TaskState::Expired, None, None, at))
            .await
    }

    async fn abandon_stale_reservations(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let mut statement = conn
                .prepare_cached(
                    "UPDATE reservations SET state = 'unknown_outcome'
                     WHERE state = 'reserved' AND created_at < ?1
                     RETURNING team, period, reserved",
                )
                .map_err(unavailable)?;
            let rows: Vec<(String, String, i64)> = statement
                .query_map(params![millis(before)], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .map_err(unavailable)?
                .collect::<Result<_, _>>()
                .map_err(unavailable)?;
            for (team, period, amount) in &rows {
                adjust_period(conn, team, period, -amount, *amount)?;
            }
            Ok(rows.len() as u64)
        })
        .await
    }

    async fn release_unknown_outcome(&self, id: ReservationId) -> Result<(), StoreError> {
        self.write(move |conn| {
            move_reservation(
                conn,
                id,
                TaskState::UnknownOutcome,
                TaskState::Released,
                false,
            )
        })
        .await
    }
}

#[async_trait]
impl Tasks for SqliteStore {
    async fn task(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.read_point(|conn| {
            query_row(
                conn,
                concat!(
                    "SELECT ",
                    task_columns!(),
                    " FROM reservations WHERE task_id = ?1"
                ),
                params![task_id],
                task_record,
            )
            .optional()
            .map_err(unavailable)
        })
    }

    async fn callback_target(
        &self,
        token_digest: &str,
    ) -> Result<Option<CallbackTarget>, StoreError> {
        self.read_point(|conn| {
            let row: Option<(String, Option<String>, String, Option<String>)> = query_row(
                conn,
                "SELECT id, task_id, team, forward_to FROM reservations
                 WHERE callback_digest = ?1",
                params![token_digest],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(unavailable)?;
            row.map(|(id, task_id, team, forward_to)| {
                let id = uuid::Uuid::parse_str(&id).map_err(unavailable)?;
                Ok(CallbackTarget {
                    reservation: ReservationId(id),
                    task_id,
                    team,
                    forward_to,
                })
            })
            .transpose()
        })
    }

    async fn newest_tasks_start(&self, count: u64) -> Result<TaskCursor, StoreError> {
        // The cursor is a rowid: rows are never deleted, so a new one always comes last.
        self.read(move |conn| {
            let rowid = |row: &rusqlite::Row<'_>| row.get::<_, i64>(0);
            let start = match count.checked_sub(1) {
                // The `count`th newest task's row, walked to from the end; with fewer tasks
                // than that, the walk starts at the beginning.
                Some(offset) => query_row(
                    conn,
                    "SELECT rowid FROM reservations WHERE task_id IS NOT NULL
                     ORDER BY rowid DESC LIMIT 1 OFFSET ?1",
                    params![i64::try_from(offset).unwrap_or(i64::MAX)],
                    rowid,
                )
                .optional()
                .map(|found| found.unwrap_or(0)),
                None => query_row(
                    conn,
                    "SELECT coalesce(max(rowid), 0) + 1 FROM reservations",
                    [],
                    rowid,
                ),
            };
            start
                .map(|rowid| TaskCursor(rowid.max(0) as u64))
                .map_err(unavailable)
        })
        .await
    }

    async fn tasks_from(
        &self,
        from: TaskCursor,
        limit: usize,
    ) -> Result<(Vec<TaskRecord>, Option<TaskCursor>), StoreError> {
        self.read(move |conn| {
            let mut statement = conn
                .prepare_cached(concat!(
                    "SELECT ",
                    task_columns!(),
                    ", rowid FROM reservations WHERE rowid >= ?1 AND task_id IS NOT NULL
                     ORDER BY rowid LIMIT ?2"
                ))
                .map_err(unavailable)?;
            let mut last = None;
            let tasks: Vec<TaskRecord> = statement
                .query_map(
                    params![i64::try_from(from.0).unwrap_or(i64::MAX), limit as i64],
                    |row| {
                        last = Some(row.get::<_, i64>(6)?);
                        task_record(row)
                    },
                )
                .map_err(unavailable)?
                .collect::<Result<_, _>>()
                .map_err(unavailable)?;
            // The query skips rows without a task itself, so a short page is the last.
            let next = match last {
                Some(rowid) if tasks.len() == limit => Some(TaskCursor(rowid as u64 + 1)),
                _ => None,
            };
            Ok((tasks, next))
        })
        .await
    }

    async fn mark_observed(&self, task_id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        let task_id = task_id.to_owned();
        self.write(move |conn| {
            execute(
                conn,
                "UPDATE reservations SET observed_at = ?2 WHERE task_id = ?1",
                params![task_id, millis(at)],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn unobserved_open_tasks(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        self.read(move |conn| {
            let mut statement = conn
                .prepare_cached(concat!(
                    "SELECT ",
                    task_columns!(),
                    " FROM reservations
                     WHERE state = 'open' AND coalesce(observed_at, created_at) < ?1
                     ORDER BY coalesce(observed_at, created_at) LIMIT ?2"
                ))
                .map_err(unavailable)?;
            let rows = statement
                .query_map(params![millis(before), limit as i64], task_record)
                .map_err(unavailable)?;
            rows.collect::<Result<_, _>>().map_err(unavailable)
        })
        .await
    }
}

#[async_trait]
impl Outbox for SqliteStore {
    async fn enqueue_delivery(&self, d: NewDelivery) -> Result<bool, StoreError> {
        self.write(move |conn| {
            let inserted = execute(
                conn,
                "INSERT INTO deliveries (id, task_id, team, url, body, state, next_attempt_at,
                                         created_at, deadline, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6, ?7, ?6)
                 ON CONFLICT DO NOTHING",
                params![
                    d.id,
                    d.task_id,
                    d.team,
                    d.url,
                    d.body,
                    millis(d.created_at),
                    millis(d.deadline)
                ],
            )
            .map_err(unavailable)?;
            Ok(inserted == 1)
        })
        .await
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
        let limits = limits.clone();
        self.write(move |conn| {
            // The oldest due deliveries of each team, as many as its share has left: one index
            // range per team, never a walk over the deliveries of a team that must wait.
            let mut due_of_team = conn
                .prepare_cached(
                    "SELECT next_attempt_at, id FROM deliveries
                     INDEXED BY deliveries_due_by_team
                     WHERE state = 'pending' AND team = ?1 AND next_attempt_at <= ?2
                     ORDER BY next_attempt_at, id LIMIT ?3",
                )
                .map_err(unavailable)?;
            let mut candidates: Vec<(i64, String)> = Vec::new();
            for team in teams_with_pending_deliveries(conn)? {
                let taken = limits.busy.get(&team).copied().unwrap_or(0);
                let left = limits.per_team.saturating_sub(taken).min(limits.total);
                if left == 0 {
                    continue;
                }
                let due = due_of_team
                    .query_map(params![team, millis(now), left as i64], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .map_err(unavailable)?;
                for row in due {
                    candidates.push(row.map_err(unavailable)?);
                }
            }
            candidates.sort_unstable();
            candidates.truncate(limits.total);

            let mut lease = conn
                .prepare_cached(
                    "UPDATE deliveries SET next_attempt_at = ?2, attempts = attempts + 1
                     WHERE id = ?1
                     RETURNING id, task_id, team, url, body, attempts, created_at, deadline",
                )
                .map_err(unavailable)?;
            candidates
                .into_iter()
                .map(|(_, id)| {
                    lease
                        .query_row(params![id, millis(lease_until)], |r| {
                            Ok(Delivery {
                                id: r.get(0)?,
                                task_id: r.get(1)?,
                                team: r.get(2)?,
                                url: r.get(3)?,
                                body: r.get(4)?,
                                attempts: r.get(5)?,
                                created_at: from_millis(r.get(6)?),
                                deadline: from_millis(r.get(7)?),
                            })
                        })
                        .map_err(unavailable)
                })
                .collect()
        })
        .await
    }

    async fn finish_attempt(
        &self,
        id: &str,
        attempt: u32,
        outcome: AttemptOutcome,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.write(move |conn| {
            let (state, next_attempt_at, error) = match outcome {
                AttemptOutcome::Delivered => (DeliveryState::Delivered, None, None),
                AttemptOutcome::RetryAt(next, error) => {
                    (DeliveryState::Pending, Some(millis(next)), Some(error))
                }
                AttemptOutcome::Dead(error) => (DeliveryState::Dead, None, Some(error)),
            };
            execute(
                conn,
                "UPDATE deliveries
                 SET state = ?2, next_attempt_at = coalesce(?3, next_attempt_at),
                     last_error = coalesce(?4, last_error), updated_at = ?5,
                     body = CASE ?2 WHEN 'pending' THEN body ELSE x'' END
                 WHERE id = ?1 AND state = 'pending' AND attempts = ?6",
                params![
                    id,
                    state.as_str(),
                    next_attempt_at,
                    error,
                    millis(at),
                    attempt
                ],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn deliveries(
        &self,
        state: DeliveryState,
        limit: usize,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        self.read(move |conn| {
            let mut statement = conn
                .prepare_cached(
                    "SELECT id, task_id, team, url, attempts, last_error, created_at, updated_at
                     FROM deliveries WHERE state = ?1
                     ORDER BY updated_at DESC, id DESC LIMIT ?2",
                )
                .map_err(unavailable)?;
            let rows = statement
                .query_map(params![state.as_str(), limit as i64], |r| {
                    Ok(DeliveryRecord {
                        id: r.get(0)?,
                        task_id: r.get(1)?,
                        team: r.get(2)?,
                        url: r.get(3)?,
                        state: state.as_str(),
                        attempts: r.get(4)?,
                        last_error: r.get(5)?,
                        created_at: from_millis(r.get(6)?),
                        updated_at: from_millis(r.get(7)?),
                    })
                })
                .map_err(unavailable)?;
            rows.collect::<Result<_, _>>().map_err(unavailable)
        })
        .await
    }

    async fn delete_finished_deliveries(
        &self,
        finished_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let mut deleted = 0;
            // One state at a time, so that each walks its own range of `deliveries_by_state`.
            for state in [DeliveryState::Delivered, DeliveryState::Dead] {
                deleted += execute(
                    conn,
                    "DELETE FROM deliveries WHERE id IN (
                         SELECT id FROM deliveries WHERE state = ?1 AND updated_at < ?2
                         ORDER BY updated_at LIMIT ?3)",
                    params![
                        state.as_str(),
                        millis(finished_before),
                        (limit - deleted) as i64
                    ],
                )
                .map_err(unavailable)?;
            }
            Ok(deleted as u64)
        })
        .await
    }
}

#[async_trait]
impl Reports for SqliteStore {
    async fn standing(&self, team: &str, period: &str) -> Result<Standing, StoreError> {
        let (team, period) = (team.to_owned(), period.to_owned());
        self.read(move |conn| {
            let totals: Option<(i64, i64)> = query_row(
                conn,
                "SELECT spent, reserved FROM budget_periods WHERE team = ?1 AND period = ?2",
                params![team, period],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(unavailable)?;
            let (spent, reserved) = totals.unwrap_or((0, 0));
            Ok(Standing {
                spent: Credits::from_units(spent),
                reserved: Credits::from_units(reserved),
            })
        })
        .await
    }

    async fn in_flight(&self, team: &str) -> Result<u64, StoreError> {
        let team = team.to_owned();
        self.read(move |conn| {
            let count: i64 = query_row(
                conn,
                "SELECT count(*) FROM reservations
                     WHERE team = ?1 AND state IN ('reserved', 'open')",
                params![team],
                |r| r.get(0),
            )
            .map_err(unavailable)?;
            Ok(count.unsigned_abs())
        })
        .await
    }

    async fn reservations(
        &self,
        state: TaskState,
        limit: usize,
    ) -> Result<Vec<ReservationRecord>, StoreError> {
        self.read(move |conn| {
            let mut statement = conn
                .prepare_cached(
                    "SELECT id, task_id, team, model, period, reserved, request_id, created_at
                     FROM reservations WHERE state = ?1 ORDER BY created_at DESC LIMIT ?2",
                )
                .map_err(unavailable)?;
            let rows = statement
                .query_map(params![state.as_str(), limit as i64], |r| {
                    Ok(ReservationRecord {
                        id: r.get(0)?,
                        task_id: r.get(1)?,
                        team: r.get(2)?,
                        model: r.get(3)?,
                        period: r.get(4)?,
                        reserved: Credits::from_units(r.get(5)?),
                        state: state.as_str(),
                        request_id: r.get(6)?,
                        created_at: from_millis(r.get(7)?),
                    })
                })
                .map_err(unavailable)?;
            rows.collect::<Result<_, _>>().map_err(unavailable)
        })
        .await
    }

    async fn usage(
        &self,
        team: Option<&str>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let team = team.map(str::to_owned);
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(
                    "SELECT strftime('%Y-%m-%d', created_at / 1000, 'unixepoch') AS day, team, model,
                            count(*),
                            coalesce(sum(final_status = 'success'), 0),
                            coalesce(sum(final_status = 'failed'), 0),
                            coalesce(sum(state IN ('reserved', 'open')), 0),
                            coalesce(sum(CASE WHEN state = 'settled' THEN consumed
                                              WHEN state IN ('expired', 'unknown_outcome')
                                              THEN reserved ELSE 0 END), 0)
                     FROM reservations
                     WHERE created_at >= ?1 AND created_at < ?2 AND state != 'released'
                       AND (?3 IS NULL OR team = ?3)
                     GROUP BY day, team, model ORDER BY day, team, model",
                )
                .map_err(unavailable)?;
            let rows = statement
                .query_map(params![millis(from), millis(to), team], |r| {
                    let count = |i| r.get::<_, i64>(i).map(i64::unsigned_abs);
                    Ok(UsageRow {
                        day: r.get(0)?,
                        team: r.get(1)?,
                        model: r.get(2)?,
                        tasks: count(3)?,
                        succeeded: count(4)?,
                        failed: count(5)?,
                        unsettled: count(6)?,
                        credits: Credits::from_units(r.get(7)?),
                    })
                })
                .map_err(unavailable)?;
            rows.collect::<Result<_, _>>().map_err(unavailable)
        })
        .await
    }
}

#[async_trait]
impl Ledger for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.write(|conn| {
            query_row(conn, "SELECT count(*) FROM budget_periods", [], |_| Ok(()))
                .map_err(unavailable)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::conformance::{deliveries_ended_three_ways, delivery};

    #[tokio::test]
    async fn a_finished_delivery_keeps_no_body() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let store = SqliteStore::open(&path).unwrap();
        deliveries_ended_three_ways(&store).await;
        let conn = Connection::open(&path).unwrap();
        let body_bytes = |id: &str| -> i64 {
            conn.query_row(
                "SELECT length(body) FROM deliveries WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert_eq!(body_bytes("msg_delivered"), 0);
        assert_eq!(body_bytes("msg_dead"), 0);
        assert_eq!(
            body_bytes("msg_retried") as usize,
            delivery("msg_retried", "ta-3").body.len()
        );
    }

    #[tokio::test]
    async fn a_ledger_from_before_webhooks_keeps_its_history_and_gains_the_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        {
            // The schema as the first version left it, with one open task.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            conn.execute(
                "INSERT INTO reservations (id, task_id, team, model, period, reserved, state,
                                           request_id, created_at)
                 VALUES (?1, 'ta-old', 'design', 'google/gempix2', '2026-11', 50000000, 'open',
                         'req-old', 0)",
                params![ReservationId::new().0.to_string()],
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.task("ta-old").await.unwrap().unwrap().team, "design");
        assert!(
            store
                .enqueue_delivery(delivery("msg_1", "ta-old"))
                .await
                .unwrap()
        );
        drop(store);

        // Opening again runs no migration twice and loses nothing.
        let store = SqliteStore::open(&path).unwrap();
        let pending = store.deliveries(DeliveryState::Pending, 10).await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(
            store.task("ta-old").await.unwrap().unwrap().state,
            TaskState::Open
        );
        let version: i64 = Connection::open(&path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
    }
}
