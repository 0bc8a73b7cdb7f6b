//! The audit trail of admin actions: recorded durably, listed newest first in pages, filtered,
//! and deleted oldest first once old enough.

use super::*;

/// An action by `admin` at `when`, answered `status`.
pub fn admin_action(admin: &str, when: &str, status: u16) -> NewAdminAction {
    NewAdminAction {
        at: at(when),
        admin: admin.into(),
        action: "POST /admin/reservations/{id}/release".into(),
        target: format!("target-{when}"),
        status,
        request_id: format!("req-{when}"),
    }
}

fn query(limit: usize) -> AuditQuery {
    AuditQuery {
        before: None,
        since: None,
        admin: None,
        limit,
    }
}

/// Records five actions a minute apart, 10:00 to 10:04, alternately by alice and bob; returns
/// their ids in order.
async fn five_actions(store: &dyn Ledger) -> Vec<u64> {
    let mut ids = Vec::new();
    for minute in 0..5 {
        let admin = if minute % 2 == 0 { "alice" } else { "bob" };
        let when = format!("2026-11-23T10:0{minute}:00Z");
        let status = if minute == 3 { 409 } else { 200 };
        ids.push(
            store
                .record_admin_action(admin_action(admin, &when, status))
                .await
                .unwrap(),
        );
    }
    ids
}

pub async fn actions_are_listed_newest_first_in_pages(store: &dyn Ledger) {
    assert_eq!(store.admin_actions(query(10)).await.unwrap(), []);
    let ids = five_actions(store).await;
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");

    let all = store.admin_actions(query(10)).await.unwrap();
    let listed: Vec<u64> = all.iter().map(|a| a.id).collect();
    assert_eq!(listed, ids.iter().rev().copied().collect::<Vec<_>>());
    assert_eq!(
        all[1],
        AdminActionRecord {
            id: ids[3],
            at: at("2026-11-23T10:03:00Z"),
            admin: "bob".into(),
            action: "POST /admin/reservations/{id}/release".into(),
            target: "target-2026-11-23T10:03:00Z".into(),
            status: 409,
            request_id: "req-2026-11-23T10:03:00Z".into(),
        }
    );

    // Page by page, each starting before the last one listed.
    let first = store.admin_actions(query(2)).await.unwrap();
    assert_eq!(
        first.iter().map(|a| a.id).collect::<Vec<_>>(),
        [ids[4], ids[3]]
    );
    let next = store
        .admin_actions(AuditQuery {
            before: Some(ids[3]),
            ..query(2)
        })
        .await
        .unwrap();
    assert_eq!(
        next.iter().map(|a| a.id).collect::<Vec<_>>(),
        [ids[2], ids[1]]
    );
    let last = store
        .admin_actions(AuditQuery {
            before: Some(ids[1]),
            ..query(2)
        })
        .await
        .unwrap();
    assert_eq!(last.iter().map(|a| a.id).collect::<Vec<_>>(), [ids[0]]);
}

pub async fn listings_filter_by_time_and_admin(store: &dyn Ledger) {
    let ids = five_actions(store).await;
    let since = store
        .admin_actions(AuditQuery {
            since: Some(at("2026-11-23T10:02:00Z")),
            ..query(10)
        })
        .await
        .unwrap();
    assert_eq!(
        since.iter().map(|a| a.id).collect::<Vec<_>>(),
        [ids[4], ids[3], ids[2]]
    );
    let alice = store
        .admin_actions(AuditQuery {
            admin: Some("alice".into()),
            ..query(2)
        })
        .await
        .unwrap();
    assert_eq!(
        alice.iter().map(|a| a.id).collect::<Vec<_>>(),
        [ids[4], ids[2]]
    );
    let both = store
        .admin_actions(AuditQuery {
            admin: Some("bob".into()),
            since: Some(at("2026-11-23T10:02:00Z")),
            before: Some(ids[4]),
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(both.iter().map(|a| a.id).collect::<Vec<_>>(), [ids[3]]);
}

pub async fn old_actions_are_deleted_oldest_first_and_ids_never_reused(store: &dyn Ledger) {
    let ids = five_actions(store).await;
    let before = at("2026-11-23T10:03:00Z");
    assert_eq!(store.delete_admin_actions(before, 2).await.unwrap(), 2);
    assert_eq!(store.delete_admin_actions(before, 2).await.unwrap(), 1);
    assert_eq!(store.delete_admin_actions(before, 2).await.unwrap(), 0);
    let left = store.admin_actions(query(10)).await.unwrap();
    assert_eq!(
        left.iter().map(|a| a.id).collect::<Vec<_>>(),
        [ids[4], ids[3]]
    );
    // Emptied, the trail still numbers on: a cursor from before the deletion stays true.
    assert_eq!(
        store
            .delete_admin_actions(at("2026-11-24T00:00:00Z"), 10)
            .await
            .unwrap(),
        2
    );
    let next = store
        .record_admin_action(admin_action("alice", "2026-11-23T11:00:00Z", 200))
        .await
        .unwrap();
    assert!(next > ids[4], "{next} after {ids:?}");
}

/// The audit tests, for `conformance_suite!` to run against one engine.
macro_rules! audit_suite {
    ($make:expr) => {
        use $crate::ledger::conformance::audit as suite;

        #[tokio::test]
        async fn actions_are_listed_newest_first_in_pages() {
            let store = $make;
            suite::actions_are_listed_newest_first_in_pages(&*store).await;
        }

        #[tokio::test]
        async fn listings_filter_by_time_and_admin() {
            let store = $make;
            suite::listings_filter_by_time_and_admin(&*store).await;
        }

        #[tokio::test]
        async fn old_actions_are_deleted_oldest_first_and_ids_never_reused() {
            let store = $make;
            suite::old_actions_are_deleted_oldest_first_and_ids_never_reused(&*store).await;
        }
    };
}
