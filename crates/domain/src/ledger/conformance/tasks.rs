//! Tasks: ownership recorded and read back, callback tokens, walks in the order tasks were
//! recorded, and the reconciler's view of what nobody watches.

use super::*;

pub async fn ownership_is_recorded_and_read_back(store: &dyn Ledger) {
    let r = reservation("design", "0.50", None);
    let id = r.id;
    assert!(matches!(
        store.reserve(r).await.unwrap(),
        ReserveOutcome::Reserved(_)
    ));
    assert_eq!(store.task("ta-1").await.unwrap(), None);
    store.attach_task(id, "ta-1", None).await.unwrap();
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
        store.attach_task(other_id, "ta-1", None).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.task("ta-1").await.unwrap().unwrap().team, "design");
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
        store
            .attach_task(id, &format!("ta-w{n}"), None)
            .await
            .unwrap();
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
    store.attach_task(late_id, "ta-late", None).await.unwrap();
    let rest = walk(store, next.expect("a full page is not the end"), 1).await;
    assert_eq!(ids(&rest), ["ta-late"]);
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

    // A reservation sent to the upstream, which never answered (the gateway stopped in between).
    let waiting = reservation("design", "0.25", None);
    let waiting_id = waiting.id;
    store.reserve(waiting).await.unwrap();
    store
        .mark_dispatched(waiting_id, at("2026-11-23T10:00:00Z"))
        .await
        .unwrap();
    assert_eq!(
        store
            .abandon_stale_reservations(at("2026-11-23T10:00:00Z"))
            .await
            .unwrap(),
        Abandoned::default()
    );
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
    store.attach_task(pushed_id, "ta-1", None).await.unwrap();
    let target = store.callback_target("d1").await.unwrap().unwrap();
    assert_eq!(target.task_id.as_deref(), Some("ta-1"));

    let silent = store.callback_target("d2").await.unwrap().unwrap();
    assert_eq!((silent.team.as_str(), silent.forward_to), ("ads", None));
    assert_eq!(store.callback_target("nope").await.unwrap(), None);
    assert_eq!(store.callback_target("").await.unwrap(), None);
}

/// The tasks tests, for `conformance_suite!` to run against one engine.
macro_rules! tasks_suite {
    ($make:expr) => {
        use $crate::ledger::conformance::tasks as suite;

        #[tokio::test]
        async fn ownership_is_recorded_and_read_back() {
            let store = $make;
            suite::ownership_is_recorded_and_read_back(&*store).await;
        }

        #[tokio::test]
        async fn callback_tokens_lead_to_their_reservation() {
            let store = $make;
            suite::callback_tokens_lead_to_their_reservation(&*store).await;
        }

        #[tokio::test]
        async fn tasks_are_walked_in_the_order_they_were_recorded() {
            let store = $make;
            suite::tasks_are_walked_in_the_order_they_were_recorded(&*store).await;
        }

        #[tokio::test]
        async fn the_reconciler_finds_what_nobody_watches() {
            let store = $make;
            suite::the_reconciler_finds_what_nobody_watches(&*store).await;
        }
    };
}
