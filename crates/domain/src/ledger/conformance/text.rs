//! Reservations without a task (text requests, answered at once): settled directly, once, at
//! what the answer cost, also after the reconciler gave them up.

use super::*;

/// A text reservation: no task, settled straight from `reserved` at what the answer cost.
fn text_reservation(amount: &str, limit: Option<&str>) -> NewReservation {
    NewReservation {
        model: "openai/gpt-5.2".into(),
        family: "text".into(),
        cost: None,
        ..reservation("design", amount, limit)
    }
}

pub async fn a_reservation_without_a_task_settles_once_at_its_cost(
    store: std::sync::Arc<dyn Ledger>,
) {
    let r = text_reservation("1.00", Some("5.00"));
    let id = r.id;
    store.reserve(r).await.unwrap();
    assert_eq!(store.in_flight("design").await.unwrap(), 1);
    // Many settle at once (a client that leaves as its stream ends): exactly one does.
    let tries: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .settle_reservation(id, settlement(FinalStatus::Success, "0.00017"))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut settled = 0;
    for outcome in tries {
        match outcome.await.unwrap() {
            SettleOutcome::Settled(task) => {
                settled += 1;
                assert_eq!(
                    task,
                    SettledTask {
                        team: "design".into(),
                        key: "main".into(),
                        model: "openai/gpt-5.2".into(),
                        reserved: credits("1.00"),
                        consumed: credits("0.00017"),
                        cost: None,
                    }
                );
            }
            SettleOutcome::AlreadyClosed => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(settled, 1);
    assert_eq!(
        store.standing("design", "2026-11").await.unwrap(),
        Standing {
            spent: credits("0.00017"),
            reserved: Credits::ZERO
        }
    );
    assert_eq!(store.in_flight("design").await.unwrap(), 0);
    // Nor can it be released or abandoned afterwards.
    assert!(matches!(
        store.release(id).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store
            .abandon_stale_reservations(at("2027-01-01T00:00:00Z"))
            .await
            .unwrap(),
        Abandoned {
            unknown_outcome: 0,
            released: 0
        }
    );
    assert_eq!(
        store
            .settle_reservation(ReservationId::new(), settlement(FinalStatus::Success, "1"))
            .await
            .unwrap(),
        SettleOutcome::NotOpen
    );
}

pub async fn a_reservation_given_up_on_still_settles_at_its_cost(store: &dyn Ledger) {
    // A long answer: the reconciler gives its reservation up as an unknown outcome (spent at the
    // reservation) before the answer ends; its end then charges what it cost instead.
    let r = text_reservation("2.00", Some("5.00"));
    let id = r.id;
    store.reserve(r).await.unwrap();
    store
        .mark_dispatched(id, at("2026-11-23T10:00:01Z"))
        .await
        .unwrap();
    assert_eq!(
        store
            .abandon_stale_reservations(at("2026-11-23T11:00:00Z"))
            .await
            .unwrap(),
        Abandoned {
            unknown_outcome: 1,
            released: 0
        }
    );
    assert_eq!(
        store.standing("design", "2026-11").await.unwrap(),
        Standing {
            spent: credits("2.00"),
            reserved: Credits::ZERO
        }
    );
    let SettleOutcome::Settled(task) = store
        .settle_reservation(id, settlement(FinalStatus::Failed, "0.25"))
        .await
        .unwrap()
    else {
        panic!("an unknown outcome settles");
    };
    assert_eq!(
        (task.reserved, task.consumed),
        (credits("2.00"), credits("0.25"))
    );
    assert_eq!(
        store.standing("design", "2026-11").await.unwrap(),
        Standing {
            spent: credits("0.25"),
            reserved: Credits::ZERO
        }
    );
    assert!(
        store
            .reservations(TaskState::UnknownOutcome, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // A released reservation is closed: settling it changes nothing.
    let released = text_reservation("1.00", None);
    let released_id = released.id;
    store.reserve(released).await.unwrap();
    store.release(released_id).await.unwrap();
    assert_eq!(
        store
            .settle_reservation(released_id, settlement(FinalStatus::Success, "0.50"))
            .await
            .unwrap(),
        SettleOutcome::AlreadyClosed
    );
    assert_eq!(
        store.standing("design", "2026-11").await.unwrap().spent,
        credits("0.25")
    );
}

/// The text reservations tests, for `conformance_suite!` to run against one engine.
macro_rules! text_suite {
    ($make:expr) => {
        use $crate::ledger::conformance::text as suite;

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn a_reservation_without_a_task_settles_once_at_its_cost() {
            let store: std::sync::Arc<dyn $crate::ledger::Ledger> = $make;
            suite::a_reservation_without_a_task_settles_once_at_its_cost(store).await;
        }

        #[tokio::test]
        async fn a_reservation_given_up_on_still_settles_at_its_cost() {
            let store = $make;
            suite::a_reservation_given_up_on_still_settles_at_its_cost(&*store).await;
        }
    };
}
