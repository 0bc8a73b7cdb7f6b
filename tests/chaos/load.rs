//! The clients: every team sends generations at a steady rate over several routes and polls
//! most of its tasks until they are final, and every answer is written down, so the audit can
//! hold the ledger against what each client was told.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ketchup_testkit::{ADS_KEY, Api, DESIGN_KEY, GatewayConfig};
use serde_json::Value;
use tokio::task::JoinSet;

/// A team of the run: its key, its budget, and the generations it sends, in turn.
pub struct Team {
    pub name: &'static str,
    pub key: &'static str,
    /// `credits` of a lifetime budget.
    pub budget: &'static str,
    /// (path, body) of each generation it sends, taken in turn.
    pub orders: &'static [(&'static str, &'static str)],
}

/// Four teams over seven routes and eight models. `tight`'s budget runs out within seconds, so
/// it lives on the edge of its budget (402s, and credits freed as its tasks settle below their
/// reservations); the others never reach theirs.
pub const TEAMS: [Team; 4] = [
    Team {
        name: "design",
        key: DESIGN_KEY,
        budget: "100000.00",
        orders: &[
            (
                "/api/image/gen",
                r#"{"model":"google/gempix2","prompt":"a tomato"}"#,
            ),
            (
                "/api/image/gen",
                r#"{"model":"google/nano-banana-pro","prompt":"a tomato","n":2,"image_size":"2k"}"#,
            ),
            (
                "/api/wan-image/gen",
                r#"{"model":"wan-2.7-image","prompt":"a tomato"}"#,
            ),
        ],
    },
    Team {
        name: "ads",
        key: ADS_KEY,
        budget: "100000.00",
        orders: &[
            (
                "/api/gpt-image/gen",
                r#"{"model":"openai/gpt-image-2","prompt":"a tomato","quality":"high"}"#,
            ),
            (
                "/api/midjourney/imagine",
                r#"{"prompt":"a tomato","speed":"fast"}"#,
            ),
            (
                "/api/suno/generate",
                r#"{"mv":"chirp-v4-5","prompt":"a song about tomatoes"}"#,
            ),
        ],
    },
    Team {
        name: "video",
        key: "kgw_video_chaos_key_0123456789",
        budget: "100000.00",
        orders: &[
            (
                "/api/sora2/gen",
                r#"{"model":"sora-2","prompt":"a tomato rolls","duration":"10"}"#,
            ),
            (
                "/api/video/seedance/gen",
                r#"{"model":"seedance-2.0","duration":5,"content":[{"type":"text","text":"a tomato"}]}"#,
            ),
        ],
    },
    Team {
        name: "tight",
        key: "kgw_tight_chaos_key_9876543210",
        budget: "25.00",
        orders: &[
            (
                "/api/sora2/gen",
                r#"{"model":"sora-2","prompt":"a tomato rolls","duration":"15"}"#,
            ),
            (
                "/api/image/gen",
                r#"{"model":"google/gempix2","prompt":"three tomatoes","n":3}"#,
            ),
        ],
    },
];

/// The teams of [`TEAMS`] with their budgets, and every model they use reserved at no less than
/// the fake charges for it, so a budget is a hard ceiling.
pub fn with_teams(mut config: GatewayConfig) -> GatewayConfig {
    for team in &TEAMS {
        if !matches!(team.name, "design" | "ads") {
            config = config.team(team.name, team.key);
        }
        config = config.budget(
            team.name,
            &format!(r#"{{ credits = "{}", period = "lifetime" }}"#, team.budget),
        );
    }
    config
        .model_reserve(
            "google/nano-banana-pro",
            r#"{ by = "image_size", prices = { "1k" = "0.15", "2k" = "0.30", "4k" = "0.60" }, default = "1k" }"#,
        )
        .model("wan-2.7-image", "0.05")
        .model("openai/gpt-image-2", "0.10")
        .model("midjourney/imagine", "0.20")
        .model("chirp-v4-5", "0.10")
        .model_reserve(
            "sora-2",
            r#"{ by = "duration", prices = { "10" = "1.00", "15" = "1.50" } }"#,
        )
        .model_reserve(
            "seedance-2.0",
            r#"{ by = "duration", per_unit = "0.12", max = 15 }"#,
        )
}

/// Where the clients find the gateway: a new address after each restart.
pub struct Target(RwLock<Api>);

impl Target {
    pub fn new(api: Api) -> Target {
        Target(RwLock::new(api))
    }

    pub fn api(&self) -> Api {
        self.0.read().unwrap().clone()
    }

    /// The gateway listens at `base` now; the clients keep their HTTP client.
    pub fn moved_to(&self, base: String) {
        let mut api = self.0.write().unwrap();
        *api = Api::with_client(api.http.clone(), base);
    }
}

/// What a client was told about one generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 200 with this task id.
    Accepted(String),
    /// 503 naming the task the upstream accepted, which the ledger could not record yet.
    NotRecorded(String),
    /// Any other answer: its status and message.
    Refused(u16, String),
    /// No answer: the gateway was down (`connect`), died with the request in flight, or did not
    /// answer within the client's timeout (`timeout`).
    Lost(&'static str),
}

/// One generation request, by the request id the client gave it.
#[derive(Clone, Debug)]
pub struct Request {
    pub team: &'static str,
    pub outcome: Outcome,
}

/// Everything the clients saw.
#[derive(Default)]
pub struct Record {
    pub requests: Mutex<BTreeMap<String, Request>>,
    /// Final statuses read through the gateway: task id → (status, consumed).
    pub finals: Mutex<BTreeMap<String, (String, String)>>,
    /// What must never happen, each said once.
    pub violations: Mutex<Vec<String>>,
    pub polls: AtomicU64,
    pub polls_failed: AtomicU64,
    /// Generation ticks skipped because too many of a team's jobs were still running.
    pub skipped: AtomicU64,
}

impl Record {
    pub fn violation(&self, what: String) {
        let mut violations = self.violations.lock().unwrap();
        if violations.len() < 100 {
            violations.push(what);
        }
    }

    /// How many generations ended each way: `200`, `lost`, or a status and message.
    pub fn outcomes(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for request in self.requests.lock().unwrap().values() {
            let key = match &request.outcome {
                Outcome::Accepted(_) => "200".to_owned(),
                Outcome::NotRecorded(_) => "503 task not recorded yet".to_owned(),
                Outcome::Refused(status, message) => format!("{status} {message}"),
                Outcome::Lost(why) => format!("no answer ({why})"),
            };
            *counts.entry(key).or_default() += 1;
        }
        counts
    }
}

/// The running clients.
pub struct Load {
    stop: Arc<AtomicBool>,
    teams: JoinSet<()>,
    pub record: Arc<Record>,
}

/// Most jobs (a generation and its polls) one team has running at once.
const MAX_JOBS_PER_TEAM: usize = 200;
/// Between two status reads of one task.
const POLL_EVERY: Duration = Duration::from_millis(300);
/// A client stops polling a task that is still not final this long after the load stopped.
const POLL_PATIENCE: Duration = Duration::from_secs(60);

impl Load {
    /// Starts every team, `per_second` generations a second in all.
    pub fn start(target: Arc<Target>, per_second: f64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let record = Arc::new(Record::default());
        let every = Duration::from_secs_f64(TEAMS.len() as f64 / per_second);
        let mut teams = JoinSet::new();
        for team in &TEAMS {
            let (target, stop, record) = (target.clone(), stop.clone(), record.clone());
            teams.spawn(run_team(team, target, stop, record, every));
        }
        Load {
            stop,
            teams,
            record,
        }
    }

    /// Stops sending generations and waits until every job has ended: its task final, or
    /// given up on after [`POLL_PATIENCE`].
    pub async fn finish(mut self) -> Arc<Record> {
        self.stop.store(true, Ordering::SeqCst);
        while let Some(team) = self.teams.join_next().await {
            team.expect("a team's client");
        }
        self.record
    }
}

async fn run_team(
    team: &'static Team,
    target: Arc<Target>,
    stop: Arc<AtomicBool>,
    record: Arc<Record>,
    every: Duration,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut jobs = JoinSet::new();
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        ticks.tick().await;
        while jobs.try_join_next().is_some() {}
        if jobs.len() >= MAX_JOBS_PER_TEAM {
            record.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        seq += 1;
        let (target, record, stop) = (target.clone(), record.clone(), stop.clone());
        jobs.spawn(job(team, seq, target, record, stop));
    }
    while let Some(job) = jobs.join_next().await {
        job.expect("a generation job");
    }
}

/// One generation, then (for three in four) status reads until its task is final.
async fn job(
    team: &'static Team,
    seq: u64,
    target: Arc<Target>,
    record: Arc<Record>,
    stop: Arc<AtomicBool>,
) {
    let (path, body) = team.orders[seq as usize % team.orders.len()];
    let request_id = format!("chaos-{}-{seq}", team.name);
    let api = target.api();
    let request = api
        .submit_request(team.key, path, body)
        .header("x-request-id", &request_id);
    let outcome = match api.try_send(request).await {
        Err(error) if error.is_connect() => Outcome::Lost("connect"),
        Err(error) if error.is_timeout() => Outcome::Lost("timeout"),
        Err(_) => Outcome::Lost("cut off"),
        Ok(reply) => {
            let body: Value = serde_json::from_str(&reply.text).unwrap_or(Value::Null);
            let message = body["message"].as_str().unwrap_or_default().to_owned();
            match (reply.status, body["data"]["task_id"].as_str()) {
                (200, Some(task_id)) => Outcome::Accepted(task_id.to_owned()),
                (503, _) => match not_recorded_task(&body) {
                    Some(task_id) => Outcome::NotRecorded(task_id),
                    None => Outcome::Refused(503, message),
                },
                (status, _) => {
                    if !expected_refusal(team, status, &message) {
                        record.violation(format!(
                            "{request_id}: unexpected answer {status} {}",
                            reply.text
                        ));
                    }
                    Outcome::Refused(status, message)
                }
            }
        }
    };
    record.requests.lock().unwrap().insert(
        request_id.clone(),
        Request {
            team: team.name,
            outcome: outcome.clone(),
        },
    );
    match outcome {
        // Fire and forget, one in four: the reconciler settles these.
        Outcome::Accepted(_) if seq.is_multiple_of(4) => {}
        Outcome::Accepted(task_id) => poll(team, &task_id, true, &target, &record, &stop).await,
        // Unknown to the ledger until it is back: 404s are expected meanwhile.
        Outcome::NotRecorded(task_id) => {
            poll(team, &task_id, false, &target, &record, &stop).await;
        }
        Outcome::Refused(..) | Outcome::Lost(_) => {}
    }
}

/// The task id in a `503 ledger unavailable` whose detail says the upstream accepted it.
fn not_recorded_task(body: &Value) -> Option<String> {
    let detail = body["detail"].as_str()?;
    let rest = detail.split_once("the upstream accepted task ")?.1;
    rest.split([',', ' ']).next().map(str::to_owned)
}

/// Refusals the chaos explains: the upstream's 500 passed through, the upstream unreachable or
/// too slow, the store down, and `tight`'s budget spent.
fn expected_refusal(team: &Team, status: u16, message: &str) -> bool {
    match (status, message) {
        (500, "internal server error") => true,
        (502, "upstream unavailable") | (504, "upstream timeout" | "request timeout") => true,
        (503, "ledger unavailable") => true,
        (402, "budget exhausted") => team.name == "tight",
        _ => false,
    }
}

/// Reads `task_id` until it is final. A 404 for a task the gateway answered with (`owned`) is a
/// lost ownership.
async fn poll(
    team: &Team,
    task_id: &str,
    owned: bool,
    target: &Target,
    record: &Record,
    stop: &AtomicBool,
) {
    let mut stopped_at = None;
    loop {
        tokio::time::sleep(POLL_EVERY).await;
        if stop.load(Ordering::SeqCst) {
            let since = *stopped_at.get_or_insert_with(Instant::now);
            if since.elapsed() > POLL_PATIENCE {
                if owned {
                    record.violation(format!("{task_id} ({}) never final", team.name));
                }
                return;
            }
        }
        record.polls.fetch_add(1, Ordering::Relaxed);
        let api = target.api();
        let Ok(reply) = api.try_send(query(&api, team.key, task_id)).await else {
            record.polls_failed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let body: Value = serde_json::from_str(&reply.text).unwrap_or(Value::Null);
        match reply.status {
            200 => {
                if body["data"]["task_id"] != task_id {
                    record.violation(format!("{task_id}: another task's answer {}", reply.text));
                    return;
                }
                let status = body["data"]["status"].as_str().unwrap_or_default();
                if matches!(status, "success" | "failed") {
                    let consumed = body["data"]["consumed"].as_str().unwrap_or_default();
                    record
                        .finals
                        .lock()
                        .unwrap()
                        .insert(task_id.to_owned(), (status.to_owned(), consumed.to_owned()));
                    return;
                }
            }
            404 if !owned => {}
            500 | 502 | 503 | 504 => {
                record.polls_failed.fetch_add(1, Ordering::Relaxed);
            }
            status => {
                record.violation(format!(
                    "{task_id} ({}): status read answered {status} {}",
                    team.name, reply.text
                ));
                return;
            }
        }
    }
}

fn query(api: &Api, key: &str, task_id: &str) -> reqwest::RequestBuilder {
    api.http
        .get(api.url("/api/task/query"))
        .query(&[("task_id", task_id)])
        .bearer_auth(key)
}
