//! The webhook outbox: deliveries queued once, leased to one attempt at a time, retried, ended,
//! and deleted once ended.

use super::*;

pub fn delivery(id: &str, task_id: &str) -> NewDelivery {
    NewDelivery {
        id: id.into(),
        task_id: task_id.into(),
        team: "design".into(),
        url: "https://hooks.design.example/ketchup".into(),
        body: br#"{"task_id":"ta-1","consumed":"0.500000"}"#[..].into(),
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

/// The outbox tests, for `conformance_suite!` to run against one engine.
macro_rules! outbox_suite {
    ($make:expr) => {
        use $crate::ledger::conformance::outbox as suite;

        #[tokio::test]
        async fn deliveries_are_queued_once_and_leased() {
            let store = $make;
            suite::deliveries_are_queued_once_and_leased(&*store).await;
        }

        #[tokio::test]
        async fn a_report_from_a_lease_that_ran_out_changes_nothing() {
            let store = $make;
            suite::a_report_from_a_lease_that_ran_out_changes_nothing(&*store).await;
        }

        #[tokio::test]
        async fn a_team_past_its_share_waits_without_losing_attempts() {
            let store = $make;
            suite::a_team_past_its_share_waits_without_losing_attempts(&*store).await;
        }

        #[tokio::test]
        async fn finished_deliveries_are_deleted_pending_ones_never() {
            let store = $make;
            suite::finished_deliveries_are_deleted_pending_ones_never(&*store).await;
        }

        #[tokio::test]
        async fn failed_attempts_wait_then_die() {
            let store = $make;
            suite::failed_attempts_wait_then_die(&*store).await;
        }
    };
}
