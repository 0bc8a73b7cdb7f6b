//! Reports: usage per day, team, route family and model. The other reports (standing, tasks in
//! flight, reservations by state) are checked throughout the other parts, against what each step
//! there must have left.

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
    };
}
