//! Reports: usage per day, team, key, route family and model. The other reports (standing, tasks
//! in flight, reservations by state) are checked throughout the other parts, against what each
//! step there must have left.

use super::*;

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
    store.attach_task(next_day.id, "ta-5", None).await.unwrap();
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
            key: "main".into(),
            family: "image".into(),
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

pub async fn usage_keeps_route_families_apart(store: &dyn Ledger) {
    let task = |family: &str, model: &str| NewReservation {
        family: family.into(),
        model: model.into(),
        ..reservation("design", "1.50", None)
    };
    // One model under two families, and a family whose model sorts before the other family's.
    let tasks = [
        ("ta-image", task("image", "google/gempix2")),
        ("ta-video-1", task("video", "google/gempix2")),
        ("ta-video-2", task("video", "bytedance/seedance")),
        ("ta-video-3", task("video", "bytedance/seedance")),
    ];
    for (task_id, r) in tasks {
        let id = r.id;
        store.reserve(r).await.unwrap();
        store.attach_task(id, task_id, None).await.unwrap();
    }
    store
        .settle("ta-video-2", settlement(FinalStatus::Success, "1.20"))
        .await
        .unwrap();
    store
        .settle("ta-image", settlement(FinalStatus::Failed, "0"))
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
    let row = |family: &str, model: &str, tasks, succeeded, failed, unsettled, charged| UsageRow {
        day: "2026-11-23".into(),
        team: "design".into(),
        key: "main".into(),
        family: family.into(),
        model: model.into(),
        tasks,
        succeeded,
        failed,
        unsettled,
        credits: credits(charged),
    };
    // Ordered by family before model: the image row comes first though its model sorts last.
    assert_eq!(
        rows,
        vec![
            row("image", "google/gempix2", 1, 0, 1, 0, "0"),
            row("video", "bytedance/seedance", 2, 1, 0, 1, "1.20"),
            row("video", "google/gempix2", 1, 0, 0, 1, "0"),
        ]
    );
}

pub async fn usage_splits_a_team_between_its_keys(store: &dyn Ledger) {
    let by = |key: &str, amount: &str| NewReservation {
        key: key.into(),
        ..reservation("design", amount, None)
    };
    let tasks = [
        ("ta-ci-1", by("ci", "1.00")),
        ("ta-ci-2", by("ci", "1.00")),
        ("ta-alice", by("alice", "2.00")),
    ];
    for (task_id, r) in tasks {
        let id = r.id;
        store.reserve(r).await.unwrap();
        store.attach_task(id, task_id, None).await.unwrap();
    }
    // Settling and expiring a task both name the key that made it.
    let settled = store
        .settle("ta-ci-1", settlement(FinalStatus::Success, "0.30000001"))
        .await
        .unwrap();
    assert!(
        matches!(&settled, SettleOutcome::Settled(task) if task.key == "ci"),
        "{settled:?}"
    );
    let expired = store
        .expire("ta-alice", at("2026-11-24T10:00:00Z"))
        .await
        .unwrap();
    assert!(
        matches!(&expired, SettleOutcome::Settled(task) if task.key == "alice"),
        "{expired:?}"
    );
    // A text answer, settled without a task.
    let text = NewReservation {
        family: "text".into(),
        ..by("ci", "0.50")
    };
    let text_id = text.id;
    store.reserve(text).await.unwrap();
    let settled = store
        .settle_reservation(text_id, settlement(FinalStatus::Success, "0.00000007"))
        .await
        .unwrap();
    assert!(
        matches!(&settled, SettleOutcome::Settled(task) if task.key == "ci"),
        "{settled:?}"
    );

    let rows = store
        .usage(
            Some("design"),
            at("2026-11-23T00:00:00Z"),
            at("2026-11-24T00:00:00Z"),
        )
        .await
        .unwrap();
    let spend: Vec<(&str, &str, u64, Credits)> = rows
        .iter()
        .map(|r| (r.key.as_str(), r.family.as_str(), r.tasks, r.credits))
        .collect();
    assert_eq!(
        spend,
        [
            ("alice", "image", 1, credits("2.00")),
            ("ci", "image", 2, credits("0.30000001")),
            ("ci", "text", 1, credits("0.00000007")),
        ]
    );
}

/// The reports tests, for `conformance_suite!` to run against one engine.
macro_rules! reports_suite {
    ($make:expr) => {
        use $crate::ledger::conformance::reports as suite;

        #[tokio::test]
        async fn usage_is_reported_per_day_team_and_model() {
            let store = $make;
            suite::usage_is_reported_per_day_team_and_model(&*store).await;
        }

        #[tokio::test]
        async fn usage_keeps_route_families_apart() {
            let store = $make;
            suite::usage_keeps_route_families_apart(&*store).await;
        }

        #[tokio::test]
        async fn usage_splits_a_team_between_its_keys() {
            let store = $make;
            suite::usage_splits_a_team_between_its_keys(&*store).await;
        }
    };
}
