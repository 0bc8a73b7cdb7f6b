//! The routes: every asynchronous endpoint of the contract ([`catalog`](super::catalog)), the
//! task query and the balance, exactly as the contract describes them, and the `/_fake/*`
//! control API for out-of-process users (demo, benchmarks). The text dialects have their own
//! router ([`text`](super::text)).
//!
//! Handlers take the raw body and query string rather than axum's typed extractors, so a
//! malformed request is still counted and gets an upstream-shaped 400 instead of axum's text.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{OriginalUri, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use http::{HeaderMap, Uri};
use ketchup_domain::credits::Credits;
use serde_json::Value;
use uuid::Uuid;

use super::ConnectionHandle;
use super::catalog::{self, Endpoint as Route, field};
use super::faults::{Endpoint, Fault, FaultRates};
use super::state::{FakeStats, PendingCallback, Recorder, Shared, Task};
use super::wire::{self, Created, TaskData};

/// Largest generation body read; reference images are URLs, so this is generous.
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// A prompt containing this ends in a failed task: a deterministic failure for demos.
const FAIL_MARKER: &str = "[fail]";
/// A prompt containing `[charge:0.35]` ends in a task that consumed exactly that, whatever the
/// model's price: a cost a reservation may not cover, for tests of what the gateway settles.
const CHARGE_MARKER: &str = "[charge:";

type SharedState = State<Arc<Shared>>;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let submissions = catalog::ENDPOINTS
        .iter()
        .fold(Router::new(), |router, endpoint| {
            router.route(endpoint.path, post(generate))
        });
    submissions
        .route("/api/task/query", get(query))
        .route("/api/user", get(user))
        .route("/_fake/files/{*file}", get(file))
        .route("/_fake/stats", get(control_stats))
        .route(
            "/_fake/faults",
            get(control_get_faults).post(control_set_faults),
        )
        .route("/_fake/reset", post(control_reset))
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .with_state(shared)
}

async fn not_found() -> Response {
    wire::route_not_found()
}

/// Every asynchronous submission (`POST /api/image/gen`, `/api/sora2/gen`, …). Counts and
/// records first, then applies the fault, then answers.
async fn generate(
    State(shared): SharedState,
    Extension(connection): Extension<ConnectionHandle>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let route = catalog::endpoint(uri.path()).expect("only catalog paths are routed here");
    Recorder::count(&shared.stats.generate_requests);
    shared.stats.observe_headers(&headers);
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| "request body is unreadable or larger than 4 MiB")
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).map_err(|_| "invalid JSON body"));
    if let Ok(json) = &body {
        shared.stats.record_generate_body(json);
    }
    let fault = shared.faults.draw(Endpoint::Generate);
    match fault {
        Some(Fault::Status500) => return wire::internal_error(),
        Some(Fault::DropConnection) => return connection.drop_now().await,
        _ => {}
    }
    let response = if let Some(account) = shared.authorize(&headers) {
        let request_id = headers
            .get("x-request-id")
            .map(|id| String::from_utf8_lossy(id.as_bytes()).into_owned());
        let fail = fault == Some(Fault::FailTask);
        match body
            .map_err(String::from)
            .and_then(|json| create_task(&shared, route, &json, fail, request_id, account))
        {
            Ok(task_id) => wire::ok(Created { task_id: &task_id }),
            Err(detail) => wire::bad_request(detail),
        }
    } else {
        Recorder::count(&shared.stats.unauthorized);
        wire::unauthorized()
    };
    // The task exists before the delay: a client that gives up waiting has still started it.
    if let Some(Fault::Slow(delay)) = fault {
        tokio::time::sleep(delay).await;
    }
    response
}

/// Validates a generation body and creates its task; `Err` is the 400's detail.
fn create_task(
    shared: &Shared,
    route: &'static Route,
    body: &Value,
    fail: bool,
    request_id: Option<String>,
    account: usize,
) -> Result<String, String> {
    let body = body
        .as_object()
        .ok_or("request body must be a JSON object")?;
    let order = route.order(body)?;
    let price = *shared
        .prices
        .get(&order.model)
        .ok_or_else(|| format!("unsupported model: {}", order.model))?;
    let callback_url = field(body, "callback_url")
        .map(|url| {
            url.as_str()
                .and_then(|url| url.parse::<Uri>().ok())
                .filter(|url| {
                    matches!(url.scheme_str(), Some("http" | "https")) && url.host().is_some()
                })
                .ok_or("callback_url must be an absolute http(s) URL")
        })
        .transpose()?;

    let cost = match charged(&order.prompt) {
        Some(charge) => charge?,
        None => catalog::cost(price, order.units),
    };
    let created_at = shared.clock.now();
    let mut task = Task::new(
        route,
        order.model,
        created_at,
        order.images,
        cost,
        fail || order.prompt.contains(FAIL_MARKER),
    );
    task.request_id = request_id;
    task.account = account;
    let task_id = new_task_id();
    let final_at = task.final_at(&shared.schedule);
    // The task goes in first: the ticker may look for it as soon as its callback is scheduled.
    shared.tasks.insert(task_id.clone(), task);
    if let (Some(url), Some(due)) = (callback_url, final_at) {
        shared.schedule_callback(PendingCallback {
            task_id: task_id.clone(),
            url,
            due,
        });
    }
    Recorder::count(&shared.stats.generate_accepted);
    Ok(task_id)
}

/// The cost a prompt's [`CHARGE_MARKER`] names; `Some(Err)` for one that names no amount.
fn charged(prompt: &str) -> Option<Result<Credits, String>> {
    let (_, rest) = prompt.split_once(CHARGE_MARKER)?;
    Some(
        rest.split_once(']')
            .and_then(|(amount, _)| amount.parse().ok())
            .ok_or_else(|| format!("{CHARGE_MARKER}…] must name an amount such as 0.35")),
    )
}

/// `ta823dfb-eaac-44fd-aec2-3e2c7ba8e071` (as in the captured response): a v4 uuid whose first
/// two hex digits are replaced by `ta`.
fn new_task_id() -> String {
    let mut id = Uuid::new_v4().to_string();
    id.replace_range(..2, "ta");
    id
}

/// `GET /api/task/query?task_id=…`, the hot path of benchmarks: no global lock, one lookup.
async fn query(
    State(shared): SharedState,
    Extension(connection): Extension<ConnectionHandle>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    Recorder::count(&shared.stats.query_requests);
    shared.stats.observe_headers(&headers);
    let fault = shared.faults.draw(Endpoint::Query);
    match fault {
        Some(Fault::Status500) => return wire::internal_error(),
        Some(Fault::DropConnection) => return connection.drop_now().await,
        _ => {}
    }
    let response = answer_query(&shared, &headers, query.as_deref());
    if let Some(Fault::Slow(delay)) = fault {
        tokio::time::sleep(delay).await;
    }
    response
}

fn answer_query(shared: &Shared, headers: &HeaderMap, query: Option<&str>) -> Response {
    let Some(account) = shared.authorize(headers) else {
        Recorder::count(&shared.stats.unauthorized);
        return wire::unauthorized_query();
    };
    let task_id = query.and_then(|query| {
        url::form_urlencoded::parse(query.as_bytes())
            .find_map(|(key, value)| (key == "task_id").then_some(value))
    });
    let Some(task_id) = task_id.filter(|id| !id.is_empty()) else {
        return wire::bad_request("task_id is required");
    };
    let Some(task) = shared.tasks.get(task_id.as_ref()) else {
        return wire::task_not_found();
    };
    // Another account has no such task.
    if task.account != account {
        Recorder::count(&shared.stats.foreign_queries);
        return wire::task_not_found();
    }
    task.count_query();
    let now = shared.clock.now();
    // The contract's open point: a brand-new task can briefly be unknown to queries.
    if task.age(now) < shared.schedule.unknown_for {
        return wire::task_not_found();
    }
    let status = task.status(now, &shared.schedule);
    wire::ok(TaskData::new(&shared.files_url, task.key(), &task, status))
}

/// `GET /api/user`: the balance of the token's account, lowered by every task of it that has
/// finished.
async fn user(State(shared): SharedState, headers: HeaderMap) -> Response {
    #[derive(serde::Serialize)]
    struct Balance {
        credit: String,
    }
    Recorder::count(&shared.stats.user_requests);
    shared.stats.observe_headers(&headers);
    let Some(account) = shared.authorize(&headers) else {
        Recorder::count(&shared.stats.unauthorized);
        return wire::unauthorized();
    };
    wire::ok(Balance {
        credit: shared.balance(account, shared.clock.now()).format_places(8),
    })
}

/// `GET /_fake/files/…`: a result's file, a few bytes of its type, for clients that download
/// what a task returned.
async fn file(uri: Uri) -> Response {
    let (content_type, bytes): (&str, &[u8]) = match uri.path().rsplit('.').next() {
        Some("png") => ("image/png", b"\x89PNG\r\n\x1a\n"),
        Some("mp4") => ("video/mp4", b"\0\0\0\x18ftypmp42"),
        Some("mp3") => ("audio/mpeg", b"ID3\x04\0\0"),
        _ => return wire::route_not_found(),
    };
    ([(http::header::CONTENT_TYPE, content_type)], bytes).into_response()
}

/// `GET /_fake/stats`, or `/_fake/stats?summary=true` for counters only (no task map, no
/// per-task query counts, no bodies), which stays small after a benchmark.
async fn control_stats(State(shared): SharedState, RawQuery(query): RawQuery) -> Json<FakeStats> {
    let summary = query.is_some_and(|query| {
        url::form_urlencoded::parse(query.as_bytes())
            .any(|(key, value)| key == "summary" && matches!(value.as_ref(), "true" | "1"))
    });
    Json(shared.stats(!summary))
}

/// `GET /_fake/faults`: the current fault rates.
async fn control_get_faults(State(shared): SharedState) -> Response {
    wire::ok(shared.faults.rates())
}

/// `POST /_fake/faults` with a [`FaultRates`] body (missing fields are zero).
async fn control_set_faults(State(shared): SharedState, body: Bytes) -> Response {
    match serde_json::from_slice::<FaultRates>(&body) {
        Ok(rates) => {
            shared.faults.set_rates(rates.clone());
            wire::ok(rates)
        }
        Err(error) => wire::bad_request(format!("invalid fault rates: {error}")),
    }
}

/// `POST /_fake/reset`: zeroes the statistics (tasks and balance stay).
async fn control_reset(State(shared): SharedState) -> Response {
    shared.reset_stats();
    wire::done()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_can_name_what_its_task_costs() {
        assert_eq!(charged("a cat"), None);
        assert_eq!(
            charged("a cat [charge:0.35] in a hat"),
            Some(Ok("0.35".parse().unwrap()))
        );
        assert!(matches!(charged("[charge:lots]"), Some(Err(_))));
        assert!(matches!(charged("[charge:0.35"), Some(Err(_))));
    }

    #[test]
    fn task_ids_have_the_upstream_shape() {
        let id = new_task_id();
        assert_eq!(id.len(), 36);
        assert!(id.starts_with("ta"));
        assert!(Uuid::parse_str(&format!("00{}", &id[2..])).is_ok());
    }
}
