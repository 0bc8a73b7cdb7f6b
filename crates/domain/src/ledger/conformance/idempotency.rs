//! Idempotency-Key claims: taken with the reservation in one step, answered with the task,
//! scoped per team, refused for another request, free again once their request ended unknown or
//! refused (the retry then resolving the unknown attempts), and free once expired.

use super::*;

/// A reservation of 0.50 for `team` claiming `key` for the request with `fingerprint`, made at
/// `made` (an RFC 3339 time); its claim lasts an hour.
pub fn keyed(team: &str, key: &str, fingerprint: &str, made: &str) -> NewReservation {
    NewReservation {
        created_at: at(made),
        idempotency: Some(KeyClaim {
            key: key.into(),
            fingerprint: fingerprint.into(),
            expires_at: at(made) + chrono::Duration::hours(1),
        }),
        ..reservation(team, "0.50", Some("5.00"))
    }
}

/// An upstream's acceptance of `task_id`, as the gateway stores it.
pub fn accepted(task_id: &str) -> StoredAnswer {
    StoredAnswer {
        status: 200,
        content_type: "application/json; charset=utf-8".into(),
        body: format!(r#"{{"code":0,"message":"ok","data":{{"task_id":"{task_id}"}}}}"#)
            .into_bytes(),
    }
}

fn is_reserved(outcome: &ReserveOutcome) -> bool {
    matches!(outcome, ReserveOutcome::Reserved(_))
}

/// Reserves `r`, which must be held; its id.
async fn reserved(store: &dyn Ledger, r: NewReservation) -> ReservationId {
    let id = r.id;
    let outcome = store.reserve(r).await.unwrap();
    assert!(is_reserved(&outcome), "{outcome:?}");
    id
}

pub async fn a_key_replays_its_first_answer_to_its_team_only(store: &dyn Ledger) {
    let first = reserved(
        store,
        keyed("design", "k-1", "fp-a", "2026-11-23T10:00:00Z"),
    )
    .await;
    // While the first waits for the upstream, a repeat may not start another.
    assert_eq!(
        store
            .reserve(keyed("design", "k-1", "fp-a", "2026-11-23T10:00:01Z"))
            .await
            .unwrap(),
        ReserveOutcome::KeyInUse
    );
    // Another request under the key is refused, and changes nothing.
    assert_eq!(
        store
            .reserve(keyed("design", "k-1", "fp-b", "2026-11-23T10:00:01Z"))
            .await
            .unwrap(),
        ReserveOutcome::KeyMismatch
    );
    store
        .mark_dispatched(first, at("2026-11-23T10:00:00Z"))
        .await
        .unwrap();
    assert_eq!(
        store
            .attach_task(first, "ta-1", Some(&accepted("ta-1")))
            .await
            .unwrap(),
        Vec::<ReservationId>::new()
    );
    for made in ["2026-11-23T10:00:02Z", "2026-11-23T10:59:59Z"] {
        assert_eq!(
            store
                .reserve(keyed("design", "k-1", "fp-a", made))
                .await
                .unwrap(),
            ReserveOutcome::Replay(accepted("ta-1")),
            "{made}"
        );
    }
    assert_eq!(
        store
            .reserve(keyed("design", "k-1", "fp-b", "2026-11-23T10:00:02Z"))
            .await
            .unwrap(),
        ReserveOutcome::KeyMismatch
    );
    // Repeats reserved nothing: the team holds the first request's 0.50 only.
    assert_eq!(
        store.standing("design", "2026-11").await.unwrap(),
        Standing {
            spent: Credits::ZERO,
            reserved: credits("0.50")
        }
    );
    // Still replayed once the task settled, and once the budget is spent.
    store
        .settle(
            "ta-1",
            Settlement {
                status: FinalStatus::Success,
                consumed: credits("5.00"),
                at: at("2026-11-23T10:05:00Z"),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .reserve(keyed("design", "k-1", "fp-a", "2026-11-23T10:06:00Z"))
            .await
            .unwrap(),
        ReserveOutcome::Replay(accepted("ta-1"))
    );
    // Another team's key of the same name is its own.
    let ads = reserved(store, keyed("ads", "k-1", "fp-a", "2026-11-23T10:06:00Z")).await;
    assert_ne!(ads, first);
    let listed = store.reservations(TaskState::Reserved, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].idempotency_key.as_deref(), Some("k-1"));
    assert_eq!(listed[0].retry_of, None);
}

pub async fn one_key_reaches_the_upstream_once_however_many_race(
    store: std::sync::Arc<dyn Ledger>,
) {
    let attempts: Vec<_> = (0..50)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .reserve(keyed("design", "race", "fp", "2026-11-23T10:00:00Z"))
                    .await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for attempt in attempts {
        outcomes.push(attempt.await.unwrap().unwrap());
    }
    assert_eq!(outcomes.iter().filter(|o| is_reserved(o)).count(), 1);
    assert!(
        outcomes
            .iter()
            .all(|o| is_reserved(o) || *o == ReserveOutcome::KeyInUse),
        "{outcomes:?}"
    );
    assert_eq!(store.in_flight("design").await.unwrap(), 1);
}

pub async fn a_refused_request_claims_no_key(store: &dyn Ledger) {
    store
        .reserve(reservation("design", "5.00", Some("5.00")))
        .await
        .unwrap();
    assert!(matches!(
        store
            .reserve(keyed("design", "k-2", "fp-a", "2026-11-23T10:00:00Z"))
            .await
            .unwrap(),
        ReserveOutcome::BudgetExhausted { .. }
    ));
    // The key is as free as before: even for another request.
    assert!(is_reserved(
        &store
            .reserve(NewReservation {
                limit: None,
                ..keyed("design", "k-2", "fp-b", "2026-11-23T10:00:01Z")
            })
            .await
            .unwrap()
    ));
}

pub async fn a_retry_after_unknown_outcomes_is_charged_once_for_the_task_it_gets(
    store: &dyn Ledger,
) {
    let key = |made: &str| keyed("design", "k-3", "fp", made);
    // The first attempt times out: it may have started, so it counts as spent.
    let first = reserved(store, key("2026-11-23T10:00:00Z")).await;
    store
        .mark_dispatched(first, at("2026-11-23T10:00:00Z"))
        .await
        .unwrap();
    store
        .mark_unknown_outcome(first, OutcomeReason::UpstreamTimeout)
        .await
        .unwrap();
    // A retry with the key may try again; its connection breaks.
    let second = reserved(store, key("2026-11-23T10:01:00Z")).await;
    store
        .mark_unknown_outcome(second, OutcomeReason::ConnectionBroken)
        .await
        .unwrap();
    // A third is refused by the upstream: nothing started.
    let third = reserved(store, key("2026-11-23T10:02:00Z")).await;
    store.release(third).await.unwrap();
    assert_eq!(
        store.standing("design", "2026-11").await.unwrap(),
        Standing {
            spent: credits("1.00"),
            reserved: Credits::ZERO
        }
    );
    // The fourth gets a task: the two unknown attempts are given back, the team pays for one.
    let fourth = reserved(store, key("2026-11-23T10:03:00Z")).await;
    assert_eq!(
        store
            .attach_task(fourth, "ta-4", Some(&accepted("ta-4")))
            .await
            .unwrap(),
        vec![second, first]
    );
    assert_eq!(
        store.standing("design", "2026-11").await.unwrap(),
        Standing {
            spent: Credits::ZERO,
            reserved: credits("0.50")
        }
    );
    assert_eq!(
        store.reserve(key("2026-11-23T10:04:00Z")).await.unwrap(),
        ReserveOutcome::Replay(accepted("ta-4"))
    );

    let record = |records: &[ReservationRecord], id: ReservationId| {
        records
            .iter()
            .find(|r| r.id == id.0.to_string())
            .cloned()
            .unwrap_or_else(|| panic!("{id:?} not in {records:?}"))
    };
    let released = store.reservations(TaskState::Released, 10).await.unwrap();
    let resolved_by = |id| record(&released, id).resolved_by;
    assert_eq!(resolved_by(first), Some(fourth.0.to_string()));
    assert_eq!(resolved_by(second), Some(fourth.0.to_string()));
    assert_eq!(resolved_by(third), None, "refused, not resolved");
    assert_eq!(record(&released, first).reason, Some("upstream_timeout"));
    assert_eq!(record(&released, second).reason, Some("connection_broken"));
    let open = store.reservations(TaskState::Open, 10).await.unwrap();
    let task = record(&open, fourth);
    assert_eq!(task.retry_of, Some(second.0.to_string()));
    assert_eq!(task.idempotency_key.as_deref(), Some("k-3"));
    assert_eq!(
        record(&released, second).retry_of,
        Some(first.0.to_string())
    );
    assert!(
        store
            .reservations(TaskState::UnknownOutcome, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn an_unknown_attempt_an_admin_released_is_not_released_again(store: &dyn Ledger) {
    let key = |made: &str| keyed("design", "k-4", "fp", made);
    let first = reserved(store, key("2026-11-23T10:00:00Z")).await;
    store
        .mark_unknown_outcome(first, OutcomeReason::UpstreamTimeout)
        .await
        .unwrap();
    let second = reserved(store, key("2026-11-23T10:01:00Z")).await;
    store.release_unknown_outcome(first).await.unwrap();
    assert_eq!(
        store.attach_task(second, "ta-5", None).await.unwrap(),
        Vec::<ReservationId>::new()
    );
    assert_eq!(
        store.standing("design", "2026-11").await.unwrap(),
        Standing {
            spent: Credits::ZERO,
            reserved: credits("0.50")
        }
    );
}

pub async fn an_expired_key_is_free_for_any_request(store: &dyn Ledger) {
    let first = reserved(
        store,
        keyed("design", "k-5", "fp-a", "2026-11-23T10:00:00Z"),
    )
    .await;
    store
        .attach_task(first, "ta-6", Some(&accepted("ta-6")))
        .await
        .unwrap();
    // The claim made at 10:00 lasts until 11:00; a key claimed at 10:30 until 11:30.
    let other = reserved(
        store,
        keyed("design", "k-6", "fp-a", "2026-11-23T10:30:00Z"),
    )
    .await;
    assert_eq!(
        store
            .purge_expired_keys(at("2026-11-23T10:59:59Z"), 100)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .reserve(keyed("design", "k-5", "fp-a", "2026-11-23T10:59:59Z"))
            .await
            .unwrap(),
        ReserveOutcome::Replay(accepted("ta-6"))
    );
    // From 11:00 the key names nothing, whether its claim was deleted yet or not.
    store
        .purge_expired_keys(at("2026-11-23T11:00:00Z"), 100)
        .await
        .unwrap();
    let again = reserved(
        store,
        keyed("design", "k-5", "fp-b", "2026-11-23T11:00:00Z"),
    )
    .await;
    assert_ne!(again, first);
    // A live claim is never purged: the key claimed at 10:30 is still in use.
    assert_eq!(
        store
            .reserve(keyed("design", "k-6", "fp-a", "2026-11-23T11:00:00Z"))
            .await
            .unwrap(),
        ReserveOutcome::KeyInUse
    );
    store.release(other).await.unwrap();
}

/// The idempotency tests, for `conformance_suite!` to run against one engine.
macro_rules! idempotency_suite {
    ($make:expr) => {
        use $crate::ledger::conformance::idempotency as suite;

        #[tokio::test]
        async fn a_key_replays_its_first_answer_to_its_team_only() {
            let store = $make;
            suite::a_key_replays_its_first_answer_to_its_team_only(&*store).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn one_key_reaches_the_upstream_once_however_many_race() {
            let store: std::sync::Arc<dyn $crate::ledger::Ledger> = $make;
            suite::one_key_reaches_the_upstream_once_however_many_race(store).await;
        }

        #[tokio::test]
        async fn a_refused_request_claims_no_key() {
            let store = $make;
            suite::a_refused_request_claims_no_key(&*store).await;
        }

        #[tokio::test]
        async fn a_retry_after_unknown_outcomes_is_charged_once_for_the_task_it_gets() {
            let store = $make;
            suite::a_retry_after_unknown_outcomes_is_charged_once_for_the_task_it_gets(&*store)
                .await;
        }

        #[tokio::test]
        async fn an_unknown_attempt_an_admin_released_is_not_released_again() {
            let store = $make;
            suite::an_unknown_attempt_an_admin_released_is_not_released_again(&*store).await;
        }

        #[tokio::test]
        async fn an_expired_key_is_free_for_any_request() {
            let store = $make;
            suite::an_expired_key_is_free_for_any_request(&*store).await;
        }
    };
}
