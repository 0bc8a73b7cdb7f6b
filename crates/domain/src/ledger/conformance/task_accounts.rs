//! Task accounts: the account that started a task recorded once and read back.

use super::*;

pub async fn the_account_that_started_a_task_is_kept_once(store: &dyn Ledger) {
    open_task(store, "design", "0.50", "ta-1").await;
    // A task recorded without an account (as before accounts were recorded) has none.
    assert_eq!(store.task_account("ta-1").await.unwrap(), None);
    store.record_task_account("ta-1", "spare").await.unwrap();
    assert_eq!(
        store.task_account("ta-1").await.unwrap().as_deref(),
        Some("spare")
    );
    // A task is started once: a second record (a retried write) changes nothing.
    store.record_task_account("ta-1", "main").await.unwrap();
    assert_eq!(
        store.task_account("ta-1").await.unwrap().as_deref(),
        Some("spare")
    );
    store.record_task_account("ta-2", "main").await.unwrap();
    assert_eq!(
        store.task_account("ta-2").await.unwrap().as_deref(),
        Some("main")
    );
    assert_eq!(store.task_account("ta-unknown").await.unwrap(), None);
}

macro_rules! task_accounts_suite {
    ($make:expr) => {
        use $crate::ledger::conformance::task_accounts as suite;

        #[tokio::test]
        async fn the_account_that_started_a_task_is_kept_once() {
            let store = $make;
            suite::the_account_that_started_a_task_is_kept_once(&*store).await;
        }
    };
}
