//! The embedded ledger: SQLite in WAL mode with `synchronous = FULL`, so a write that returned
//! survives a crash or a SIGKILL.
//!
//! All writes go through one writer thread that applies them in batches: every waiting write
//! joins the next transaction, and one fsync commits them all (group commit). That keeps durable
//! writes cheap under load, and because only one thread writes, each check-and-reserve sees every
//! earlier one: two reservations can never both take the last credits. Reads use their own
//! connections, which WAL lets run beside the writer.
//!
//! The operations are in one file per concern, as the ledger's traits cut them: `reservations`
//! (with `idempotency`, the keys reservations claim), `tasks`, `outbox`, `notices`, `reports`,
//! `audit` and `calibration`. This file is the store they share: the schema and its migrations,
//! the writer thread and the readers, and the statement helpers.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};

use super::{Ledger, StoreError};

mod audit;
mod calibration;
mod idempotency;
mod notices;
mod outbox;
mod reports;
mod reservations;
mod task_accounts;
mod tasks;

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
        body            BLOB NOT NULL,      -- the payload, byte for byte
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
    // The family of the route each generation came through, which usage groups by. Rows
    // recorded before are all image generations, the only kind the gateway served then.
    r#"
    ALTER TABLE reservations ADD COLUMN family TEXT NOT NULL DEFAULT 'image';
    "#,
    // When each reservation was marked as sent to the upstream, why an unknown outcome is one,
    // and the Idempotency-Key a generation claimed, with the attempts it links: the earlier one
    // whose outcome was unknown (`retry_of`) and the retry whose task released it
    // (`resolved_by`). The version before recorded no dispatch, so a reservation it left waiting
    // may have been sent: it counts as sent when it was made. Then the claims themselves, one
    // per team and key, with the answer their repeats get once there is one.
    r#"
    ALTER TABLE reservations ADD COLUMN dispatched_at INTEGER;
    ALTER TABLE reservations ADD COLUMN reason TEXT;
    ALTER TABLE reservations ADD COLUMN idempotency_key TEXT;
    ALTER TABLE reservations ADD COLUMN retry_of TEXT;
    ALTER TABLE reservations ADD COLUMN resolved_by TEXT;
    UPDATE reservations SET dispatched_at = created_at WHERE state = 'reserved';
    CREATE TABLE idempotency_keys (
        team         TEXT NOT NULL,
        key          TEXT NOT NULL,
        fingerprint  TEXT NOT NULL,     -- SHA-256 (hex) of the route path and the body
        reservation  TEXT NOT NULL,     -- the attempt that holds the key now
        expires_at   INTEGER NOT NULL,  -- unix ms; from then on the key is free
        status       INTEGER,           -- the answer repeats get, once the upstream accepted
        content_type TEXT,
        body         BLOB,
        PRIMARY KEY (team, key)
    ) WITHOUT ROWID;
    CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
    "#,
    // Budget notifications: one claim per team, period and threshold, taken in the transaction
    // that queues its delivery, so a notification is neither lost nor sent twice.
    r#"
    CREATE TABLE budget_notices (
        team        TEXT NOT NULL,
        period      TEXT NOT NULL,
        percent     INTEGER NOT NULL,   -- of the team's budget, 1 to 100
        delivery_id TEXT NOT NULL,      -- the delivery it queued
        claimed_at  INTEGER NOT NULL,   -- unix ms
        expires_at  INTEGER,            -- unix ms; from then on forgotten; NULL: kept (lifetime)
        PRIMARY KEY (team, period, percent)
    ) WITHOUT ROWID;
    "#,
    // The name of the team key that made each reservation, which usage is split by (empty on
    // those recorded before), and the audit trail of admin actions. AUTOINCREMENT: an id is
    // never reused once its action is deleted, so a listing's `before` cursor stays true.
    r#"
    ALTER TABLE reservations ADD COLUMN key_label TEXT NOT NULL DEFAULT '';
    CREATE TABLE admin_actions (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        at         INTEGER NOT NULL,    -- unix ms
        admin      TEXT NOT NULL,       -- the admin token's label
        action     TEXT NOT NULL,       -- method and route, e.g. 'POST /admin/reservations/{id}/release'
        target     TEXT NOT NULL,       -- the route's path parameters as sent
        status     INTEGER NOT NULL,    -- the HTTP status answered
        request_id TEXT NOT NULL
    );
    CREATE INDEX admin_actions_at ON admin_actions (at);
    "#,
    // What each task's cost is set against (its cost-field value, `n`), and the settled costs
    // per UTC day, model and value that reservations are calibrated from (`calibration`):
    // totals, and a histogram of costs by bucket. `priced` is 0 for a flat reserve (`value`
    // then empty).
    r#"
    ALTER TABLE reservations ADD COLUMN cost_value TEXT;
    ALTER TABLE reservations ADD COLUMN cost_count INTEGER;
    CREATE TABLE settled_costs (
        day      TEXT NOT NULL,         -- UTC, YYYY-MM-DD
        model    TEXT NOT NULL,
        priced   INTEGER NOT NULL,
        value    TEXT NOT NULL,
        settled  INTEGER NOT NULL,
        over     INTEGER NOT NULL,      -- tasks that cost more than they reserved
        max      INTEGER NOT NULL,      -- units of 1e-8, per output
        PRIMARY KEY (day, model, priced, value)
    ) WITHOUT ROWID;
    CREATE TABLE settled_cost_buckets (
        day      TEXT NOT NULL,
        model    TEXT NOT NULL,
        priced   INTEGER NOT NULL,
        value    TEXT NOT NULL,
        bucket   INTEGER NOT NULL,      -- the bucket's upper bound, units of 1e-8
        settled  INTEGER NOT NULL,
        PRIMARY KEY (day, model, priced, value, bucket)
    ) WITHOUT ROWID;
    "#,
    // The upstream account that started each task. Tasks recorded before have none: they were
    // all started with the one token there was then.
    r#"
    CREATE TABLE task_accounts (
        task_id TEXT PRIMARY KEY,
        account TEXT NOT NULL
    ) WITHOUT ROWID;
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
    /// lookup takes microseconds, less than handing it to the blocking pool and back would cost
    /// (`bench/run` scenario 4 measures reads that ask the ledger for every owner).
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
    use rusqlite::params;

    use super::*;
    use crate::ledger::conformance::at;
    use crate::ledger::conformance::idempotency::keyed;
    use crate::ledger::conformance::outbox::delivery;
    use crate::ledger::{
        Abandoned, Audit, AuditQuery, DeliveryState, Outbox, Reports, ReservationId, Reservations,
        TaskState, Tasks,
    };

    fn claims(path: &Path) -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row("SELECT count(*) FROM idempotency_keys", [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn expired_key_claims_are_deleted_a_batch_at_a_time_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let store = SqliteStore::open(&path).unwrap();
        // Five claims lasting until 11:00 to 11:04, one each minute.
        for n in 0..5 {
            let made = format!("2026-11-23T10:0{n}:00Z");
            let r = keyed("design", &format!("k-{n}"), "fp", &made);
            store.reserve(r).await.unwrap();
        }
        assert_eq!(claims(&path), 5);
        let now = at("2026-11-23T11:02:30Z");
        assert_eq!(store.purge_expired_keys(now, 2).await.unwrap(), 2);
        assert_eq!(store.purge_expired_keys(now, 2).await.unwrap(), 1);
        assert_eq!(store.purge_expired_keys(now, 2).await.unwrap(), 0);
        assert_eq!(claims(&path), 2, "the claims until 11:03 and 11:04 stay");
    }

    /// A ledger file at `path` as the version before the migration that contains `change` left
    /// it: the schema and every migration before that one, and its `user_version`.
    fn ledger_before(path: &std::path::Path, change: &str) -> Connection {
        let before = MIGRATIONS
            .iter()
            .position(|m| m.contains(change))
            .unwrap_or_else(|| panic!("no migration contains {change:?}"));
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        for migration in &MIGRATIONS[..before] {
            conn.execute_batch(migration).unwrap();
        }
        conn.pragma_update(None, "user_version", before as i64)
            .unwrap();
        conn
    }

    #[tokio::test]
    async fn a_reservation_left_waiting_by_the_version_before_dispatch_counts_as_sent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let id = ReservationId::new();
        {
            // The schema as the version before dispatch left it, with one reservation waiting.
            let conn = ledger_before(&path, "ADD COLUMN dispatched_at");
            conn.execute(
                "INSERT INTO reservations (id, team, model, period, reserved, state, request_id,
                                           created_at)
                 VALUES (?1, 'design', 'google/gempix2', '2026-11', 50000000, 'reserved',
                         'req-old', ?2)",
                params![id.0.to_string(), millis(at("2026-11-23T10:00:00Z"))],
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(
            store
                .abandon_stale_reservations(at("2026-11-23T10:30:00Z"))
                .await
                .unwrap(),
            Abandoned {
                unknown_outcome: 1,
                released: 0
            }
        );
        let unknown = store
            .reservations(TaskState::UnknownOutcome, 10)
            .await
            .unwrap();
        assert_eq!(unknown[0].id, id.0.to_string());
        assert_eq!(unknown[0].dispatched_at, Some(at("2026-11-23T10:00:00Z")));
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

    #[tokio::test]
    async fn tasks_recorded_before_route_families_count_as_images() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        {
            // The schema as the version before families left it, with one open task.
            let conn = ledger_before(&path, "ADD COLUMN family");
            conn.execute(
                "INSERT INTO reservations (id, task_id, team, model, period, reserved, state,
                                           request_id, created_at)
                 VALUES (?1, 'ta-old', 'design', 'google/gempix2', '2026-11', 50000000, 'open',
                         'req-old', ?2)",
                params![
                    ReservationId::new().0.to_string(),
                    millis(at("2026-11-23T10:00:00Z"))
                ],
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let rows = store
            .usage(None, at("2026-11-23T00:00:00Z"), at("2026-11-24T00:00:00Z"))
            .await
            .unwrap();
        let families: Vec<(&str, u64)> =
            rows.iter().map(|r| (r.family.as_str(), r.tasks)).collect();
        assert_eq!(families, [("image", 1)]);
    }

    #[tokio::test]
    async fn tasks_recorded_before_key_names_are_reported_with_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        {
            // The schema as the version before key names left it, with one settled task.
            let conn = ledger_before(&path, "ADD COLUMN key_label");
            conn.execute(
                "INSERT INTO reservations (id, task_id, team, model, period, reserved, consumed,
                                           state, final_status, request_id, created_at)
                 VALUES (?1, 'ta-old', 'design', 'google/gempix2', '2026-11', 50000000, 40000000,
                         'settled', 'success', 'req-old', ?2)",
                params![
                    ReservationId::new().0.to_string(),
                    millis(at("2026-11-23T10:00:00Z"))
                ],
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let rows = store
            .usage(None, at("2026-11-23T00:00:00Z"), at("2026-11-24T00:00:00Z"))
            .await
            .unwrap();
        let keys: Vec<(&str, u64)> = rows.iter().map(|r| (r.key.as_str(), r.tasks)).collect();
        assert_eq!(keys, [("", 1)]);
        assert!(
            store
                .admin_actions(AuditQuery {
                    before: None,
                    since: None,
                    admin: None,
                    limit: 10
                })
                .await
                .unwrap()
                .is_empty()
        );
    }
}
