//! `GET /api/task/query?task_id=…`: answered only for the caller's own tasks, from the status
//! cache where it can be.

use std::borrow::Cow;
use std::sync::Arc;

use axum::{body::Body, extract::State, response::Response};
use http::{HeaderValue, StatusCode, Uri, header};
use serde_json::json;

use crate::{
    accounts::refuses_token,
    error::GatewayError,
    headers,
    middleware::facts::{Caller, Facts, RequestFacts},
    state::AppState,
    status_cache::{Answer, Fetched, NotCached, Served},
};
use ketchup_domain::{
    ledger::{FinalStatus, TaskRecord},
    ownership::Lookup,
    settlement::{self, Consumed},
};

/// Longest task id looked up; anything longer cannot be one of ours.
const MAX_TASK_ID_LEN: usize = 256;

fn task_id_of(query: Option<&str>) -> Result<Cow<'_, str>, GatewayError> {
    let query = query.unwrap_or_default();
    let task_id = if query.bytes().any(|b| matches!(b, b'%' | b'+')) {
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(key, _)| key == "task_id")
            .map(|(_, value)| Cow::Owned(value.into_owned()))
    } else {
        // Nothing encoded, so nothing to decode: the pairs as they are, as every client sends.
        query
            .split('&')
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .find(|(key, _)| *key == "task_id")
            .map(|(_, value)| Cow::Borrowed(value))
    }
    .unwrap_or_default();
    if task_id.is_empty() {
        return Err(GatewayError::InvalidRequest("task_id is required".into()));
    }
    Ok(task_id)
}

/// The task the caller owns, as the status read needs it.
struct OwnedTask<'a> {
    task_id: &'a str,
    team: &'a str,
    /// Settled, released or expired, as far as the gateway knows.
    closed: bool,
}

/// The task, if the caller owns it. Another team's task and a task that does not exist get the
/// same answer: nothing tells a team that an id it guessed belongs to someone.
async fn owned_task<'a>(
    state: &AppState,
    team: &'a str,
    task_id: &'a str,
) -> Result<OwnedTask<'a>, GatewayError> {
    if task_id.len() > MAX_TASK_ID_LEN {
        return Err(GatewayError::TaskNotFound);
    }
    let owned = |closed| OwnedTask {
        task_id,
        team,
        closed,
    };
    let counters = &state.metrics.status_reads;
    match state.owners.lookup(task_id, team) {
        Lookup::Owned { closed } => {
            counters.owner_from_memory.inc();
            return Ok(owned(closed));
        }
        Lookup::NotOwned => {
            counters.owner_from_memory.inc();
            return Err(GatewayError::TaskNotFound);
        }
        Lookup::Unknown => counters.owner_from_ledger.inc(),
    }
    let task = state
        .ledger
        .task(task_id)
        .await?
        .ok_or(GatewayError::TaskNotFound)?;
    let closed = task.state.is_closed();
    state.owners.record(task_id, &task.team, closed);
    if task.team == team {
        Ok(owned(closed))
    } else {
        Err(GatewayError::TaskNotFound)
    }
}

pub async fn query(
    State(state): State<Arc<AppState>>,
    Caller { team, .. }: Caller,
    Facts(facts): Facts,
    uri: Uri,
) -> Result<Response, GatewayError> {
    let task_id = task_id_of(uri.query())?;
    facts.set_task_id(&task_id);
    let task = owned_task(&state, &team.name, &task_id).await?;

    let asked = std::time::Instant::now();
    let (served, read) = state
        .status_cache
        .get_or_fetch(&task_id, || read_upstream(&state, &task, &facts))
        .await;
    if served == Served::Coalesced {
        // Waiting on another request's upstream read is waiting on the upstream.
        facts.add_upstream_wait(asked.elapsed());
    }
    if state.status_cache.is_enabled() {
        let counters = &state.metrics.status_reads;
        match served {
            Served::Hit => &counters.cache_hit,
            Served::Miss => &counters.cache_miss,
            Served::Coalesced => &counters.cache_coalesced,
        }
        .inc();
    }
    let answer = match read {
        Ok(answer) => answer,
        Err(not_cached) => match &*not_cached {
            NotCached::Answer(answer) => Arc::new(answer.clone()),
            NotCached::Error(error) => return Err(error.clone()),
        },
    };
    let content_type = answer
        .content_type
        .clone()
        .unwrap_or(HeaderValue::from_static("application/json"));
    let mut response = Response::new(Body::from(answer.body.clone()));
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    // Room for every header the answer leaves with (its type, the cache's verdict, the rate
    // limit's three, the request id, its length), so that the map never grows on the way out.
    headers.reserve(8);
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(headers::CACHE, HeaderValue::from_static(served.as_str()));
    Ok(response)
}

/// One upstream read of a task's status: the miss path of the cache. Settles the task when the
/// status is final (once per read, and the ledger makes it once per task).
async fn read_upstream(
    state: &AppState,
    task: &OwnedTask<'_>,
    facts: &RequestFacts,
) -> Fetched<GatewayError> {
    let (fetched, said) = read_status(state, task.task_id, task.team, facts).await;
    match said {
        // Known to be closed already: nothing to write.
        Said::Final(..) if task.closed => {}
        // The client gets its status even if the ledger is down; the reconciler settles later.
        Said::Final(status, consumed) => match state.ledger.task(task.task_id).await {
            Ok(Some(record)) if record.state.is_closed() => {
                state.owners.record(task.task_id, task.team, true);
            }
            Ok(Some(record)) => {
                if let Err(e) = state
                    .settler
                    .settle(&state.config.load(), &record, status, consumed)
                    .await
                {
                    tracing::warn!(error = %e, "could not settle a finished task");
                }
            }
            Ok(None) => tracing::error!("a task the caller owns is not in the ledger"),
            Err(e) => tracing::warn!(error = %e, "could not settle a finished task"),
        },
        // A client is watching this task, so the reconciler need not read it too. Bookkeeping
        // only: it does not hold up the answer.
        Said::Running if state.recently_observed.contains_key(task.task_id) => {}
        Said::Running => {
            state.recently_observed.insert(task.task_id.to_owned(), ());
            let (ledger, at, task_id) = (
                state.ledger.clone(),
                state.clock.now(),
                task.task_id.to_owned(),
            );
            state.background.spawn(async move {
                if let Err(e) = ledger.mark_observed(&task_id, at).await {
                    tracing::debug!(error = %e, "could not note a status read");
                }
            });
        }
        Said::Nothing => {}
    }
    fetched
}

/// What the upstream itself said of a task's state in one read.
pub(super) enum Said {
    Final(FinalStatus, Consumed),
    Running,
    /// No status of its own: an error, a refusal, or a new task it does not know yet.
    Nothing,
}

/// One upstream read of `task_id`'s status (the team's, which the account-wide limit is
/// counted for), as the status cache keeps it, and what the upstream said in it. Writes
/// nothing: the status read settles from it, a callback checks its claim against it.
pub(super) async fn read_status(
    state: &AppState,
    task_id: &str,
    team: &str,
    facts: &RequestFacts,
) -> (Fetched<GatewayError>, Said) {
    if let Err(refused) = state.rate_limits.check_global(team).await {
        return (Fetched::Failed(refused.into()), Said::Nothing);
    }
    let upstream = match state.query_task(task_id, facts.request_id().as_str()).await {
        // Its account's token, not the team's key: the team is told so.
        Ok(upstream) if refuses_token(upstream.status) => {
            return (
                Fetched::Failed(GatewayError::TaskAccountRefused),
                Said::Nothing,
            );
        }
        Ok(upstream) => upstream,
        Err(e) => return (Fetched::Failed(e), Said::Nothing),
    };
    facts.add_upstream_wait(upstream.elapsed);

    if upstream.status == StatusCode::NOT_FOUND
        && let Some(young) = young_task(state, task_id).await
    {
        return (Fetched::Status(pending(&young)), Said::Nothing);
    }
    if !upstream.status.is_success() {
        let answer = Answer {
            status: upstream.status,
            content_type: upstream.content_type,
            body: upstream.body,
            is_final: false,
        };
        return (Fetched::Uncacheable(answer), Said::Nothing);
    }
    let said = match settlement::final_state_of_query(&upstream.body) {
        Some((status, consumed)) => Said::Final(status, consumed),
        None => Said::Running,
    };
    let answer = Answer {
        status: upstream.status,
        content_type: upstream.content_type,
        body: upstream.body,
        is_final: matches!(said, Said::Final(..)),
    };
    (Fetched::Status(answer), said)
}

/// A task the upstream accepted moments ago can briefly be unknown to its query endpoint. The
/// gateway knows it created the task, so it answers "pending" instead of a 404 that clients
/// would have to retry around. The task's age is the ledger's to tell (a ledger that cannot
/// tell lets the 404 through).
async fn young_task(state: &AppState, task_id: &str) -> Option<TaskRecord> {
    let task = match state.ledger.task(task_id).await {
        Ok(task) => task?,
        Err(e) => {
            tracing::debug!(error = %e, "could not read a task's age");
            return None;
        }
    };
    let grace = state.config.load().upstream.new_task_grace;
    let age = (state.clock.now() - task.created_at).to_std();
    age.map_or(true, |age| age < grace).then_some(task)
}

fn pending(task: &TaskRecord) -> Answer {
    let body = json!({
        "code": 0,
        "message": "ok",
        "data": {
            "result": null,
            "status": "pending",
            "task_id": task.task_id,
            "created_at": task.created_at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
            "status_reason": {"message": null},
        },
    });
    Answer {
        status: StatusCode::OK,
        content_type: Some(HeaderValue::from_static("application/json")),
        body: body.to_string().into(),
        is_final: false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_task_id_is_read_as_a_form_decoder_reads_it() {
        for query in [
            "task_id=ta-1",
            "a=b&task_id=ta-1&task_id=ta-2",
            "task_id=ta%2D1",
            "task_id=ta+1",
            "x=%ZZ&task_id=t",
            "task_id",
            "task_id=",
            "&&task_id=a=b",
            "",
        ] {
            let decoded = url::form_urlencoded::parse(query.as_bytes())
                .find(|(key, _)| key == "task_id")
                .map(|(_, value)| value.into_owned())
                .filter(|id| !id.is_empty());
            let read = super::task_id_of(Some(query))
                .ok()
                .map(|id| id.into_owned());
            assert_eq!(read, decoded, "{query}");
        }
        assert!(super::task_id_of(None).is_err());
    }

    /// The size of the future an async fn of four arguments returns.
    fn future_size<A, B, C, D, F>(_: impl Fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_status_read_does_not_carry_the_upstream_read_in_its_future() {
        // axum moves the handler's future into a box on every request, hits included: with the
        // upstream read inline it was 10 KB; boxed on the miss path alone, about 1 KB.
        let size = future_size(super::query);
        assert!(size <= 2048, "the status read's future is {size} bytes");
    }
}
