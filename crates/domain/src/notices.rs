//! Budget notifications: when a team's spent plus reserved credits first reach a percentage of
//! its budget that `budget.notify_at` lists, within a budget period, one notification goes to its
//! `notify_url` as a webhook delivery (signed, retried and guarded as every delivery is).
//!
//! Each is claimed in the ledger together with its delivery, in one atomic step
//! ([`BudgetNotices`]): whichever replica sees a threshold reached, and however often, before or
//! after a restart, exactly one claim queues it. A threshold counts as reached once a standing
//! the ledger answered reaches it, and stays so for the period: credits given back later (a
//! reservation released) do not undo it, nor make it notify again.
//!
//! A [`Notifier`] remembers what this process knows to be claimed (per team, the thresholds of
//! its current period), so the ledger is asked once per threshold and period, not at every
//! reservation past one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::config::{Team, Thresholds};
use crate::ledger::{BudgetNotice, BudgetNotices, NewDelivery, Standing, StoreError};
use crate::period;

/// The `type` of a notification's payload.
pub const TYPE: &str = "budget.threshold";

/// How long after its period ends a claim is kept: longer than any two replicas' clocks
/// disagree, so none still in the period can claim again once it is forgotten.
const KEPT_AFTER_PERIOD: chrono::Duration = chrono::Duration::days(1);

/// What this process knows to be claimed, per team: the period, and its thresholds claimed.
#[derive(Default)]
pub struct Notifier {
    known: Mutex<HashMap<String, (String, Thresholds)>>,
}

/// A team's standing in a period, as the ledger answered it at `at`.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub team: &'a Team,
    pub period: &'a str,
    pub standing: Standing,
    pub at: DateTime<Utc>,
}

impl Notifier {
    /// The thresholds `seen` reaches that this process does not know to be claimed; none for a
    /// team that is not notified.
    pub fn due(&self, seen: Seen<'_>) -> Thresholds {
        let Some(budget) = seen.team.budget.filter(|_| seen.team.notify_url.is_some()) else {
            return Thresholds::default();
        };
        let used = seen
            .standing
            .spent
            .checked_add(seen.standing.reserved)
            .unwrap_or(crate::credits::Credits::from_units(i64::MAX));
        budget
            .notify_at
            .reached(budget.credits, used)
            .without(self.known(&seen.team.name, seen.period))
    }

    /// Claims each of `due` (from [`Notifier::due`]) in the ledger with its notification,
    /// smallest first, each delivery given `deadline`. Returns the percentages this call queued;
    /// stops at the first the ledger could not answer, those before it remembered.
    pub async fn notify(
        &self,
        ledger: &dyn BudgetNotices,
        seen: Seen<'_>,
        due: Thresholds,
        deadline: Duration,
    ) -> Result<Vec<u8>, StoreError> {
        let (Some(budget), Some(url)) = (seen.team.budget, seen.team.notify_url.as_ref()) else {
            return Ok(Vec::new());
        };
        let expires_at = period::period_end(budget.period, seen.at)
            .and_then(|end| end.checked_add_signed(KEPT_AFTER_PERIOD));
        let deadline = chrono::Duration::from_std(deadline)
            .ok()
            .and_then(|d| seen.at.checked_add_signed(d))
            .unwrap_or(seen.at);
        let mut queued = Vec::new();
        for percent in due.iter() {
            let notice = BudgetNotice {
                team: seen.team.name.clone(),
                period: seen.period.to_owned(),
                percent,
                expires_at,
                delivery: NewDelivery {
                    id: format!("msg_{}", uuid::Uuid::now_v7().simple()),
                    task_id: format!("budget:{}:{}:{percent}", seen.team.name, seen.period),
                    team: seen.team.name.clone(),
                    url: url.clone(),
                    body: payload(seen, percent).into(),
                    created_at: seen.at,
                    deadline,
                },
            };
            if ledger.claim_budget_notice(notice).await? {
                queued.push(percent);
            }
            self.remember(&seen.team.name, seen.period, percent);
        }
        Ok(queued)
    }

    fn known(&self, team: &str, period: &str) -> Thresholds {
        match self.lock().get(team) {
            Some((known, claimed)) if known == period => *claimed,
            _ => Thresholds::default(),
        }
    }

    fn remember(&self, team: &str, period: &str, percent: u8) {
        let one = Thresholds::of([percent]).expect("a configured percentage");
        let mut known = self.lock();
        match known.get_mut(team) {
            Some((known, claimed)) if known == period => *claimed = claimed.with(one),
            // A new period (or the first claim): what was known of the old one is of no use.
            _ => {
                known.insert(team.to_owned(), (period.to_owned(), one));
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Thresholds)>> {
        // Every change to the map is a single step: a poisoned lock still guards a sound map.
        self.known
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The notification that `seen` reached `percent`: credits as exact decimal strings (8 places,
/// as the budget endpoint shows them), instants in RFC 3339.
pub fn payload(seen: Seen<'_>, percent: u8) -> Vec<u8> {
    let budget = seen.team.budget.expect("only a budget is notified");
    let rfc3339 = |at: DateTime<Utc>| at.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let body = json!({
        "type": TYPE,
        "timestamp": rfc3339(seen.at),
        "data": {
            "team": seen.team.name,
            "period": seen.period,
            "threshold_percent": percent,
            "budget": budget.credits.format_places(8),
            "spent": seen.standing.spent.format_places(8),
            "reserved": seen.standing.reserved.format_places(8),
            "resets_at": period::period_end(budget.period, seen.at).map(rfc3339),
        },
    });
    serde_json::to_vec(&body).expect("a JSON value serializes")
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::config::Config;
    use crate::ledger::sqlite::SqliteStore;
    use crate::ledger::{DeliveryState, Outbox};

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    /// Team design with a budget of 10.00 a month, and `lines` besides.
    fn team_with(lines: &str) -> Arc<Team> {
        let text = format!(
            "[upstream]\ntoken_env = \"T\"\n[models.\"m\"]\nreserve = \"1\"\n[[teams]]\n\
             name = \"design\"\nkeys = [{{ sha256 = \"{}\" }}]\nwebhook_secret_env = \"S\"\n\
             {lines}\n",
            "c3ab8ff13720e8ad9047dd39466b3c8974e592c2fa383d4a3960714caef0c4f2"
        );
        let config = Config::parse(Path::new("gateway.toml"), &text).unwrap();
        config.team("design").unwrap().clone()
    }

    /// Team design notified at `notify_at` of its budget of 10.00 a month.
    fn team(notify_at: &str) -> Arc<Team> {
        team_with(&format!(
            "budget = {{ credits = \"10.00\", period = \"monthly\", notify_at = {notify_at} }}\n\
             notify_url = \"https://hooks.design.example/budget\""
        ))
    }

    fn standing(spent: &str, reserved: &str) -> Standing {
        Standing {
            spent: spent.parse().unwrap(),
            reserved: reserved.parse().unwrap(),
        }
    }

    #[tokio::test]
    async fn each_threshold_is_queued_once_and_then_known() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = SqliteStore::open(&dir.path().join("ledger.db")).unwrap();
        let team = team("[50, 80]");
        let notifier = Notifier::default();
        let seen = |spent, reserved| Seen {
            team: &team,
            period: "2026-11",
            standing: standing(spent, reserved),
            at: at("2026-11-23T10:00:00Z"),
        };
        let day = Duration::from_secs(86_400);

        assert!(notifier.due(seen("4.00", "0.99999999")).is_empty());
        let reached = seen("4.00", "4.50");
        let due = notifier.due(reached);
        assert_eq!(due.iter().collect::<Vec<_>>(), [50, 80]);
        assert_eq!(
            notifier.notify(&ledger, reached, due, day).await.unwrap(),
            [50, 80]
        );
        assert!(notifier.due(reached).is_empty(), "known once claimed");

        // Another process, which knows nothing yet, asks the ledger and queues nothing more.
        let other = Notifier::default();
        let due = other.due(reached);
        assert_eq!(
            other.notify(&ledger, reached, due, day).await.unwrap(),
            Vec::<u8>::new()
        );
        assert!(other.due(reached).is_empty());
        let pending = ledger.deliveries(DeliveryState::Pending, 10).await.unwrap();
        let mut subjects: Vec<_> = pending.iter().map(|d| d.task_id.as_str()).collect();
        subjects.sort();
        assert_eq!(
            subjects,
            ["budget:design:2026-11:50", "budget:design:2026-11:80"]
        );

        // A new period starts over.
        let december = Seen {
            period: "2026-12",
            at: at("2026-12-01T00:00:10Z"),
            ..seen("5.00", "0")
        };
        let due = notifier.due(december);
        assert_eq!(due.iter().collect::<Vec<_>>(), [50]);
        assert_eq!(
            notifier.notify(&ledger, december, due, day).await.unwrap(),
            [50]
        );
    }

    #[test]
    fn a_team_without_notifications_is_never_due() {
        let plain = team_with("budget = { credits = \"10.00\", period = \"monthly\" }");
        let notifier = Notifier::default();
        let seen = Seen {
            team: &plain,
            period: "2026-11",
            standing: standing("10.00", "0"),
            at: at("2026-11-23T10:00:00Z"),
        };
        assert!(notifier.due(seen).is_empty());
    }

    #[test]
    fn the_payload_says_who_reached_what_in_exact_credits() {
        let team = team("[50]");
        let seen = Seen {
            team: &team,
            period: "2026-11",
            standing: standing("4.5", "0.50000001"),
            at: at("2026-11-23T10:00:00Z"),
        };
        let body: serde_json::Value = serde_json::from_slice(&payload(seen, 50)).unwrap();
        assert_eq!(
            body,
            json!({
                "type": "budget.threshold",
                "timestamp": "2026-11-23T10:00:00Z",
                "data": {
                    "team": "design",
                    "period": "2026-11",
                    "threshold_percent": 50,
                    "budget": "10.00000000",
                    "spent": "4.50000000",
                    "reserved": "0.50000001",
                    "resets_at": "2026-12-01T00:00:00Z",
                },
            })
        );
    }
}
