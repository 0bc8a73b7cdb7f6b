//! Budget notifications: a threshold claimed once per team and period, with its delivery queued
//! in the same step, and forgotten once expired.

use super::outbox::{claim, delivery, ids_in};
use super::*;

/// The notice that design reached `percent` in `period`, queued as delivery `id` at 10:00 on
/// 2026-11-23, forgotten from `expires_at` on.
pub fn notice(id: &str, period: &str, percent: u8, expires_at: Option<&str>) -> BudgetNotice {
    let mut queued = delivery(id, &format!("budget:design:{period}:{percent}"));
    queued.body = format!(r#"{{"type":"budget.threshold","threshold":{percent}}}"#)
        .into_bytes()
        .into();
    BudgetNotice {
        team: "design".into(),
        period: period.into(),
        percent,
        expires_at: expires_at.map(at),
        delivery: queued,
    }
}

pub async fn a_threshold_is_claimed_once_per_team_and_period(store: &dyn Ledger) {
    let first = notice("msg_50", "2026-11", 50, Some("2026-12-02T00:00:00Z"));
    assert!(store.claim_budget_notice(first.clone()).await.unwrap());
    // Seen again, by this replica or another: nothing more is queued.
    let again = notice("msg_50b", "2026-11", 50, Some("2026-12-02T00:00:00Z"));
    assert!(!store.claim_budget_notice(again).await.unwrap());
    // Another threshold, period or team is a claim of its own.
    assert!(
        store
            .claim_budget_notice(notice(
                "msg_80",
                "2026-11",
                80,
                Some("2026-12-02T00:00:00Z")
            ))
            .await
            .unwrap()
    );
    assert!(
        store
            .claim_budget_notice(notice(
                "msg_dec",
                "2026-12",
                50,
                Some("2027-01-02T00:00:00Z")
            ))
            .await
            .unwrap()
    );
    let mut ads = notice("msg_ads", "2026-11", 50, Some("2026-12-02T00:00:00Z"));
    ads.team = "ads".into();
    ads.delivery.team = "ads".into();
    ads.delivery.task_id = "budget:ads:2026-11:50".into();
    assert!(store.claim_budget_notice(ads).await.unwrap());

    let mut pending = ids_in(store, DeliveryState::Pending).await;
    pending.sort();
    assert_eq!(pending, ["msg_50", "msg_80", "msg_ads", "msg_dec"]);
    // Each delivery goes out as any other, its payload byte for byte.
    let claimed = claim(store, "2026-11-23T10:00:00Z", "2026-11-23T10:00:30Z").await;
    let fifty = claimed.iter().find(|d| d.id == "msg_50").unwrap();
    assert_eq!(fifty.body, first.delivery.body);
    assert_eq!(fifty.task_id, "budget:design:2026-11:50");
    assert_eq!(fifty.url, first.delivery.url);
}

pub async fn of_concurrent_claims_of_one_threshold_one_queues(store: std::sync::Arc<dyn Ledger>) {
    let claims = (0..16).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let mine = notice(&format!("msg_{i}"), "2026-11", 80, None);
            store.claim_budget_notice(mine).await.unwrap()
        })
    });
    let mut won = 0;
    for claim in claims {
        won += usize::from(claim.await.unwrap());
    }
    assert_eq!(won, 1);
    assert_eq!(ids_in(&*store, DeliveryState::Pending).await.len(), 1);
}

pub async fn an_expired_claim_is_forgotten_a_lifetime_one_kept(store: &dyn Ledger) {
    // Forgotten 200 ms after it was made (Redis counts that on its own clock).
    let short = notice("msg_short", "2026-11", 50, Some("2026-11-23T10:00:00.200Z"));
    assert!(store.claim_budget_notice(short).await.unwrap());
    let kept = notice("msg_kept", "lifetime", 50, None);
    assert!(store.claim_budget_notice(kept).await.unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;

    // A claim of the team made after the expiry forgets it (SQLite does so then).
    let mut later = notice("msg_later", "2026-12", 50, None);
    later.delivery.created_at = at("2026-11-23T10:00:01Z");
    assert!(store.claim_budget_notice(later).await.unwrap());
    let mut short_again = notice("msg_short_again", "2026-11", 50, None);
    short_again.delivery.task_id = "budget:design:2026-11:50:again".into();
    short_again.delivery.created_at = at("2026-11-23T10:00:02Z");
    assert!(store.claim_budget_notice(short_again).await.unwrap());

    let mut kept_again = notice("msg_kept_again", "lifetime", 50, None);
    kept_again.delivery.task_id = "budget:design:lifetime:50:again".into();
    kept_again.delivery.created_at = at("2027-11-23T10:00:00Z");
    assert!(!store.claim_budget_notice(kept_again).await.unwrap());
}

macro_rules! notices_suite {
    ($make:expr) => {
        use $crate::ledger::conformance::notices as suite;

        #[tokio::test]
        async fn a_threshold_is_claimed_once_per_team_and_period() {
            let store = $make;
            suite::a_threshold_is_claimed_once_per_team_and_period(&*store).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn of_concurrent_claims_of_one_threshold_one_queues() {
            let store = $make;
            suite::of_concurrent_claims_of_one_threshold_one_queues(store).await;
        }

        #[tokio::test]
        async fn an_expired_claim_is_forgotten_a_lifetime_one_kept() {
            let store = $make;
            suite::an_expired_claim_is_forgotten_a_lifetime_one_kept(&*store).await;
        }
    };
}
