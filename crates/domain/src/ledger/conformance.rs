//! The behaviour every ledger engine must show. Each engine runs all of it (see the bottom).

use chrono::{DateTime, Utc};

use super::*;

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
        model: "google/gempix2".into(),
        amount: credits(amount),
        period: "2026-11".into(),
        limit: limit.map(credits),
        max_in_flight: None,
        request_id: "req-1".into(),
        created_at: at("2026-11-23T10:00:00Z"),
        callback: None,
    }
}

pub async fn ownership_is_recorded_and_read_back(store: &dyn Ledger) {
    let r = reservation("design", "0.50", None);
    let id = r.id;
    assert!(matches!(
        store.reserve(r).await.unwrap(),
        ReserveOutcome::Reserved(_)
    ));
    assert_eq!(store.task("ta-1").await.unwrap(), None);
    store.attach_task(id, "ta-1").await.unwrap();
    let task = store.task("ta-1").await.unwrap().expect("recorded");
    assert_eq!(task.team, "design");
    assert_eq!(task.model, "google/gempix2");
    assert_eq!(task.reserved, credits("0.50"));
    assert_eq!(task.state, TaskState::Open);
    assert_eq!(task.created_at, at("2026-11-23T10:00:00Z"));
    // A task id belongs to one reservation only.
    let other = reservation("ads", "0.50", None);
    let other_id = other.id;
    store.reserve(other).await.unwrap();
    assert!(matches!(
        store.attach_task(other_id, "ta-1").await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.task("ta-1").await.unwrap().unwrap().team, "design");
}

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
    store.mark_unknown_outcome(second_id).await.unwrap();
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
    assert!(matches!(
        store.attach_task(second_id, "ta-late").await,
        Err(StoreError::Conflict(_))
    ));
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
    store.attach_task(b.id, "ta-b").await.unwrap();
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
    store.attach_task(id, task_id).await.unwrap();
    id
}

/// Every task from `start` on, a page of `page` at a time.
pub async fn walk(store: &dyn Ledger, start: TaskCursor, page: usize) -> Vec<TaskRecord> {
    let (mut tasks, mut next) = (Vec::new(), Some(start));
    while let Some(from) = next {
        let (found, then) = store.tasks_from(from, page).await.unwrap();
        assert!(found.len() <= page, "a page of {page} held {}", found.len());
        tasks.extend(found);
        next = then;
    }
    tasks
}

pub async fn tasks_are_walked_in_the_order_they_were_recorded(store: &dyn Ledger) {
    // Refused by the upstream: a reservation that never got a task, and is never walked.
    let refused = reservation("design", "0.50", None);
    let refused_id = refused.id;
    store.reserve(refused).await.unwrap();
    store.release(refused_id).await.unwrap();
    for n in 0..5 {
        let mut r = reservation(if n % 2 == 0 { "design" } else { "ads" }, "0.50", None);
        r.created_at = at("2026-11-23T10:00:00Z") + chrono::Duration::seconds(n);
        let id = r.id;
        store.reserve(r).await.unwrap();
        store.attach_task(id, &format!("ta-w{n}")).await.unwrap();
    }
    store
        .settle("ta-w1", settlement(FinalStatus::Success, "0.40"))
        .await
        .unwrap();
    let ids = |tasks: &[TaskRecord]| tasks.iter().map(|t| t.task_id.clone()).collect::<Vec<_>>();

    let all = walk(store, store.newest_tasks_start(100).await.unwrap(), 2).await;
    assert_eq!(ids(&all), ["ta-w0", "ta-w1", "ta-w2", "ta-w3", "ta-w4"]);
    let teams: Vec<_> = all.iter().map(|t| t.team.as_str()).collect();
    assert_eq!(teams, ["design", "ads", "design", "ads", "design"]);
    let closed: Vec<_> = all.iter().map(|t| t.state.is_closed()).collect();
    assert_eq!(closed, [false, true, false, false, false]);

    let newest = walk(store, store.newest_tasks_start(2).await.unwrap(), 10).await;
    assert_eq!(ids(&newest), ["ta-w3", "ta-w4"]);
    assert!(
        walk(store, store.newest_tasks_start(0).await.unwrap(), 10)
            .await
            .is_empty()
    );
    // A task recorded after the walk started is in its next page.
    let start = store.newest_tasks_start(1).await.unwrap();
    let (first, next) = store.tasks_from(start, 1).await.unwrap();
    assert_eq!(ids(&first), ["ta-w4"]);
    let mut late = reservation("design", "0.50", None);
    late.created_at = at("2026-11-23T10:01:00Z");
    let late_id = late.id;
    store.reserve(late).await.unwrap();
    store.attach_task(late_id, "ta-late").await.unwrap();
    let rest = walk(store, next.expect("a full page is not the end"), 1).await;
    assert_eq!(ids(&rest), ["ta-late"]);
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

pub async fn the_reconciler_finds_what_nobody_watches(store: &dyn Ledger) {
    open_task(store, "design", "0.50", "ta-watched").await;
    open_task(store, "design", "0.50", "ta-forgotten").await;
    let settled = open_task(store, "design", "0.50", "ta-done").await;
    let _ = settled;
    store
        .settle("ta-done", settlement(FinalStatus::Failed, "0"))
        .await
        .unwrap();
    store
        .mark_observed("ta-watched", at("2026-11-23T10:09:00Z"))
        .await
        .unwrap();
    let due = store
        .unobserved_open_tasks(at("2026-11-23T10:08:00Z"), 10)
        .await
        .unwrap();
    let ids: Vec<&str> = due.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(ids, ["ta-forgotten"]);
    let later = store
        .unobserved_open_tasks(at("2026-11-23T11:00:00Z"), 10)
        .await
        .unwrap();
    let ids: Vec<&str> = later.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(
        ids,
        ["ta-forgotten", "ta-watched"],
        "least recently seen first"
    );
    assert_eq!(
        store
            .unobserved_open_tasks(at("2026-11-23T11:00:00Z"), 1)
            .await
            .unwrap()
            .len(),
        1
    );

    // A reservation the upstream never answered (the gateway stopped in between).
    let waiting = reservation("design", "0.25", None);
    let waiting_id = waiting.id;
    store.reserve(waiting).await.unwrap();
    assert_eq!(
        store
            .abandon_stale_reservations(at("2026-11-23T10:00:00Z"))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .abandon_stale_reservations(at("2026-11-23T10:30:00Z"))
            .await
            .unwrap(),
        1
    );
    let unknown = store
        .reservations(TaskState::UnknownOutcome, 10)
        .await
        .unwrap();
    assert_eq!(unknown.len(), 1);
    assert_eq!(unknown[0].id, waiting_id.0.to_string());
    assert_eq!(unknown[0].reserved, credits("0.25"));
    assert_eq!(
        store.standing("design", "2026-11").await.unwrap(),
        Standing {
            spent: credits("0.25"),
            reserved: credits("1.00")
        }
    );
    // An admin who knows the upstream did not charge it gives it back, once.
    store.release_unknown_outcome(waiting_id).await.unwrap();
    assert!(matches!(
        store.release_unknown_outcome(waiting_id).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.standing("design", "2026-11").await.unwrap(),
        Standing {
            spent: Credits::ZERO,
            reserved: credits("1.00")
        }
    );
}

pub async fn every_stale_reservation_is_abandoned_however_many(store: &dyn Ledger) {
    // More than two of the Redis engine's batches, the last one short.
    let stale = 2 * crate::ledger::redis::ABANDON_BATCH + 10;
    for _ in 0..stale {
        store
            .reserve(reservation("design", "0.01", None))
            .await
            .unwrap();
    }
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
        stale as u64
    );
    let unknown = store
        .reservations(TaskState::UnknownOutcome, stale + 1)
        .await
        .unwrap();
    assert_eq!(unknown.len(), stale);
    let waiting = store.reservations(TaskState::Reserved, 10).await.unwrap();
    let waiting: Vec<&str> = waiting.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(waiting, [fresh_id.0.to_string()], "the fresh one waits on");
    assert_eq!(
        store.standing("design", "2026-11").await.unwrap(),
        Standing {
            spent: credits("0.01").checked_mul(stale as i64).unwrap(),
            reserved: credits("0.01")
        }
    );
    assert_eq!(
        store
            .abandon_stale_reservations(at("2026-11-23T10:30:00Z"))
            .await
            .unwrap(),
        0,
        "nothing twice"
    );
}

pub async fn usage_is_reported_per_day_team_and_model(store: &dyn Ledger) {
    open_task(store, "design", "0.50", "ta-1").await;
    open_task(store, "design", "0.50", "ta-2").await;
    open_task(store, "design", "0.50", "ta-3").await;
    open_task(store, "ads", "0.50", "ta-4").await;
    let refused = reservation("design", "0.50", None);
    store.reserve(refused.clone()).await.unwrap();
    store.release(refused.id).await.unwrap();
    let next_day = NewReservation {
        created_at: at("2026-11-24T00:00:00Z"),
        ..reservation("design", "0.50", None)
    };
    store.reserve(next_day.clone()).await.unwrap();
    store.attach_task(next_day.id, "ta-5").await.unwrap();
    store
        .settle("ta-1", settlement(FinalStatus::Success, "0.40000000"))
        .await
        .unwrap();
    store
        .settle("ta-2", settlement(FinalStatus::Failed, "0.000000"))
        .await
        .unwrap();

    let rows = store
        .usage(
            Some("design"),
            at("2026-11-23T00:00:00Z"),
            at("2026-11-24T00:00:00Z"),
        )
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![UsageRow {
            day: "2026-11-23".into(),
            team: "design".into(),
            model: "google/gempix2".into(),
            tasks: 3,
            succeeded: 1,
            failed: 1,
            unsettled: 1,
            credits: credits("0.40"),
        }]
    );
    let all = store
        .usage(None, at("2026-11-01T00:00:00Z"), at("2026-12-01T00:00:00Z"))
        .await
        .unwrap();
    let summary: Vec<(&str, &str, u64)> = all
        .iter()
        .map(|r| (r.day.as_str(), r.team.as_str(), r.tasks))
        .collect();
    assert_eq!(
        summary,
        [
            ("2026-11-23", "ads", 1),
            ("2026-11-23", "design", 3),
            ("2026-11-24", "design", 1)
        ]
    );
}

/// One step of a random ledger history; task numbers refer to reservations made so far.
#[derive(Debug, Clone)]
pub enum Op {
    Reserve { team: usize, cents: i64 },
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
            Op::Attach(k) | Op::Release(k) | Op::Unknown(k) if k < made.len() => {
                let (_, _, id, state) = made[k];
                let result = match op {
                    Op::Attach(_) => store
                        .attach_task(id, &format!("ta-{k}"))
                        .await
                        .map(|_| TaskState::Open),
                    Op::Release(_) => store.release(id).await.map(|_| TaskState::Released),
                    _ => store
                        .mark_unknown_outcome(id)
                        .await
                        .map(|_| TaskState::UnknownOutcome),
                };
                match (state, result) {
                    (TaskState::Reserved, Ok(next)) => made[k].3 = next,
                    (TaskState::Reserved, Err(e)) => {
                        panic!("a held reservation refused {op:?}: {e}")
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

pub async fn callback_tokens_lead_to_their_reservation(store: &dyn Ledger) {
    let mut pushed = reservation("design", "0.50", None);
    pushed.callback = Some(CallbackRoute {
        token_digest: "d1".into(),
        forward_to: Some("https://hooks.design.example/ketchup".into()),
    });
    let pushed_id = pushed.id;
    let mut silent = reservation("ads", "0.50", None);
    silent.callback = Some(CallbackRoute {
        token_digest: "d2".into(),
        forward_to: None,
    });
    store.reserve(pushed).await.unwrap();
    store.reserve(silent).await.unwrap();
    store
        .reserve(reservation("ads", "0.50", None))
        .await
        .unwrap();

    // Before the upstream answered, the token already names the team, not yet a task.
    let target = store.callback_target("d1").await.unwrap().expect("known");
    assert_eq!(
        target,
        CallbackTarget {
            reservation: pushed_id,
            task_id: None,
            team: "design".into(),
            forward_to: Some("https://hooks.design.example/ketchup".into()),
        }
    );
    store.attach_task(pushed_id, "ta-1").await.unwrap();
    let target = store.callback_target("d1").await.unwrap().unwrap();
    assert_eq!(target.task_id.as_deref(), Some("ta-1"));

    let silent = store.callback_target("d2").await.unwrap().unwrap();
    assert_eq!((silent.team.as_str(), silent.forward_to), ("ads", None));
    assert_eq!(store.callback_target("nope").await.unwrap(), None);
    assert_eq!(store.callback_target("").await.unwrap(), None);
}

pub fn delivery(id: &str, task_id: &str) -> NewDelivery {
    NewDelivery {
        id: id.into(),
        task_id: task_id.into(),
        team: "design".into(),
        url: "https://hooks.design.example/ketchup".into(),
        body: br#"{"task_id":"ta-1","consumed":"0.500000"}"#.to_vec(),
        created_at: at("2026-11-23T10:00:00Z"),
        deadline: at("2026-11-24T10:00:00Z"),
    }
}

/// Up to `total` deliveries, however many go to one team.
pub fn any(total: usize) -> ClaimLimits {
    ClaimLimits {
        total,
        per_team: total,
        busy: Default::default(),
    }
}

/// The ids of the deliveries in `state`, most recently changed first.
pub async fn ids_in(store: &dyn Ledger, state: DeliveryState) -> Vec<String> {
    let records = store.deliveries(state, 10).await.unwrap();
    records.into_iter().map(|d| d.id).collect()
}

/// What a claim at `now` leasing until `lease_until` returns, with no limit that matters.
pub async fn claim(store: &dyn Ledger, now: &str, lease_until: &str) -> Vec<Delivery> {
    store
        .claim_deliveries(at(now), at(lease_until), &any(10))
        .await
        .unwrap()
}

pub async fn deliveries_are_queued_once_and_leased(store: &dyn Ledger) {
    let now = at("2026-11-23T10:00:00Z");
    assert!(
        store
            .enqueue_delivery(delivery("msg_1", "ta-1"))
            .await
            .unwrap()
    );
    // The same task's callback arriving again queues nothing more.
    assert!(
        !store
            .enqueue_delivery(delivery("msg_1b", "ta-1"))
            .await
            .unwrap()
    );
    assert!(
        store
            .enqueue_delivery(delivery("msg_2", "ta-2"))
            .await
            .unwrap()
    );

    let lease = at("2026-11-23T10:00:30Z");
    let claimed = store.claim_deliveries(now, lease, &any(10)).await.unwrap();
    let mut ids: Vec<_> = claimed.iter().map(|d| d.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["msg_1", "msg_2"]);
    let first = claimed.iter().find(|d| d.id == "msg_1").unwrap();
    assert_eq!(first.body, delivery("msg_1", "ta-1").body, "byte for byte");
    assert_eq!(first.attempts, 1);
    assert_eq!(first.task_id, "ta-1");
    assert_eq!(first.deadline, at("2026-11-24T10:00:00Z"));

    // Leased: nobody else gets them until the lease ends.
    assert!(
        store
            .claim_deliveries(now, lease, &any(10))
            .await
            .unwrap()
            .is_empty()
    );
    store
        .finish_attempt(
            "msg_1",
            1,
            AttemptOutcome::Delivered,
            at("2026-11-23T10:00:01Z"),
        )
        .await
        .unwrap();
    // msg_2's replica died mid-attempt: after the lease it is claimed again, as a second attempt.
    let again = claim(store, "2026-11-23T10:00:31Z", "2026-11-23T10:01:00Z").await;
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].id.as_str(), again[0].attempts), ("msg_2", 2));

    let delivered = store
        .deliveries(DeliveryState::Delivered, 10)
        .await
        .unwrap();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].id, "msg_1");
    assert_eq!(delivered[0].state, "delivered");
    assert_eq!(delivered[0].attempts, 1);
    assert_eq!(delivered[0].updated_at, at("2026-11-23T10:00:01Z"));
    // A late report about a finished delivery changes nothing.
    store
        .finish_attempt("msg_1", 1, AttemptOutcome::Dead("late".into()), now)
        .await
        .unwrap();
    assert!(ids_in(store, DeliveryState::Dead).await.is_empty());
    let pending = store.deliveries(DeliveryState::Pending, 10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id, "msg_2");
}

pub async fn a_report_from_a_lease_that_ran_out_changes_nothing(store: &dyn Ledger) {
    store
        .enqueue_delivery(delivery("msg_1", "ta-1"))
        .await
        .unwrap();
    let first = claim(store, "2026-11-23T10:00:00Z", "2026-11-23T10:00:30Z").await;
    // The first claimer stalls past its lease; another claims the delivery again.
    let second = claim(store, "2026-11-23T10:00:31Z", "2026-11-23T10:01:00Z").await;
    assert_eq!((first[0].attempts, second[0].attempts), (1, 2));

    // The stalled one wakes and reports: neither its dead letter nor its retry time stands.
    let stale = first[0].attempts;
    let now = at("2026-11-23T10:00:32Z");
    let dead = AttemptOutcome::Dead("answered 410".into());
    store
        .finish_attempt("msg_1", stale, dead, now)
        .await
        .unwrap();
    let retry = AttemptOutcome::RetryAt(at("2026-11-23T10:00:33Z"), "answered 500".into());
    store
        .finish_attempt("msg_1", stale, retry, now)
        .await
        .unwrap();
    assert!(ids_in(store, DeliveryState::Dead).await.is_empty());
    let pending = store.deliveries(DeliveryState::Pending, 10).await.unwrap();
    assert_eq!(pending[0].last_error, None);
    assert!(
        claim(store, "2026-11-23T10:00:34Z", "2026-11-23T10:01:30Z")
            .await
            .is_empty(),
        "the second claim's lease still holds"
    );

    // The attempt under way reports, and that stands.
    store
        .finish_attempt(
            "msg_1",
            second[0].attempts,
            AttemptOutcome::Delivered,
            at("2026-11-23T10:00:40Z"),
        )
        .await
        .unwrap();
    let delivered = store
        .deliveries(DeliveryState::Delivered, 10)
        .await
        .unwrap();
    assert_eq!(
        (delivered[0].id.as_str(), delivered[0].attempts),
        ("msg_1", 2)
    );
}

pub async fn a_team_past_its_share_waits_without_losing_attempts(store: &dyn Ledger) {
    let now = at("2026-11-23T10:00:00Z");
    let lease = at("2026-11-23T10:00:30Z");
    for (id, task, team, minute) in [
        ("msg_d1", "ta-1", "design", 0),
        ("msg_d2", "ta-2", "design", 1),
        ("msg_d3", "ta-3", "design", 2),
        ("msg_a1", "ta-4", "ads", 3),
    ] {
        let mut queued = delivery(id, task);
        queued.team = team.into();
        queued.created_at = now - chrono::Duration::minutes(10 - minute);
        assert!(store.enqueue_delivery(queued).await.unwrap());
    }
    // design already has one attempt in flight, and may have two: one more now, the oldest,
    // then ads' although it is newer than design's others.
    let limits = ClaimLimits {
        total: 10,
        per_team: 2,
        busy: [("design".to_owned(), 1)].into(),
    };
    let claimed = store.claim_deliveries(now, lease, &limits).await.unwrap();
    let mut ids: Vec<_> = claimed.iter().map(|d| d.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["msg_a1", "msg_d1"]);
    // The total caps the claim too, oldest first.
    let limits = ClaimLimits {
        total: 1,
        per_team: 2,
        busy: Default::default(),
    };
    let claimed = store.claim_deliveries(now, lease, &limits).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!((claimed[0].id.as_str(), claimed[0].attempts), ("msg_d2", 1));
    // Those left out were not attempted: their first claim is their first attempt.
    let rest = store.claim_deliveries(now, lease, &any(10)).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!((rest[0].id.as_str(), rest[0].attempts), ("msg_d3", 1));
}

/// Three claimed deliveries, ended three ways: `msg_delivered`, `msg_dead`, and `msg_retried`
/// (pending, to be tried again). Each engine's own tests then look at what it kept of them.
pub async fn deliveries_ended_three_ways(store: &dyn Ledger) {
    for (id, task) in [
        ("msg_delivered", "ta-1"),
        ("msg_dead", "ta-2"),
        ("msg_retried", "ta-3"),
    ] {
        assert!(store.enqueue_delivery(delivery(id, task)).await.unwrap());
    }
    let now = at("2026-11-23T10:00:00Z");
    let claimed = store
        .claim_deliveries(now, at("2026-11-23T10:00:30Z"), &any(10))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3);
    for (id, outcome) in [
        ("msg_delivered", AttemptOutcome::Delivered),
        ("msg_dead", AttemptOutcome::Dead("answered 410".into())),
        (
            "msg_retried",
            AttemptOutcome::RetryAt(at("2026-11-23T10:05:00Z"), "answered 500".into()),
        ),
    ] {
        store.finish_attempt(id, 1, outcome, now).await.unwrap();
    }
}

pub async fn finished_deliveries_are_deleted_pending_ones_never(store: &dyn Ledger) {
    for (id, task) in [
        ("msg_1", "ta-1"),
        ("msg_2", "ta-2"),
        ("msg_3", "ta-3"),
        ("msg_4", "ta-4"),
    ] {
        assert!(store.enqueue_delivery(delivery(id, task)).await.unwrap());
    }
    let claimed = claim(store, "2026-11-23T10:00:00Z", "2026-11-23T10:00:30Z").await;
    assert_eq!(claimed.len(), 4);
    for (id, outcome, second) in [
        ("msg_1", AttemptOutcome::Delivered, 1),
        ("msg_2", AttemptOutcome::Dead("answered 410".into()), 2),
        (
            "msg_3",
            AttemptOutcome::RetryAt(at("2026-11-23T10:05:00Z"), "answered 500".into()),
            3,
        ),
        ("msg_4", AttemptOutcome::Delivered, 10),
    ] {
        let finished = at("2026-11-23T10:00:00Z") + chrono::Duration::seconds(second);
        store
            .finish_attempt(id, 1, outcome, finished)
            .await
            .unwrap();
    }

    // Ended before 10:00:05: the delivered msg_1 and the dead msg_2, not the pending msg_3
    // (its attempt failed at 10:00:03, but it is still to be delivered).
    let before = at("2026-11-23T10:00:05Z");
    assert_eq!(
        store.delete_finished_deliveries(before, 10).await.unwrap(),
        2
    );
    assert_eq!(
        store.delete_finished_deliveries(before, 10).await.unwrap(),
        0
    );
    assert_eq!(ids_in(store, DeliveryState::Delivered).await, ["msg_4"]);
    assert!(ids_in(store, DeliveryState::Dead).await.is_empty());
    assert_eq!(ids_in(store, DeliveryState::Pending).await, ["msg_3"]);

    // The limit bounds one call; the end of the range is exclusive.
    let later = at("2026-11-23T10:00:10Z");
    assert_eq!(
        store.delete_finished_deliveries(later, 10).await.unwrap(),
        0
    );
    let later = at("2026-11-23T11:00:00Z");
    assert_eq!(store.delete_finished_deliveries(later, 0).await.unwrap(), 0);
    assert_eq!(store.delete_finished_deliveries(later, 1).await.unwrap(), 1);
    assert!(ids_in(store, DeliveryState::Delivered).await.is_empty());
    assert_eq!(ids_in(store, DeliveryState::Pending).await, ["msg_3"]);

    // Nothing of a deleted delivery is left behind: its task can be queued again.
    assert!(
        store
            .enqueue_delivery(delivery("msg_1b", "ta-1"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .enqueue_delivery(delivery("msg_3b", "ta-3"))
            .await
            .unwrap(),
        "the pending delivery of ta-3 is kept"
    );
}

pub async fn failed_attempts_wait_then_die(store: &dyn Ledger) {
    let now = at("2026-11-23T10:00:00Z");
    store
        .enqueue_delivery(delivery("msg_1", "ta-1"))
        .await
        .unwrap();
    let claimed = store
        .claim_deliveries(now, at("2026-11-23T10:00:30Z"), &any(10))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    store
        .finish_attempt(
            "msg_1",
            1,
            AttemptOutcome::RetryAt(at("2026-11-23T10:05:00Z"), "answered 500".into()),
            at("2026-11-23T10:00:01Z"),
        )
        .await
        .unwrap();
    // Not due before its retry time, even though the lease has ended.
    assert!(
        claim(store, "2026-11-23T10:04:59Z", "2026-11-23T10:06:00Z")
            .await
            .is_empty()
    );
    let pending = store.deliveries(DeliveryState::Pending, 10).await.unwrap();
    assert_eq!(pending[0].last_error.as_deref(), Some("answered 500"));
    let retried = claim(store, "2026-11-23T10:05:00Z", "2026-11-23T10:06:00Z").await;
    assert_eq!(retried[0].attempts, 2);
    store
        .finish_attempt(
            "msg_1",
            2,
            AttemptOutcome::Dead("deadline passed".into()),
            at("2026-11-23T10:05:02Z"),
        )
        .await
        .unwrap();
    assert!(
        claim(store, "2026-11-25T00:00:00Z", "2026-11-25T00:01:00Z")
            .await
            .is_empty()
    );
    let dead = store.deliveries(DeliveryState::Dead, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].attempts, dead[0].last_error.as_deref()),
        (2, Some("deadline passed"))
    );
    assert!(
        store
            .deliveries(DeliveryState::Pending, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Runs the whole suite against one engine; `$make` is an async expression giving a fresh,
/// empty store each time it is evaluated.
macro_rules! conformance_suite {
    ($engine:ident, $make:expr) => {
        mod $engine {
            use super::*;
            use std::sync::Arc;

            #[tokio::test]
            async fn ownership_is_recorded_and_read_back() {
                let store = $make;
                super::ownership_is_recorded_and_read_back(&*store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn the_last_credits_go_to_one_reservation_only() {
                let store: Arc<dyn Ledger> = $make;
                super::the_last_credits_go_to_one_reservation_only(store).await;
            }

            #[tokio::test]
            async fn release_gives_back_and_unknown_outcome_spends() {
                let store = $make;
                super::release_gives_back_and_unknown_outcome_spends(&*store).await;
            }

            #[tokio::test]
            async fn in_flight_is_counted_from_unsettled_tasks() {
                let store = $make;
                super::in_flight_is_counted_from_unsettled_tasks(&*store).await;
            }

            #[tokio::test]
            async fn tasks_are_walked_in_the_order_they_were_recorded() {
                let store = $make;
                super::tasks_are_walked_in_the_order_they_were_recorded(&*store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn settlement_replaces_the_reservation_once() {
                let store: Arc<dyn Ledger> = $make;
                super::settlement_replaces_the_reservation_once(store).await;
            }

            #[tokio::test]
            async fn expiry_charges_the_reservation() {
                let store = $make;
                super::expiry_charges_the_reservation(&*store).await;
            }

            #[tokio::test]
            async fn the_reconciler_finds_what_nobody_watches() {
                let store = $make;
                super::the_reconciler_finds_what_nobody_watches(&*store).await;
            }

            #[tokio::test]
            async fn every_stale_reservation_is_abandoned_however_many() {
                let store = $make;
                super::every_stale_reservation_is_abandoned_however_many(&*store).await;
            }

            #[tokio::test]
            async fn usage_is_reported_per_day_team_and_model() {
                let store = $make;
                super::usage_is_reported_per_day_team_and_model(&*store).await;
            }

            proptest::proptest! {
                #![proptest_config(proptest::test_runner::Config::with_cases(24))]
                #[test]
                fn invariants_hold_across_random_histories(ops in super::operations()) {
                    let runtime = tokio::runtime::Runtime::new().unwrap();
                    runtime.block_on(async {
                        let store: Arc<dyn Ledger> = $make;
                        super::invariants_hold(&*store, ops).await;
                    });
                }
            }

            #[tokio::test]
            async fn periods_are_separate() {
                let store = $make;
                super::periods_are_separate(&*store).await;
            }

            #[tokio::test]
            async fn callback_tokens_lead_to_their_reservation() {
                let store = $make;
                super::callback_tokens_lead_to_their_reservation(&*store).await;
            }

            #[tokio::test]
            async fn deliveries_are_queued_once_and_leased() {
                let store = $make;
                super::deliveries_are_queued_once_and_leased(&*store).await;
            }

            #[tokio::test]
            async fn a_report_from_a_lease_that_ran_out_changes_nothing() {
                let store = $make;
                super::a_report_from_a_lease_that_ran_out_changes_nothing(&*store).await;
            }

            #[tokio::test]
            async fn a_team_past_its_share_waits_without_losing_attempts() {
                let store = $make;
                super::a_team_past_its_share_waits_without_losing_attempts(&*store).await;
            }

            #[tokio::test]
            async fn finished_deliveries_are_deleted_pending_ones_never() {
                let store = $make;
                super::finished_deliveries_are_deleted_pending_ones_never(&*store).await;
            }

            #[tokio::test]
            async fn failed_attempts_wait_then_die() {
                let store = $make;
                super::failed_attempts_wait_then_die(&*store).await;
            }
        }
    };
}

conformance_suite!(sqlite, {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::ledger::sqlite::SqliteStore::open(&dir.path().join("ledger.db")).unwrap();
    // The directory must outlive the store; the test process cleans /tmp-based dirs on exit.
    std::mem::forget(dir);
    std::sync::Arc::new(store) as std::sync::Arc<dyn Ledger>
});

conformance_suite!(redis, {
    // Returns early, skipping the test, when no Redis can be found (see `ketchup_test_redis`).
    let Some(store) = crate::ledger::redis::test_store().await else {
        return;
    };
    std::sync::Arc::new(store) as std::sync::Arc<dyn Ledger>
});
