//! Settled costs: what a task's reservation recorded comes back when it settles, and the records
//! per day, model and value add up exactly and leave the window.

use super::*;
use crate::calibration::{CostKey, CostSample, bucket, merge_days};

fn sample(model: &str, value: Option<&str>, each: &str, over: bool, when: &str) -> CostSample {
    CostSample {
        model: model.into(),
        value: value.map(str::to_owned),
        each: credits(each),
        over,
        at: at(when),
    }
}

fn day(text: &str) -> chrono::NaiveDate {
    text.parse().expect("test day")
}

pub async fn a_settled_task_returns_the_cost_key_its_reservation_recorded(store: &dyn Ledger) {
    let r = NewReservation {
        cost: Some(CostKey {
            value: Some("15".into()),
            count: 2,
        }),
        ..reservation("design", "3.00", None)
    };
    let id = r.id;
    store.reserve(r).await.unwrap();
    store.attach_task(id, "ta-cost", None).await.unwrap();
    let SettleOutcome::Settled(settled) = store
        .settle("ta-cost", settlement(FinalStatus::Success, "3.20"))
        .await
        .unwrap()
    else {
        panic!("not settled");
    };
    assert_eq!(
        settled.cost,
        Some(CostKey {
            value: Some("15".into()),
            count: 2
        })
    );
    // A flat one, and one recorded without a key (as text requests are).
    open_task(store, "design", "0.50", "ta-flat").await;
    let SettleOutcome::Settled(flat) = store
        .settle("ta-flat", settlement(FinalStatus::Success, "0.40"))
        .await
        .unwrap()
    else {
        panic!("not settled");
    };
    assert_eq!(
        flat.cost,
        Some(CostKey {
            value: None,
            count: 1
        })
    );
    let r = NewReservation {
        cost: None,
        ..reservation("design", "0.50", None)
    };
    let id = r.id;
    store.reserve(r).await.unwrap();
    store.attach_task(id, "ta-none", None).await.unwrap();
    let SettleOutcome::Settled(none) = store
        .expire("ta-none", at("2026-11-23T11:00:00Z"))
        .await
        .unwrap()
    else {
        panic!("not expired");
    };
    assert_eq!(none.cost, None);
}

pub async fn costs_add_up_per_day_model_and_value(store: &dyn Ledger) {
    let samples = [
        sample("sora-2", Some("10"), "1.00", false, "2026-11-20T10:00:00Z"),
        sample("sora-2", Some("10"), "0.90", false, "2026-11-20T11:00:00Z"),
        sample("sora-2", Some("10"), "1.10", true, "2026-11-21T09:00:00Z"),
        sample("sora-2", Some("15"), "1.50", false, "2026-11-21T09:00:00Z"),
        sample("sora-2", None, "0.12345678", false, "2026-11-21T09:00:00Z"),
        sample(
            "google/gempix2",
            None,
            "0.50",
            false,
            "2026-11-21T23:59:59Z",
        ),
    ];
    for s in &samples {
        store.record_cost(s).await.unwrap();
    }
    let records = store
        .settled_costs(day("2026-11-01"), day("2026-11-30"))
        .await
        .unwrap();
    assert_eq!(
        records.len(),
        5,
        "one per day, model and value: {records:?}"
    );
    let merged = merge_days(records);
    let ten = &merged[&("sora-2".to_owned(), Some("10".to_owned()))];
    assert_eq!((ten.settled, ten.over, ten.max), (3, 1, credits("1.10")));
    assert_eq!(
        ten.buckets
            .iter()
            .map(|(b, n)| (b.to_string(), *n))
            .collect::<Vec<_>>(),
        [("0.90".into(), 1), ("1.00".into(), 1), ("1.10".into(), 1)]
    );
    let flat = &merged[&("sora-2".to_owned(), None)];
    assert_eq!(flat.max, credits("0.12345678"));
    assert_eq!(
        flat.buckets.keys().copied().collect::<Vec<_>>(),
        [bucket(credits("0.12345678"))]
    );
    assert_eq!(merged.len(), 4);
    // Only the days asked for.
    let one_day = store
        .settled_costs(day("2026-11-20"), day("2026-11-20"))
        .await
        .unwrap();
    assert_eq!(one_day.len(), 1);
    assert_eq!(one_day[0].1.settled, 2);
}

pub async fn a_day_the_window_left_behind_is_gone(store: &dyn Ledger) {
    store
        .record_cost(&sample("m", None, "1.00", false, "2026-10-01T10:00:00Z"))
        .await
        .unwrap();
    // Thirty days on, the first of October is outside the window of what is written now.
    store
        .record_cost(&sample("m", None, "2.00", false, "2026-10-31T10:00:00Z"))
        .await
        .unwrap();
    let records = store
        .settled_costs(day("2026-10-01"), day("2026-10-31"))
        .await
        .unwrap();
    let days: Vec<Credits> = records.iter().map(|(_, h)| h.max).collect();
    // Deleted as the window moved on: asked for, it is not there.
    assert_eq!(days, [credits("2.00")]);
}

/// The calibration tests, for `conformance_suite!` to run against one engine.
macro_rules! calibration_suite {
    ($make:expr) => {
        use $crate::ledger::conformance::calibration as suite;

        #[tokio::test]
        async fn a_settled_task_returns_the_cost_key_its_reservation_recorded() {
            let store = $make;
            suite::a_settled_task_returns_the_cost_key_its_reservation_recorded(&*store).await;
        }

        #[tokio::test]
        async fn costs_add_up_per_day_model_and_value() {
            let store = $make;
            suite::costs_add_up_per_day_model_and_value(&*store).await;
        }

        #[tokio::test]
        async fn a_day_the_window_left_behind_is_gone() {
            let store = $make;
            suite::a_day_the_window_left_behind_is_gone(&*store).await;
        }
    };
}
