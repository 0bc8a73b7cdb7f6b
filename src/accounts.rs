//! The upstream account as the balance check last saw it: its credit, when it was read, and
//! whether the upstream still takes the account's token. Admins read it at `GET /admin/upstream`;
//! no team ever sees it.

use std::sync::RwLock;

use chrono::{DateTime, Utc};
use serde::Serialize;

use ketchup_domain::credits::Credits;

/// The name of the account `[upstream] token_env` / `token_file` configures.
pub const DEFAULT_ACCOUNT: &str = "default";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountState {
    /// Not read yet (or the check is off).
    Unchecked,
    /// The last read answered with a balance.
    Ok,
    /// The upstream refused the account's token (401 or 403): it is revoked or wrong.
    Unauthorized,
    /// The last read got no usable answer; the credit shown is the one read before.
    Failed,
}

/// One account, as `GET /admin/upstream` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct AccountView {
    pub name: String,
    pub state: AccountState,
    /// The credit at the last successful read.
    pub credit: Option<Credits>,
    /// When the credit was read.
    pub credit_at: Option<DateTime<Utc>>,
    /// When the account was last checked, whatever the outcome.
    pub checked_at: Option<DateTime<Utc>>,
    /// Why the last check failed, without the token or anything the upstream echoed.
    pub last_error: Option<String>,
}

/// What one balance check found.
#[derive(Debug, Clone)]
pub enum Check {
    Credit(Credits),
    Unauthorized,
    Failed(String),
}

pub struct Accounts {
    views: RwLock<Vec<AccountView>>,
}

impl Accounts {
    pub fn new(names: &[&str]) -> Self {
        let views = names
            .iter()
            .map(|name| AccountView {
                name: (*name).to_owned(),
                state: AccountState::Unchecked,
                credit: None,
                credit_at: None,
                checked_at: None,
                last_error: None,
            })
            .collect();
        Accounts {
            views: RwLock::new(views),
        }
    }

    pub fn views(&self) -> Vec<AccountView> {
        self.views
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Records a check of account `name` made at `at`; returns the credit it lost since the
    /// previous read (zero after a top-up, and on the first read).
    pub fn record(&self, name: &str, check: Check, at: DateTime<Utc>) -> Credits {
        let mut views = self
            .views
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(view) = views.iter_mut().find(|view| view.name == name) else {
            return Credits::ZERO;
        };
        view.checked_at = Some(at);
        match check {
            Check::Credit(credit) => {
                let lost = view
                    .credit
                    .map_or(Credits::ZERO, |before| before.saturating_sub(credit))
                    .max(Credits::ZERO);
                view.state = AccountState::Ok;
                view.credit = Some(credit);
                view.credit_at = Some(at);
                view.last_error = None;
                lost
            }
            Check::Unauthorized => {
                view.state = AccountState::Unauthorized;
                view.last_error = Some("the upstream refused the account's token".into());
                Credits::ZERO
            }
            Check::Failed(error) => {
                view.state = AccountState::Failed;
                view.last_error = Some(error);
                Credits::ZERO
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_counts_what_the_account_lost_and_never_a_top_up() {
        let accounts = Accounts::new(&[DEFAULT_ACCOUNT]);
        let at = Utc::now();
        let credit = |text: &str| Check::Credit(text.parse().unwrap());
        assert_eq!(
            accounts.record("default", credit("100.50"), at),
            Credits::ZERO
        );
        assert_eq!(
            accounts.record("default", credit("99.75"), at),
            "0.75".parse().unwrap()
        );
        assert_eq!(
            accounts.record("default", Check::Failed("timeout".into()), at),
            Credits::ZERO
        );
        let view = &accounts.views()[0];
        assert_eq!(view.state, AccountState::Failed);
        assert_eq!(view.credit, Some("99.75".parse().unwrap()));
        // A top-up is not spending.
        assert_eq!(accounts.record("default", credit("500"), at), Credits::ZERO);
        assert_eq!(
            accounts.record("default", Check::Unauthorized, at),
            Credits::ZERO
        );
        assert_eq!(accounts.views()[0].state, AccountState::Unauthorized);
    }
}
