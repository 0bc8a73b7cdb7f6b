//! Reservations: credits held, given back, charged once; the budget, the in-flight limit and the
//! period totals under every history.

use super::*;

pub async fn the_last_credits_go_to_one_reservation_only(store: std::sync::Arc<dyn Ledger>) {
    // A budget of 5.00 holds exactly ten reservations of 0.50, however many race for it.
    let attempts: Vec<_> = (0..50)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .reserve(reservation("design", "0.50", Some("5.00")))
                    .await
            })
        })
        .collect();
    let mut reserved = 0;
    let mut refused = 0;
    for attempt in attempts {
        match attempt.await.unwrap().unwrap() {
            ReserveOutcome::Reserved(_) => reserved += 1,
            ReserveOutcome::BudgetExhausted {
                spent,
                reserved: held,
            } => {
                assert_eq!(spent, Credits::ZERO);
                assert_eq!(held, credits("5.00"));
                refused += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((reserved, refused), (10, 40));
}

pub async fn release_gives_back_and_unknown_outcome_spends(store: &dyn Ledger) {
    let first = reservation("design", "3.00", Some("5.00"));
    let first_id = first.id;
    assert!(matches!(
        store.reserve(first).await.unwrap(),
        ReserveOutcome::Reserved(_)
    ));
    assert!(matches!(
        store
            .reserve(reservation("design", "3.00", Some("5.00")))
            .await
            .unwrap(),
        ReserveOutcome::BudgetExhausted { .. }
    ));
    store.release(first_id).await.unwrap();
    // Released once; a second release is refused rather than giving back twice.
    assert!(matches!(
        store.release(first_id).await,
        Err(StoreError::Conflict(_))
    ));

    let second = reservation("design", "3.00", Some("5.00"));
    let second_id = second.id;
    assert!(matches!(
        store.reserve(second).await.unwrap(),
        ReserveOutcome::Reserved(_)
    ));
    store
        .mark_unknown_outcome(second_id, OutcomeReason::UpstreamTimeout)
        .await
        .unwrap();
    // The unknown outcome counts as spent: 3.00 spent, 2.00 left.
    assert_eq!(
        store
            .reserve(reservation("design", "2.50", Some("5.00")))
            .await
            .unwrap(),
        ReserveOutcome::BudgetExhausted {
            spent: credits("3.00"),
            reserved: Credits::ZERO
        }
    );
    // The upstream's answer comes after all (the reservation was given up while its request
    // still waited): the task is recorded, and its amount is held again rather than spent.
    store.attach_task(second_id, "ta-late", None).await.unwrap();
    assert_eq!(
        store.standing("design", "2026-11").await.unwrap(),
        Standing {
            spent: Credits::ZERO,
            reserved: credits("3.00")
        }
    );
    assert_eq!(store.in_flight("design").await.unwrap(), 1);
    let task = store.task("ta-late").await.unwrap().expect("recorded");
    assert_eq!(
        (task.team.as_str(), task.state),
        ("design", TaskState::Open)
    );
    assert!(
        store
            .reservations(TaskState::UnknownOutcome, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Once: the reservation is no longer waiting for an answer.
    assert!(matches!(
        store.attach_task(second_id, "ta-later", None).await,
        Err(StoreError::Conflict(_))
    ));
    // An unknown outcome an admin released stays released.
    let third = reservation("design", "1.00", Some("5.00"));
    let third_id = third.id;
    store.reserve(third).await.unwrap();
    store
        .mark_unknown_outcome(third_id, OutcomeReason::UpstreamTimeout)
        .await
        .unwrap();
    store.release_unknown_outcome(third_id).await.unwrap();
    assert!(matches!(
        store.attach_task(third_id, "ta-released", None).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.standing("design", "2026-11").await.unwrap(),
        Standing {
            spent: Credits::ZERO,
            reserved: credits("3.00")
        }
    );
}

pub async fn in_flight_is_counted_from_unsettled_tasks(store: &dyn Ledger) {
    let limited = |amount| NewReservation {
        max_in_flight: Some(2),
        ..reservation("design", amount, None)
    };
    let a = limited("0.50");
    let a_id = a.id;
    store.reserve(a).await.unwrap();
    let b = limited("0.50");
    store.reserve(b.clone()).await.unwrap();
    store.attach_task(b.id, "ta-b", None).await.unwrap();
    assert_eq!(
        store.reserve(limited("0.50")).await.unwrap(),
        ReserveOutcome::TooManyInFlight { in_flight: 2 }
    );
    // Another team is not affected.
    assert!(matches!(
        store
            .reserve(NewReservation {
                max_in_flight: Some(2),
                ..reservation("ads", "0.50", None)
            })
            .await
            .unwrap(),
        ReserveOutcome::Reserved(_)
    ));
    store.release(a_id).await.unwrap();
    assert!(matches!(
        store.reserve(limited("0.50")).await.unwrap(),
        ReserveOutcome::Reserved(_)
    ));
}

pub async fn periods_are_separate(store: &dyn Ledger) {
    store
        .reserve(reservation("design", "5.00", Some("5.00")))
        .await
        .unwrap();
    assert!(matches!(
        store
            .reserve(reservation("design", "0.50", Some("5.00")))
            .await
            .unwrap(),
        ReserveOutcome::BudgetExhausted { .. }
    ));
    let next_month = NewReservation {
        period: "2026-12".into(),
        ..reservation("design", "0.50", Some("5.00"))
    };
    assert!(matches!(
        store.reserve(next_month).await.unwrap(),
        ReserveOutcome::Reserved(_)
    ));
}

pub async fn settlement_replaces_the_reservation_once(store: std::sync::Arc<dyn Ledger>) {
    open_task(&*store, "design", "0.50", "ta-s").await;
    assert_eq!(
        store.standing("design", "2026-11").await.unwrap(),
        Standing {
            spent: Credits::ZERO,
            reserved: credits("0.50")
        }
    );
    // Fifty readers see the final state at once: one of them settles it.
    let racers: Vec<_> = (0..50)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .settle("ta-s", settlement(FinalStatus::Success, "0.00100000"))
                    .await
            })
        })
        .collect();
    let mut settled = 0;
    for racer in racers {
        match racer.await.unwrap().unwrap() {
            SettleOutcome::Settled(task) => {
                settled += 1;
                assert_eq!(task.team, "design");
                assert_eq!(task.reserved, credits("0.50"));
                assert_eq!(task.consumed, credits("0.001"));
            }
            SettleOutcome::AlreadyClosed => {}
            SettleOutcome::NotOpen => panic!("the task is known"),
        }
    }
    assert_eq!(settled, 1);
    assert_eq!(
        store.standing("design", "2026-11").await.unwrap(),
        Standing {
            spent: credits("0.001"),
            reserved: Credits::ZERO
        }
    );
    assert_eq!(
        store.task("ta-s").await.unwrap().unwrap().state,
        TaskState::Settled
    );
    assert_eq!(store.in_flight("design").await.unwrap(), 0);
    assert_eq!(
        store
            .settle("ta-unknown", settlement(FinalStatus::Success, "1"))
            .await
            .unwrap(),
        SettleOutcome::NotOpen
    );
    // Expiring a settled task changes nothing either.
    assert_eq!(
        store
            .expire("ta-s", at("2026-11-24T10:00:00Z"))
            .await
            .unwrap(),
        SettleOutcome::AlreadyClosed
    );
}

pub async fn expiry_charges_the_reservation(store: &dyn Ledger) {
    open_task(store, "design", "0.50", "ta-old").await;
    match store
        .expire("ta-old", at("2026-11-24T10:00:00Z"))
        .await
        .unwrap()
    {
        SettleOutcome::Settled(task) => assert_eq!(task.consumed, credits("0.50")),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store.task("ta-old").await.unwrap().unwrap().state,
        TaskState::Expired
    );
    assert_eq!(
        store.standing("design", "2026-11").await.unwrap(),
        Standing {
            spent: credits("0.50"),
            reserved: Credits::ZERO
        }
    );
    assert_eq!(
        store
            .settle("ta-old", settlement(FinalStatus::Success, "0.10"))
            .await
            .unwrap(),
        SettleOutcome::AlreadyClosed
    );
}

pub async fn every_stale_reservation_is_abandoned_however_many(store: &dyn Ledger) {
    // More than two of the Redis engine's batches, the last one short; every other one was
    // dispatched before its gateway stopped.
    let stale = 2 * crate::ledger::redis::ABANDON_BATCH + 10;
    for n in 0..stale {
        let r = reservation("design", "0.01", None);
        let id = r.id;
        store.reserve(r).await.unwrap();
        if n % 2 == 0 {
            store
                .mark_dispatched(id, at("2026-11-23T10:00:01Z"))
                .await
                .unwrap();
        }
    }
    let dispatched = stale.div_ceil(2);
    let fresh = NewReservation {
        created_at: at("2026-11-23T10:40:00Z"),
        ..reservation("design", "0.01", None)
    };
    let fresh_id = fresh.id;
    store.reserve(fresh).await.unwrap();
    assert_eq!(
        store
            .abandon_stale_reservations(at("2026-11-23T10:30:00Z"))
            .await
            .unwrap(),
        Abandoned {
            unknown_outcome: dispatched as u64,
            released: (stale - dispatched) as u64
        }
    );
    let unknown = store
        .reservations(TaskState::UnknownOutcome, stale + 1)
        .await
        .unwrap();
    assert_eq!(unknown.len(), dispatched);
    assert!(
        unknown
            .iter()
            .all(|r| r.reason == Some("no_answer_recorded") && r.dispatched_at.is_some())
    );
    let released = store
        .reservations(TaskState::Released, stale + 1)
        .await
        .unwrap();
    assert_eq!(released.len(), stale - dispatched);
    assert!(
        released
            .iter()
            .all(|r| r.reason == Some("never_dispatched") && r.dispatched_at.is_none())
    );
    let waiting = store.reservations(TaskState::Reserved, 10).await.unwrap();
    let waiting: Vec<&str> = waiting.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(waiting, [fresh_id.0.to_string()], "the fresh one waits on");
    assert_eq!(
        store.standing("design", "2026-11").await.unwrap(),
        Standing {
            spent: credits("0.01").checked_mul(dispatched as i64).unwrap(),
            reserved: credits("0.01")
        }
    );
    assert_eq!(
        store
            .abandon_stale_reservations(at("2026-11-23T10:30:00Z"))
            .await
            .unwrap(),
        Abandoned::default(),
        "nothing twice"
    );
}

pub async fn a_stale_reservation_is_unknown_if_dispatched_and_given_back_if_not(
    store: &dyn Ledger,
) {
    let sent = reservation("design", "0.50", Some("5.00"));
    let sent_id = sent.id;
    store.reserve(sent).await.unwrap();
    store
        .mark_dispatched(sent_id, at("2026-11-23T10:00:02Z"))
        .await
        .unwrap();
    let never_sent = reservation("design", "1.00", Some("5.00"));
    let never_sent_id = never_sent.id;
    store.reserve(never_sent).await.unwrap();
    // Listed while waiting: one dispatched, one not.
    let waiting = store.reservations(TaskState::Reserved, 10).await.unwrap();
    let dispatched_at = |id: ReservationId| {
        waiting
            .iter()
            .find(|r| r.id == id.0.to_string())
            .map(|r| r.dispatched_at)
    };
    assert_eq!(
        dispatched_at(sent_id),
        Some(Some(at("2026-11-23T10:00:02Z")))
    );
    assert_eq!(dispatched_at(never_sent_id), Some(None));

    assert_eq!(
        store
            .abandon_stale_reservations(at("2026-11-23T10:30:00Z"))
            .await
            .unwrap(),
        Abandoned {
            unknown_outcome: 1,
            released: 1
        }
    );
    let unknown = store
        .reservations(TaskState::UnknownOutcome, 10)
        .await
        .unwrap();
    assert_eq!(unknown.len(), 1);
    assert_eq!(unknown[0].id, sent_id.0.to_string());
    assert_eq!(unknown[0].reason, Some("no_answer_recorded"));
    assert_eq!(unknown[0].dispatched_at, Some(at("2026-11-23T10:00:02Z")));
    let released = store.reservations(TaskState::Released, 10).await.unwrap();
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].id, never_sent_id.0.to_string());
    assert_eq!(released[0].reason, Some("never_dispatched"));
    assert_eq!(released[0].dispatched_at, None);
    // Only the one that may have reached the upstream counts as spent.
    assert_eq!(
        store.standing("design", "2026-11").await.unwrap(),
        Standing {
            spent: credits("0.50"),
            reserved: Credits::ZERO
        }
    );
    // A gateway still about to send the given-up one may not: it is not held any more.
    assert!(matches!(
        store
            .mark_dispatched(never_sent_id, at("2026-11-23T10:31:00Z"))
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store
            .mark_dispatched(ReservationId::new(), at("2026-11-23T10:31:00Z"))
            .await,
        Err(StoreError::Conflict(_))
    ));
}

pub async fn a_reservation_dispatched_late_waits_from_its_dispatch(store: &dyn Ledger) {
    let late = reservation("design", "0.50", None);
    let late_id = late.id;
    store.reserve(late).await.unwrap();
    store
        .mark_dispatched(late_id, at("2026-11-23T10:40:00Z"))
        .await
        .unwrap();
    // Made before 10:30, but its upstream call started after: it may still be answered.
    assert_eq!(
        store
            .abandon_stale_reservations(at("2026-11-23T10:30:00Z"))
            .await
            .unwrap(),
        Abandoned::default()
    );
    assert_eq!(
        store
            .abandon_stale_reservations(at("2026-11-23T10:50:00Z"))
            .await
            .unwrap(),
        Abandoned {
            unknown_outcome: 1,
            released: 0
        }
    );
}

pub async fn each_unknown_outcome_says_why(store: &dyn Ledger) {
    let reasons = [
        OutcomeReason::UpstreamTimeout,
        OutcomeReason::ConnectionBroken,
        OutcomeReason::AcceptedWithoutTaskId,
    ];
    let mut expected = Vec::new();
    for (n, reason) in reasons.into_iter().enumerate() {
        let r = NewReservation {
            created_at: at("2026-11-23T10:00:00Z") + chrono::Duration::seconds(n as i64),
            ..reservation("design", "0.50", None)
        };
        let id = r.id;
        store.reserve(r).await.unwrap();
        store
            .mark_dispatched(id, at("2026-11-23T10:01:00Z"))
            .await
            .unwrap();
        store.mark_unknown_outcome(id, reason).await.unwrap();
        expected.push((id.0.to_string(), Some(reason.as_str())));
        // Once unknown, it stays so: no second mark, no task.
        assert!(matches!(
            store
                .mark_unknown_outcome(id, OutcomeReason::ConnectionBroken)
                .await,
            Err(StoreError::Conflict(_))
        ));
    }
    expected.reverse();
    let listed: Vec<(String, Option<&str>)> = store
        .reservations(TaskState::UnknownOutcome, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.id, r.reason))
        .collect();
    assert_eq!(listed, expected, "newest first, each with its reason");
}

/// One step of a random ledger history; task numbers refer to reservations made so far.
#[derive(Debug, Clone)]
pub enum Op {
    Reserve { team: usize, cents: i64 },
    Dispatch(usize),
    Attach(usize),
    Release(usize),
    Unknown(usize),
    Settle { task: usize, cents: i64 },
    Expire(usize),
}

pub fn operations() -> impl proptest::strategy::Strategy<Value = Vec<Op>> {
    use proptest::prelude::*;
    let op = prop_oneof![
        3 => (0..2usize, 1..300i64).prop_map(|(team, cents)| Op::Reserve { team, cents }),
        1 => (0..40usize).prop_map(Op::Dispatch),
        2 => (0..40usize).prop_map(Op::Attach),
        1 => (0..40usize).prop_map(Op::Release),
        1 => (0..40usize).prop_map(Op::Unknown),
        2 => (0..40usize, 0..400i64).prop_map(|(task, cents)| Op::Settle { task, cents }),
        1 => (0..40usize).prop_map(Op::Expire),
    ];
    proptest::collection::vec(op, 1..40)
}

/// Plays a random history against the store and checks, after every step, that: nothing held
/// goes negative; each task settles at most once; `spent + reserved` never passes the budget
/// except by what settled tasks consumed beyond their reservation; and the store's totals equal
/// a plain model of the same history.
pub async fn invariants_hold(store: &dyn Ledger, ops: Vec<Op>) {
    const TEAMS: [&str; 2] = ["design", "ads"];
    let limit = credits("10.00");
    let cents = |c: i64| Credits::from_units(c * 1_000_000);
    // Per reservation: team index, amount, model state.
    let mut made: Vec<(usize, Credits, ReservationId, TaskState)> = Vec::new();
    let mut excess = [0i64; 2];
    let mut settled_once = std::collections::HashSet::new();
    for op in ops {
        match op {
            Op::Reserve { team, cents: c } => {
                let r = NewReservation {
                    amount: cents(c),
                    ..reservation(TEAMS[team], "0", Some("10.00"))
                };
                let id = r.id;
                if let ReserveOutcome::Reserved(_) = store.reserve(r).await.unwrap() {
                    made.push((team, cents(c), id, TaskState::Reserved));
                }
            }
            Op::Dispatch(k) if k < made.len() => {
                let (_, _, id, state) = made[k];
                let dispatched = store.mark_dispatched(id, at("2026-11-23T10:00:01Z")).await;
                assert_eq!(
                    dispatched.is_ok(),
                    state == TaskState::Reserved,
                    "{op:?} on a reservation in state {state:?}: {dispatched:?}"
                );
            }
            Op::Attach(k) | Op::Release(k) | Op::Unknown(k) if k < made.len() => {
                let (_, _, id, state) = made[k];
                let result = match op {
                    Op::Attach(_) => store
                        .attach_task(id, &format!("ta-{k}"), None)
                        .await
                        .map(|_| TaskState::Open),
                    Op::Release(_) => store.release(id).await.map(|_| TaskState::Released),
                    _ => store
                        .mark_unknown_outcome(id, OutcomeReason::UpstreamTimeout)
                        .await
                        .map(|_| TaskState::UnknownOutcome),
                };
                match (state, result) {
                    (TaskState::Reserved, Ok(next)) => made[k].3 = next,
                    (TaskState::Reserved, Err(e)) => {
                        panic!("a held reservation refused {op:?}: {e}")
                    }
                    // A late answer for a reservation given up as an unknown outcome.
                    (TaskState::UnknownOutcome, Ok(TaskState::Open)) => made[k].3 = TaskState::Open,
                    (TaskState::UnknownOutcome, Err(e)) if matches!(op, Op::Attach(_)) => {
                        panic!("an unknown outcome refused its late task: {e}")
                    }
                    (_, Ok(_)) => panic!("{op:?} accepted on a reservation in state {state:?}"),
                    (_, Err(_)) => {}
                }
            }
            Op::Settle { task: k, .. } | Op::Expire(k) if k < made.len() => {
                let task_id = format!("ta-{k}");
                let outcome = match op {
                    Op::Settle { cents: c, .. } => store
                        .settle(
                            &task_id,
                            Settlement {
                                status: FinalStatus::Success,
                                consumed: cents(c),
                                at: at("2026-11-23T11:00:00Z"),
                            },
                        )
                        .await
                        .unwrap(),
                    _ => store
                        .expire(&task_id, at("2026-11-24T11:00:00Z"))
                        .await
                        .unwrap(),
                };
                let (team, amount, _, state) = made[k];
                match outcome {
                    SettleOutcome::Settled(settled) => {
                        assert_eq!(state, TaskState::Open, "only an open task settles");
                        assert!(settled_once.insert(k), "task {k} settled twice");
                        assert_eq!(settled.reserved, amount);
                        excess[team] += (settled.consumed.units() - amount.units()).max(0);
                        made[k].3 = TaskState::Settled;
                        made[k].1 = settled.consumed;
                    }
                    SettleOutcome::AlreadyClosed => assert_eq!(state, TaskState::Settled),
                    SettleOutcome::NotOpen => assert_ne!(state, TaskState::Open),
                }
            }
            _ => {}
        }
        for (team_index, team) in TEAMS.iter().enumerate() {
            let standing = store.standing(team, "2026-11").await.unwrap();
            let mine = made.iter().filter(|m| m.0 == team_index);
            let model_reserved: i64 = mine
                .clone()
                .filter(|m| matches!(m.3, TaskState::Reserved | TaskState::Open))
                .map(|m| m.1.units())
                .sum();
            let model_spent: i64 = mine
                .filter(|m| matches!(m.3, TaskState::Settled | TaskState::UnknownOutcome))
                .map(|m| m.1.units())
                .sum();
            assert!(standing.reserved >= Credits::ZERO && standing.spent >= Credits::ZERO);
            assert_eq!(standing.reserved.units(), model_reserved, "{team} reserved");
            assert_eq!(standing.spent.units(), model_spent, "{team} spent");
            assert!(
                standing.spent.units() + standing.reserved.units()
                    <= limit.units() + excess[team_index],
                "{team} went over budget by more than consumed-over-reserve"
            );
        }
    }
}

/// The reservations tests, for `conformance_suite!` to run against one engine.
macro_rules! reservations_suite {
    ($make:expr) => {
        use $crate::ledger::conformance::reservations as suite;

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn the_last_credits_go_to_one_reservation_only() {
            let store: std::sync::Arc<dyn $crate::ledger::Ledger> = $make;
            suite::the_last_credits_go_to_one_reservation_only(store).await;
        }

        #[tokio::test]
        async fn release_gives_back_and_unknown_outcome_spends() {
            let store = $make;
            suite::release_gives_back_and_unknown_outcome_spends(&*store).await;
        }

        #[tokio::test]
        async fn in_flight_is_counted_from_unsettled_tasks() {
            let store = $make;
            suite::in_flight_is_counted_from_unsettled_tasks(&*store).await;
        }

        #[tokio::test]
        async fn periods_are_separate() {
            let store = $make;
            suite::periods_are_separate(&*store).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn settlement_replaces_the_reservation_once() {
            let store: std::sync::Arc<dyn $crate::ledger::Ledger> = $make;
            suite::settlement_replaces_the_reservation_once(store).await;
        }

        #[tokio::test]
        async fn expiry_charges_the_reservation() {
            let store = $make;
            suite::expiry_charges_the_reservation(&*store).await;
        }

        #[tokio::test]
        async fn every_stale_reservation_is_abandoned_however_many() {
            let store = $make;
            suite::every_stale_reservation_is_abandoned_however_many(&*store).await;
        }

        #[tokio::test]
        async fn a_stale_reservation_is_unknown_if_dispatched_and_given_back_if_not() {
            let store = $make;
            suite::a_stale_reservation_is_unknown_if_dispatched_and_given_back_if_not(&*store)
                .await;
        }

        #[tokio::test]
        async fn a_reservation_dispatched_late_waits_from_its_dispatch() {
            let store = $make;
            suite::a_reservation_dispatched_late_waits_from_its_dispatch(&*store).await;
        }

        #[tokio::test]
        async fn each_unknown_outcome_says_why() {
            let store = $make;
            suite::each_unknown_outcome_says_why(&*store).await;
        }

        proptest::proptest! {
            #![proptest_config(proptest::test_runner::Config::with_cases(24))]
            #[test]
            fn invariants_hold_across_random_histories(
                ops in suite::operations()
            ) {
                let runtime = tokio::runtime::Runtime::new().unwrap();
                runtime.block_on(async {
                    let store: std::sync::Arc<dyn $crate::ledger::Ledger> = $make;
                    suite::invariants_hold(&*store, ops).await;
                });
            }
        }
    };
}
