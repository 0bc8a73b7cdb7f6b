//! The audit after a run, exact to the credit unit (1e-8): the gateway's ledger, read through the
//! admin API and the teams' own status reads, against the fake upstream's record of every task it
//! created (with the request it came from and what it consumed) and against what each client was
//! told.
//!
//! - every task the upstream created came from one request of one team, and from no other
//!   request (no double render);
//! - every such task is its team's (its key reads it, another team's key gets the same 404 as an
//!   unknown id), or else its request is an `unknown_outcome` reservation the admin can see: the
//!   gateway died or lost the answer between the upstream's accepting and its own recording;
//! - every task a client was answered with is its team's, and every final status a client read
//!   says what the upstream consumed;
//! - no reservation is left held: nothing `reserved` or `open`, every team's `reserved` zero;
//!   the `unknown_outcome` ones whose request created no upstream task are released by the admin,
//!   as the runbook says (the upstream charged nothing);
//! - each team's `spent` is what its tasks consumed plus the reservations of the unknown outcomes
//!   that did create a task, and the usage report agrees per team and model: tasks, successes,
//!   failures and credits. A task settled twice would be charged twice and counted twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{Days, Utc};
use ketchup_domain::credits::Credits;
use ketchup_fake_upstream::{FakeStats, TaskStatus};
use ketchup_testkit::{ADMIN_TOKEN, Api, Reply};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::load::{Outcome, Record, TEAMS, Team};

const NOT_FOUND: &str = r#"{"code":1,"message":"task not found"}"#;
/// How long the reconciler may go without closing a reservation once the load has stopped.
const SETTLE_DEADLINE: Duration = Duration::from_secs(60);

/// What a team's books must say, or say: per model, tasks, successes, failures and credits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Books {
    pub tasks: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub unsettled: u64,
    pub credits: i64,
}

/// The audit's figures.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub upstream_tasks: usize,
    pub owned_tasks: usize,
    pub answered_tasks: usize,
    pub finals_read_by_clients: usize,
    /// Unknown outcomes whose request created an upstream task: charged at their reservation.
    pub unknown_outcomes_kept: usize,
    /// Unknown outcomes whose request created nothing upstream, released by the admin.
    pub unknown_outcomes_released: usize,
    /// Reservations still held once every client had stopped, and how long the reconciler
    /// took to close them.
    pub unsettled_when_the_load_stopped: usize,
    pub settle_wait_ms: u128,
    /// Team → spent, as the gateway says it and as it must be.
    pub spent: BTreeMap<String, String>,
    pub violations: Vec<String>,
}

/// Waits until the reconciler has closed every reservation, then audits.
pub async fn run(api: Api, fake: FakeStats, record: Arc<Record>) -> Summary {
    let (api, fake, record) = (&api, &fake, &*record);
    let mut summary = Summary::default();
    let started = Instant::now();
    summary.unsettled_when_the_load_stopped = wait_until_nothing_reserved(api).await;
    summary.settle_wait_ms = started.elapsed().as_millis();
    let mut violations = Vec::new();
    let requests = record.requests.lock().unwrap().clone();

    for state in ["reserved", "open", "expired"] {
        let left = listing(api, state).await;
        if !left.is_empty() {
            violations.push(format!(
                "{} reservations left {state}: {left:?}",
                left.len()
            ));
        }
    }

    // The upstream's tasks by the request that created them.
    let mut by_request: BTreeMap<&str, &str> = BTreeMap::new();
    for (task_id, task) in &fake.tasks {
        let Some(request_id) = task.request_id.as_deref() else {
            violations.push(format!("upstream task {task_id} came without a request id"));
            continue;
        };
        if !requests.contains_key(request_id) {
            violations.push(format!(
                "upstream task {task_id} from unknown request {request_id}"
            ));
        }
        if let Some(first) = by_request.insert(request_id, task_id) {
            violations.push(format!(
                "request {request_id} rendered twice: {first}, {task_id}"
            ));
        }
    }

    // Unknown outcomes: explained by a request that got no task id, released when it created
    // nothing upstream, kept (charged at the reservation) when it did.
    let mut expected: BTreeMap<(String, String), Books> = BTreeMap::new();
    let mut kept = BTreeSet::new();
    for unknown in listing(api, "unknown_outcome").await {
        let request_id = unknown["request_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let team = unknown["team"].as_str().unwrap_or_default().to_owned();
        match requests.get(&request_id) {
            Some(request) if request.team == team => {
                if let Outcome::Accepted(task_id) = &request.outcome {
                    violations.push(format!(
                        "{request_id} was answered with {task_id} but is an unknown outcome"
                    ));
                }
            }
            _ => violations.push(format!("unknown outcome of no client's request: {unknown}")),
        }
        if by_request.contains_key(request_id.as_str()) {
            let books = expected
                .entry((team, unknown["model"].as_str().unwrap_or_default().into()))
                .or_default();
            books.tasks += 1;
            books.credits += units(&unknown["reserved"]);
            kept.insert(request_id);
        } else {
            let path = format!(
                "/admin/reservations/{}/release",
                unknown["id"].as_str().unwrap_or_default()
            );
            let reply = patiently(api, || {
                api.http.post(api.url(&path)).bearer_auth(ADMIN_TOKEN)
            })
            .await;
            if reply.status != 200 {
                violations.push(format!(
                    "releasing {unknown}: {} {}",
                    reply.status, reply.text
                ));
            }
            summary.unknown_outcomes_released += 1;
        }
    }
    summary.unknown_outcomes_kept = kept.len();

    // Every upstream task: its team's, or an unknown outcome kept above.
    let owners = owners(api, fake, &requests_team(record)).await;
    for (task_id, task) in &fake.tasks {
        let Some(request_id) = task.request_id.as_deref() else {
            continue;
        };
        let Some(request) = requests.get(request_id) else {
            continue;
        };
        match owners.get(task_id.as_str()) {
            Some(Ok(true)) => {
                summary.owned_tasks += 1;
                let books = expected
                    .entry((request.team.to_owned(), task.model.clone()))
                    .or_default();
                books.tasks += 1;
                match task.status {
                    TaskStatus::Success => books.succeeded += 1,
                    TaskStatus::Failed => books.failed += 1,
                    status => violations.push(format!("{task_id} still {status:?} upstream")),
                }
                books.credits += task.consumed.as_deref().map_or(0, text_units);
                if kept.contains(request_id) {
                    violations.push(format!("{task_id} is owned and an unknown outcome"));
                }
            }
            Some(Ok(false)) if kept.contains(request_id) => {}
            Some(Ok(false)) => violations.push(format!(
                "upstream task {task_id} ({}, request {request_id}) is nobody's and no unknown \
                 outcome: a credit lost",
                request.team
            )),
            Some(Err(why)) => violations.push(why.clone()),
            None => {}
        }
    }
    summary.upstream_tasks = fake.tasks.len();

    // What the clients were told.
    for (request_id, request) in &requests {
        let Outcome::Accepted(task_id) = &request.outcome else {
            continue;
        };
        summary.answered_tasks += 1;
        let created_by = fake
            .tasks
            .get(task_id)
            .and_then(|t| t.request_id.as_deref());
        if created_by != Some(request_id.as_str()) {
            violations.push(format!(
                "{request_id} was answered with {task_id}, which request {created_by:?} created"
            ));
        }
        if owners.get(task_id.as_str()) != Some(&Ok(true)) {
            violations.push(format!("{task_id} answered to {} is not its", request.team));
        }
    }
    let finals = record.finals.lock().unwrap().clone();
    summary.finals_read_by_clients = finals.len();
    for (task_id, (status, consumed)) in &finals {
        let upstream = fake.tasks.get(task_id);
        let said = upstream.map(|t| (t.status, t.consumed.clone()));
        let read = (status.as_str(), Some(consumed.clone()));
        let matches = match &said {
            Some((TaskStatus::Success, c)) => read == ("success", c.clone()),
            Some((TaskStatus::Failed, c)) => read == ("failed", c.clone()),
            _ => false,
        };
        if !matches {
            violations.push(format!("{task_id} read {read:?}, upstream says {said:?}"));
        }
    }

    // The books: each team's standing and the usage report.
    let teams = admin(api, "/admin/teams").await;
    for team in teams["teams"].as_array().expect("teams") {
        let name = team["team"].as_str().unwrap_or_default();
        let owed: i64 = expected
            .iter()
            .filter(|((t, _), _)| t == name)
            .map(|(_, books)| books.credits)
            .sum();
        let spent = units(&team["spent"]);
        summary.spent.insert(
            name.to_owned(),
            format!(
                "{} (expected {})",
                Credits::from_units(spent).format_places(8),
                Credits::from_units(owed).format_places(8)
            ),
        );
        if spent != owed || units(&team["reserved"]) != 0 {
            violations.push(format!("{name}: {team}, but its tasks owe {owed} units"));
        }
        if let Some(credits) = team["credits"].as_str()
            && spent > text_units(credits)
        {
            violations.push(format!("{name} spent past its budget: {team}"));
        }
    }
    let usage = usage(api).await;
    if usage != expected {
        violations.push(format!(
            "usage per team and model differs: gateway {usage:?}, expected {expected:?}"
        ));
    }
    summary.violations = violations;
    summary
}

/// Sends what `request` builds until the gateway answers it with anything but a 503, for up to
/// [`SETTLE_DEADLINE`]: on a loaded machine a Redis call can outlast its timeout, and the
/// breaker in front of Redis then refuses everything for a few seconds.
async fn patiently(api: &Api, request: impl Fn() -> reqwest::RequestBuilder) -> Reply {
    let deadline = Instant::now() + SETTLE_DEADLINE;
    loop {
        match api.try_send(request()).await {
            Ok(reply) if reply.status != 503 => return reply,
            answer => assert!(
                Instant::now() < deadline,
                "the gateway kept failing: {answer:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `GET path` with the admin token, [`patiently`]; must answer 200.
async fn admin(api: &Api, path: &str) -> Value {
    let reply = patiently(api, || api.http.get(api.url(path)).bearer_auth(ADMIN_TOKEN)).await;
    assert_eq!(reply.status, 200, "{path}: {}", reply.text);
    reply.json()
}

/// A status read of `task_id` with `key`, [`patiently`].
async fn query(api: &Api, key: &str, task_id: &str) -> Reply {
    patiently(api, || {
        api.http
            .get(api.url("/api/task/query"))
            .query(&[("task_id", task_id)])
            .bearer_auth(key)
    })
    .await
}

/// The team of each request id.
fn requests_team(record: &Record) -> BTreeMap<String, &'static str> {
    record
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|(id, request)| (id.clone(), request.team))
        .collect()
}

/// Whether each upstream task is its requesting team's: its key reads it, and another team's
/// key gets exactly the 404 of an unknown id. `Err` for an answer that is neither.
async fn owners(
    api: &Api,
    fake: &FakeStats,
    teams: &BTreeMap<String, &'static str>,
) -> BTreeMap<String, Result<bool, String>> {
    let permits = Arc::new(Semaphore::new(16));
    let mut checks = tokio::task::JoinSet::new();
    for (task_id, task) in &fake.tasks {
        let Some(team) = task.request_id.as_ref().and_then(|r| teams.get(r)) else {
            continue;
        };
        let own = team_by_name(team);
        let other = TEAMS
            .iter()
            .find(|t| t.name != own.name)
            .expect("two teams");
        let (api, task_id, permits) = (api.clone(), task_id.clone(), permits.clone());
        checks.spawn(async move {
            let _permit = permits.acquire().await.expect("semaphore");
            let mine = query(&api, own.key, &task_id).await;
            let theirs = query(&api, other.key, &task_id).await;
            let verdict = if (theirs.status, theirs.text.as_str()) != (404, NOT_FOUND) {
                Err(format!("{task_id} read by {}: {}", other.name, theirs.text))
            } else if mine.status == 200 && mine.json()["data"]["task_id"] == task_id.as_str() {
                Ok(true)
            } else if (mine.status, mine.text.as_str()) == (404, NOT_FOUND) {
                Ok(false)
            } else {
                Err(format!("{task_id} read by {}: {}", own.name, mine.text))
            };
            (task_id, verdict)
        });
    }
    let mut verdicts = BTreeMap::new();
    while let Some(checked) = checks.join_next().await {
        let (task_id, verdict) = checked.expect("an ownership check");
        verdicts.insert(task_id, verdict);
    }
    verdicts
}

fn team_by_name(name: &str) -> &'static Team {
    TEAMS
        .iter()
        .find(|t| t.name == name)
        .expect("a team of the run")
}

/// Polls `/admin/teams` until no team holds a reservation (the reconciler has settled every
/// open task and abandoned every reservation its gateway died holding). Fails only when the
/// reservations held stop going down for [`SETTLE_DEADLINE`]: a long run leaves the reconciler a
/// backlog to work through, at its own pace.
async fn wait_until_nothing_reserved(api: &Api) -> usize {
    let mut first = None;
    let mut least = usize::MAX;
    let mut progress = Instant::now();
    loop {
        let teams = admin(api, "/admin/teams").await;
        let in_flight: usize = teams["teams"]
            .as_array()
            .expect("teams")
            .iter()
            .map(|team| team["in_flight"].as_u64().expect("in_flight") as usize)
            .sum();
        let reserved = teams["teams"]
            .as_array()
            .expect("teams")
            .iter()
            .any(|team| units(&team["reserved"]) != 0);
        let first = *first.get_or_insert(in_flight);
        if !reserved && in_flight == 0 {
            return first;
        }
        if in_flight < least {
            (least, progress) = (in_flight, Instant::now());
        }
        if progress.elapsed() > SETTLE_DEADLINE {
            let open = listing(api, "open").await;
            let reserved = listing(api, "reserved").await;
            panic!(
                "{in_flight} tasks still unsettled, none settled for {SETTLE_DEADLINE:?}: \
                 {teams}\nopen: {open:#?}\nreserved: {reserved:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `/admin/reservations?state=…`, which must not have been cut at its limit.
async fn listing(api: &Api, state: &str) -> Vec<Value> {
    let body = admin(api, &format!("/admin/reservations?state={state}")).await;
    let list = body["reservations"]
        .as_array()
        .expect("reservations")
        .clone();
    assert!(list.len() < 1000, "{state}: the listing is cut at 1000");
    list
}

/// `/admin/usage` from yesterday to the day after tomorrow, summed per team and model.
async fn usage(api: &Api) -> BTreeMap<(String, String), Books> {
    let today = Utc::now().date_naive();
    let from = today.checked_sub_days(Days::new(1)).expect("a date");
    let to = today.checked_add_days(Days::new(2)).expect("a date");
    let report = admin(api, &format!("/admin/usage?from={from}&to={to}")).await;
    let mut books: BTreeMap<(String, String), Books> = BTreeMap::new();
    for row in report["rows"].as_array().expect("rows") {
        let key = (
            row["team"].as_str().unwrap_or_default().to_owned(),
            row["model"].as_str().unwrap_or_default().to_owned(),
        );
        let entry = books.entry(key).or_default();
        let count = |field: &str| row[field].as_u64().expect("a count");
        entry.tasks += count("tasks");
        entry.succeeded += count("succeeded");
        entry.failed += count("failed");
        entry.unsettled += count("unsettled");
        entry.credits += units(&row["credits"]);
    }
    books
}

/// Credits as exact units (1e-8 credit).
pub fn units(credits: &Value) -> i64 {
    text_units(
        credits
            .as_str()
            .unwrap_or_else(|| panic!("credits: {credits}")),
    )
}

fn text_units(text: &str) -> i64 {
    text.parse::<Credits>().expect("credits").units()
}
