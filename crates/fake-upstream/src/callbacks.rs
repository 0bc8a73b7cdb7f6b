//! Webhooks: a ticker notices tasks that became final and POSTs their CallbackPayload once.
//!
//! Finality is checked against the fake's clock on a short real-time tick (not by sleeping until
//! a deadline), so moving a [`ManualClock`](ketchup_domain::clock::ManualClock) forward fires callbacks too.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use super::state::{Recorder, Shared};
use super::wire::CallbackPayload;

/// How often the ticker looks for due callbacks.
const TICK: Duration = Duration::from_millis(20);
/// Deliveries attempted per callback before it counts as failed.
const ATTEMPTS: u32 = 3;
const RETRY_DELAY: Duration = Duration::from_millis(200);
/// One attempt's limit, so a receiver that never answers cannot hold a delivery forever.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Runs until aborted; deliveries in flight live in a `JoinSet` here and die with it.
pub(crate) async fn run(shared: Arc<Shared>) {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut deliveries = JoinSet::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let now = shared.clock.now();
                for due in shared.take_due_callbacks(now) {
                    if let Some(body) = payload(&shared, &due.task_id) {
                        deliveries.spawn(deliver(client.clone(), due.url, body, shared.clone()));
                    }
                }
            }
            Some(_) = deliveries.join_next(), if !deliveries.is_empty() => {}
        }
    }
}

/// The serialized payload of a task that is final now.
fn payload(shared: &Shared, task_id: &str) -> Option<Bytes> {
    let task = shared.tasks.get(task_id)?;
    let status = task.status(shared.clock.now(), &shared.schedule);
    let payload = CallbackPayload::new(&shared.files_url, task_id, &task, status)?;
    serde_json::to_vec(&payload).ok().map(Bytes::from)
}

/// POSTs `body` to `url`, retrying a failed attempt (error, timeout or non-2xx) a few times.
async fn deliver(client: HttpClient, url: Uri, body: Bytes, shared: Arc<Shared>) {
    for attempt in 1..=ATTEMPTS {
        let request = Request::post(url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()));
        let outcome = match request {
            Ok(request) => tokio::time::timeout(ATTEMPT_TIMEOUT, client.request(request))
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|sent| sent.map_err(|error| error.to_string()))
                .and_then(|response| match response.status() {
                    status if status.is_success() => Ok(()),
                    status => Err(format!("answered {status}")),
                }),
            Err(error) => Err(error.to_string()),
        };
        match outcome {
            Ok(()) => {
                Recorder::count(&shared.stats.callbacks_sent);
                return;
            }
            Err(error) => tracing::debug!(%url, attempt, %error, "fake upstream: callback failed"),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(RETRY_DELAY).await;
        }
    }
    Recorder::count(&shared.stats.callbacks_failed);
}
