//! The upstream accounts: which take new generations (the rotation) and each as the balance
//! check last saw it (its credit, when, whether the upstream still takes its token). Admins read
//! it at `GET /admin/upstream`; no team ever sees it.
//!
//! A new generation goes to the next account in rotation, round robin. Not to the one with the
//! most credit left: credit is known only as of the last balance check, minutes old, so every
//! request (and every replica) until the next check would pick the same account, piling the
//! load and the spending onto one account while the others idle; round robin spreads both
//! evenly, and the balance floor takes an account out before it runs dry.
//!
//! An account leaves rotation when the upstream refuses its token (401 or 403 on any call) or
//! when the balance check finds its credit at or below `[upstream] balance_floor`; it returns
//! when a balance check reads its credit (so the upstream takes its token again) above the
//! floor. Leaving and returning are logged (by name, never the token) and counted. Each replica
//! keeps its own rotation, from what its own calls and checks see.

use std::sync::RwLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use http::StatusCode;
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec};
use serde::Serialize;

use crate::metrics::Metrics;
use ketchup_domain::config::DEFAULT_ACCOUNT;
use ketchup_domain::credits::Credits;

/// An account, by its place in `[upstream]`'s list of accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountId(pub usize);

/// Whether an answer is the upstream refusing the token it was sent with.
pub fn refuses_token(status: StatusCode) -> bool {
    matches!(status.as_u16(), 401 | 403)
}

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

/// Why an account takes no new generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutReason {
    /// The upstream refused its token, on a generation, a status read or a balance check.
    Unauthorized,
    /// Its credit at the last balance check was at or below `[upstream] balance_floor`.
    BelowFloor,
}

impl OutReason {
    const ALL: [OutReason; 2] = [OutReason::Unauthorized, OutReason::BelowFloor];

    pub fn as_str(self) -> &'static str {
        match self {
            OutReason::Unauthorized => "unauthorized",
            OutReason::BelowFloor => "below_floor",
        }
    }
}

/// One account, as `GET /admin/upstream` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct AccountView {
    pub name: String,
    pub state: AccountState,
    /// Whether new generations may go to it.
    pub in_rotation: bool,
    /// Why it is out of rotation.
    pub out_reason: Option<OutReason>,
    /// Since when it is out of rotation.
    pub out_since: Option<DateTime<Utc>>,
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

/// The metrics the rotation keeps.
struct RotationMetrics {
    out: IntGaugeVec,
    removals: IntCounterVec,
    in_rotation: IntGauge,
}

pub struct Accounts {
    views: RwLock<Vec<AccountView>>,
    /// Where the round robin goes next.
    next: AtomicUsize,
    /// Reads tasks recorded without an account: `default` if there is one, else the first.
    fallback: AccountId,
    metrics: RotationMetrics,
}

impl Accounts {
    /// The accounts `names` (at least one), all in rotation and unchecked.
    pub fn new<S: AsRef<str>>(names: &[S], metrics: &Metrics) -> Self {
        assert!(!names.is_empty(), "the config has at least one account");
        let views: Vec<AccountView> = names
            .iter()
            .map(|name| AccountView {
                name: name.as_ref().to_owned(),
                state: AccountState::Unchecked,
                in_rotation: true,
                out_reason: None,
                out_since: None,
                credit: None,
                credit_at: None,
                checked_at: None,
                last_error: None,
            })
            .collect();
        let metrics = RotationMetrics {
            out: metrics.upstream_account_out.clone(),
            removals: metrics.upstream_account_removals.clone(),
            in_rotation: metrics.upstream_accounts_in_rotation.clone(),
        };
        for view in &views {
            for reason in OutReason::ALL {
                let labels = [view.name.as_str(), reason.as_str()];
                metrics.out.with_label_values(&labels).set(0);
                metrics.removals.with_label_values(&labels);
            }
        }
        metrics.in_rotation.set(gauge(views.len()));
        let fallback = AccountId(
            views
                .iter()
                .position(|view| view.name == DEFAULT_ACCOUNT)
                .unwrap_or(0),
        );
        Accounts {
            views: RwLock::new(views),
            next: AtomicUsize::new(0),
            fallback,
            metrics,
        }
    }

    pub fn views(&self) -> Vec<AccountView> {
        self.read().clone()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    pub fn name(&self, id: AccountId) -> String {
        self.read()[id.0].name.clone()
    }

    /// The account a task recorded as started by `name` is read with; one recorded without an
    /// account (or with one no longer configured) is read with the fallback.
    pub fn for_task(&self, name: Option<&str>) -> AccountId {
        name.and_then(|name| self.read().iter().position(|view| view.name == name))
            .map_or(self.fallback, AccountId)
    }

    /// Whether any account takes new generations.
    pub fn any_in_rotation(&self) -> bool {
        self.read().iter().any(|view| view.in_rotation)
    }

    /// The next account in rotation after the round robin's place, skipping `tried`; `None` when
    /// every account is out or tried.
    pub fn pick(&self, tried: &[AccountId]) -> Option<AccountId> {
        let views = self.read();
        let count = views.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..count)
            .map(|offset| (start + offset) % count)
            .find(|&i| views[i].in_rotation && !tried.contains(&AccountId(i)))
            .map(AccountId)
    }

    /// The upstream refused the account's token on a call (`what`): it leaves rotation until a
    /// balance check reads its credit again.
    pub fn refused(&self, id: AccountId, what: &str, at: DateTime<Utc>) {
        let mut views = self.write();
        let view = &mut views[id.0];
        view.state = AccountState::Unauthorized;
        view.last_error = Some(format!("the upstream refused the account's token ({what})"));
        self.leave(&mut views, id, OutReason::Unauthorized, at);
    }

    /// Records a check of account `id` made at `at` against the floor `floor`; returns the
    /// credit it lost since the previous read (zero after a top-up, and on the first read).
    pub fn record(
        &self,
        id: AccountId,
        check: Check,
        floor: Credits,
        at: DateTime<Utc>,
    ) -> Credits {
        let mut views = self.write();
        let view = &mut views[id.0];
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
                if credit > floor {
                    self.rejoin(&mut views, id);
                } else {
                    self.leave(&mut views, id, OutReason::BelowFloor, at);
                }
                lost
            }
            Check::Unauthorized => {
                view.state = AccountState::Unauthorized;
                view.last_error = Some("the upstream refused the account's token".into());
                self.leave(&mut views, id, OutReason::Unauthorized, at);
                Credits::ZERO
            }
            Check::Failed(error) => {
                // No answer is no evidence: the account keeps its place in or out of rotation.
                view.state = AccountState::Failed;
                view.last_error = Some(error);
                Credits::ZERO
            }
        }
    }

    /// Takes the account out of rotation for `reason` (or changes why it is out).
    fn leave(
        &self,
        views: &mut [AccountView],
        id: AccountId,
        reason: OutReason,
        at: DateTime<Utc>,
    ) {
        let view = &mut views[id.0];
        if view.out_reason == Some(reason) {
            return;
        }
        if let Some(before) = view.out_reason {
            self.metrics
                .out
                .with_label_values(&[&view.name, before.as_str()])
                .set(0);
        } else {
            view.out_since = Some(at);
        }
        let labels = [view.name.as_str(), reason.as_str()];
        self.metrics.out.with_label_values(&labels).set(1);
        self.metrics.removals.with_label_values(&labels).inc();
        view.in_rotation = false;
        view.out_reason = Some(reason);
        match reason {
            OutReason::Unauthorized => tracing::error!(
                account = %view.name,
                "upstream account out of rotation: the upstream refused its token; rotate it"
            ),
            OutReason::BelowFloor => tracing::warn!(
                account = %view.name,
                credit = ?view.credit.map(|c| c.to_string()),
                "upstream account out of rotation: its credit is at or below [upstream] balance_floor"
            ),
        }
        self.count_in_rotation(views);
    }

    /// Puts the account back into rotation, if it was out.
    fn rejoin(&self, views: &mut [AccountView], id: AccountId) {
        let view = &mut views[id.0];
        let Some(reason) = view.out_reason.take() else {
            return;
        };
        self.metrics
            .out
            .with_label_values(&[&view.name, reason.as_str()])
            .set(0);
        view.in_rotation = true;
        view.out_since = None;
        tracing::info!(account = %view.name, was = reason.as_str(), "upstream account back in rotation");
        self.count_in_rotation(views);
    }

    fn count_in_rotation(&self, views: &[AccountView]) {
        let count = views.iter().filter(|view| view.in_rotation).count();
        self.metrics.in_rotation.set(gauge(count));
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<AccountView>> {
        self.views
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<AccountView>> {
        self.views
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn gauge(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credit(text: &str) -> Check {
        Check::Credit(text.parse().unwrap())
    }

    #[test]
    fn a_check_counts_what_the_account_lost_and_never_a_top_up() {
        let accounts = Accounts::new(&[DEFAULT_ACCOUNT], &Metrics::new());
        let (at, floor, id) = (Utc::now(), Credits::ZERO, AccountId(0));
        assert_eq!(
            accounts.record(id, credit("100.50"), floor, at),
            Credits::ZERO
        );
        assert_eq!(
            accounts.record(id, credit("99.75"), floor, at),
            "0.75".parse().unwrap()
        );
        assert_eq!(
            accounts.record(id, Check::Failed("timeout".into()), floor, at),
            Credits::ZERO
        );
        let view = &accounts.views()[0];
        assert_eq!(view.state, AccountState::Failed);
        assert_eq!(view.credit, Some("99.75".parse().unwrap()));
        // A top-up is not spending.
        assert_eq!(accounts.record(id, credit("500"), floor, at), Credits::ZERO);
        assert_eq!(
            accounts.record(id, Check::Unauthorized, floor, at),
            Credits::ZERO
        );
        assert_eq!(accounts.views()[0].state, AccountState::Unauthorized);
    }

    #[test]
    fn generations_go_round_robin_over_the_accounts_in_rotation() {
        let metrics = Metrics::new();
        let accounts = Accounts::new(&["a", "b", "c"], &metrics);
        let picks: Vec<usize> = (0..6).map(|_| accounts.pick(&[]).unwrap().0).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        let at = Utc::now();
        accounts.refused(AccountId(1), "generation", at);
        let picks: Vec<usize> = (0..4).map(|_| accounts.pick(&[]).unwrap().0).collect();
        assert!(picks.iter().all(|&i| i != 1), "{picks:?}");
        // A request that was refused by one account tries the others, then none.
        assert_eq!(accounts.pick(&[AccountId(0), AccountId(2)]), None);
        assert_eq!(metrics.upstream_accounts_in_rotation.get(), 2);
        let out = |name: &str, reason: OutReason| {
            metrics
                .upstream_account_out
                .with_label_values(&[name, reason.as_str()])
                .get()
        };
        assert_eq!(out("b", OutReason::Unauthorized), 1);
        // Refused again: still one removal.
        accounts.refused(AccountId(1), "status read", at);
        let removals = |name: &str, reason: OutReason| {
            metrics
                .upstream_account_removals
                .with_label_values(&[name, reason.as_str()])
                .get()
        };
        assert_eq!(removals("b", OutReason::Unauthorized), 1);
        let views = accounts.views();
        assert!(!views[1].in_rotation);
        assert_eq!(views[1].out_reason, Some(OutReason::Unauthorized));
        assert_eq!(views[1].out_since, Some(at));
    }

    #[test]
    fn the_floor_takes_an_account_out_and_a_read_above_it_brings_it_back() {
        let metrics = Metrics::new();
        let accounts = Accounts::new(&["main", "spare"], &metrics);
        let (floor, at) = ("5.00".parse().unwrap(), Utc::now());
        accounts.record(AccountId(0), credit("5.00"), floor, at);
        assert_eq!(accounts.views()[0].out_reason, Some(OutReason::BelowFloor));
        assert_eq!(accounts.pick(&[]), Some(AccountId(1)));
        assert_eq!(accounts.pick(&[]), Some(AccountId(1)));
        // A failed read is no evidence either way.
        accounts.record(AccountId(0), Check::Failed("timeout".into()), floor, at);
        assert!(!accounts.views()[0].in_rotation);
        accounts.refused(AccountId(1), "generation", at);
        assert_eq!(accounts.pick(&[]), None);
        assert_eq!(metrics.upstream_accounts_in_rotation.get(), 0);
        // Readmitted by a read of its credit above the floor, with its token taken again.
        accounts.record(AccountId(0), credit("5.01"), floor, at);
        accounts.record(AccountId(1), credit("80"), floor, at);
        assert_eq!(metrics.upstream_accounts_in_rotation.get(), 2);
        for name in ["main", "spare"] {
            for reason in OutReason::ALL {
                let out = metrics
                    .upstream_account_out
                    .with_label_values(&[name, reason.as_str()]);
                assert_eq!(out.get(), 0, "{name} {reason:?}");
            }
        }
        assert!(accounts.views().iter().all(|view| view.in_rotation));
    }

    #[test]
    fn a_task_without_an_account_is_read_with_default_or_the_first() {
        let metrics = Metrics::new();
        let accounts = Accounts::new(&["main", "default"], &metrics);
        assert_eq!(accounts.for_task(Some("main")), AccountId(0));
        assert_eq!(accounts.for_task(None), AccountId(1));
        assert_eq!(accounts.for_task(Some("gone")), AccountId(1));
        let accounts = Accounts::new(&["main", "spare"], &Metrics::new());
        assert_eq!(accounts.for_task(None), AccountId(0));
        assert_eq!(accounts.for_task(Some("spare")), AccountId(1));
    }
}
