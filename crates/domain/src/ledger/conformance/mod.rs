//! The behaviour every ledger engine must show, one part per concern of the ledger: one per trait,
//! `idempotency` for the Idempotency-Key claims that `reserve` and `attach_task` keep, and `text`
//! for reservations settled without a task (each part's tests may use any operation to set up and
//! check what they test). Each engine runs all of it (see the bottom).

use chrono::{DateTime, Utc};

use super::*;

#[macro_use]
pub mod audit;
#[macro_use]
pub mod calibration;
#[macro_use]
pub mod idempotency;
#[macro_use]
pub mod notices;
#[macro_use]
pub mod outbox;
#[macro_use]
pub mod reports;
#[macro_use]
pub mod reservations;
#[macro_use]
pub mod task_accounts;
#[macro_use]
pub mod tasks;
#[macro_use]
pub mod text;

pub fn at(text: &str) -> DateTime<Utc> {
    text.parse().expect("test timestamp")
}

pub fn credits(text: &str) -> Credits {
    text.parse().expect("test amount")
}

pub fn reservation(team: &str, amount: &str, limit: Option<&str>) -> NewReservation {
    NewReservation {
        id: ReservationId::new(),
        team: team.into(),
        key: "main".into(),
        model: "google/gempix2".into(),
        family: "image".into(),
        amount: credits(amount),
        period: "2026-11".into(),
        limit: limit.map(credits),
        max_in_flight: None,
        request_id: "req-1".into(),
        created_at: at("2026-11-23T10:00:00Z"),
        callback: None,
        idempotency: None,
        cost: Some(crate::calibration::CostKey {
            value: None,
            count: 1,
        }),
    }
}

fn settlement(status: FinalStatus, consumed: &str) -> Settlement {
    Settlement {
        status,
        consumed: credits(consumed),
        at: at("2026-11-23T10:05:00Z"),
    }
}

/// Reserves and records a task; returns its reservation id.
pub async fn open_task(
    store: &dyn Ledger,
    team: &str,
    amount: &str,
    task_id: &str,
) -> ReservationId {
    let r = reservation(team, amount, None);
    let id = r.id;
    assert!(matches!(
        store.reserve(r).await.unwrap(),
        ReserveOutcome::Reserved(_)
    ));
    store.attach_task(id, task_id, None).await.unwrap();
    id
}

/// Runs the whole suite against one engine, each part in a module of its own; `$make` is an async
/// expression giving a fresh, empty store each time it is evaluated.
macro_rules! conformance_suite {
    ($engine:ident, $make:expr) => {
        mod $engine {
            mod reservations {
                reservations_suite!($make);
            }
            mod tasks {
                tasks_suite!($make);
            }
            mod outbox {
                outbox_suite!($make);
            }
            mod notices {
                notices_suite!($make);
            }
            mod reports {
                reports_suite!($make);
            }
            mod idempotency {
                idempotency_suite!($make);
            }
            mod text {
                text_suite!($make);
            }
            mod audit {
                audit_suite!($make);
            }
            mod calibration {
                calibration_suite!($make);
            }
            mod task_accounts {
                task_accounts_suite!($make);
            }
        }
    };
}

conformance_suite!(sqlite, {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::ledger::sqlite::SqliteStore::open(&dir.path().join("ledger.db")).unwrap();
    // The directory must outlive the store; the test process cleans /tmp-based dirs on exit.
    std::mem::forget(dir);
    std::sync::Arc::new(store) as std::sync::Arc<dyn crate::ledger::Ledger>
});

conformance_suite!(redis, {
    // Returns early, skipping the test, when no Redis can be found (see `ketchup_test_redis`).
    let Some(store) = crate::ledger::redis::test_store().await else {
        return;
    };
    std::sync::Arc::new(store) as std::sync::Arc<dyn crate::ledger::Ledger>
});
