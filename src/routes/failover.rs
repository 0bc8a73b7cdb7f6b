//! Sending a request that starts paid work (a generation, a text answer) with the upstream
//! accounts in rotation, and recording which account started a task.
//!
//! A request moves to the next account only when the upstream answered that it refuses the
//! token (401 or 403): then nothing was started or charged. A timeout, a broken connection or a
//! 5xx may have started the work, so it is never sent again with another account: that could
//! start and charge it twice.

use std::future::Future;

use http::StatusCode;

use crate::accounts::{AccountId, refuses_token};
use crate::state::AppState;
use crate::upstream::{StreamingResponse, UpstreamError, UpstreamResponse};
use ketchup_domain::ledger::{ReservationId, StoreError, StoredAnswer};

/// An answer whose status tells whether the upstream refused the token.
pub(super) trait Answered {
    fn status(&self) -> StatusCode;
}

impl Answered for UpstreamResponse {
    fn status(&self) -> StatusCode {
        self.status
    }
}

impl Answered for StreamingResponse {
    fn status(&self) -> StatusCode {
        self.status
    }
}

/// How sending with the accounts in rotation ended.
pub(super) enum Sent<T> {
    /// An answer other than a refusal of the token, from this account.
    Answered(AccountId, T),
    /// No usable answer from the account it went to; no other account was tried.
    Failed(UpstreamError),
    /// No account in rotation, or every one tried refused its token: nothing was started.
    NoAccount,
}

/// Sends with the next account in rotation, and again with the next one each time the upstream
/// refuses the token, which takes that account out of rotation. `what` names the call in logs.
pub(super) async fn send<T, F, Fut>(state: &AppState, what: &str, mut send: F) -> Sent<T>
where
    T: Answered,
    F: FnMut(AccountId) -> Fut,
    Fut: Future<Output = Result<T, UpstreamError>>,
{
    let mut tried = Vec::new();
    while let Some(account) = state.accounts.pick(&tried) {
        match send(account).await {
            Ok(answer) if refuses_token(answer.status()) => {
                state.accounts.refused(account, what, state.clock.now());
                tried.push(account);
            }
            Ok(answer) => return Sent::Answered(account, answer),
            Err(error) => return Sent::Failed(error),
        }
    }
    Sent::NoAccount
}

/// Records that `account` started `task_id`, then the task as the reservation's: an attached
/// task always has its account, so every replica, before and after a restart, reads it with
/// that account's token.
pub(super) async fn record_task(
    state: &AppState,
    id: ReservationId,
    task_id: &str,
    account: &str,
    answer: Option<&StoredAnswer>,
) -> Result<Vec<ReservationId>, StoreError> {
    state.ledger.record_task_account(task_id, account).await?;
    state.ledger.attach_task(id, task_id, answer).await
}
