//! The upstream's bodies, byte for byte as the contract shows them. Field order follows the
//! captured real responses (struct order is serialization order).

use axum::Json;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use http::StatusCode;
use serde::Serialize;
use serde_json::Value;

use super::state::{FAILURE_REASON, Task, TaskStatus};

/// `{"code":0,"message":"ok","data":…}`
#[derive(Serialize)]
pub(crate) struct Envelope<T> {
    code: i32,
    message: &'static str,
    data: T,
}

/// `{"code":…,"message":…}` plus `detail` for 400s.
#[derive(Serialize)]
pub(crate) struct Plain {
    code: i32,
    message: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

/// A success answer: 200 with the data in the envelope.
pub(crate) fn ok<T: Serialize>(data: T) -> Response {
    Json(Envelope {
        code: 0,
        message: "ok",
        data,
    })
    .into_response()
}

/// `200 {"code":0,"message":"ok"}`, for control calls with nothing to return.
pub(crate) fn done() -> Response {
    plain(StatusCode::OK, 0, "ok", None)
}

/// `400 {"code":1,"message":"failed","detail":…}`
pub(crate) fn bad_request(detail: impl Into<String>) -> Response {
    plain(StatusCode::BAD_REQUEST, 1, "failed", Some(detail.into()))
}

/// The 401 of the generation and user endpoints.
pub(crate) fn unauthorized() -> Response {
    plain(StatusCode::UNAUTHORIZED, 1, "Invalid API key", None)
}

/// The 401 of the query endpoint: the guides print `code` 401 there, not 1.
pub(crate) fn unauthorized_query() -> Response {
    plain(StatusCode::UNAUTHORIZED, 401, "Invalid API key", None)
}

pub(crate) fn task_not_found() -> Response {
    plain(StatusCode::NOT_FOUND, 1, "task not found", None)
}

pub(crate) fn route_not_found() -> Response {
    plain(StatusCode::NOT_FOUND, 1, "not found", None)
}

pub(crate) fn internal_error() -> Response {
    plain(
        StatusCode::INTERNAL_SERVER_ERROR,
        1,
        "internal server error",
        None,
    )
}

fn plain(status: StatusCode, code: i32, message: &'static str, detail: Option<String>) -> Response {
    (
        status,
        Json(Plain {
            code,
            message,
            detail,
        }),
    )
        .into_response()
}

/// `data` of a generation answer.
#[derive(Serialize)]
pub(crate) struct Created<'a> {
    pub task_id: &'a str,
}

#[derive(Serialize)]
pub(crate) struct StatusReason {
    message: Option<&'static str>,
}

/// `data` of a task query: the callback fields plus `created_at`, `consumed` only once final.
#[derive(Serialize)]
pub(crate) struct TaskData<'a> {
    result: Option<Value>,
    status: TaskStatus,
    task_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    consumed: Option<String>,
    created_at: String,
    status_reason: StatusReason,
}

/// The webhook body (CallbackPayload); `consumed` has six places here.
#[derive(Serialize)]
pub(crate) struct CallbackPayload<'a> {
    result: Option<Value>,
    status: TaskStatus,
    task_id: &'a str,
    consumed: String,
    status_reason: StatusReason,
}

impl<'a> TaskData<'a> {
    /// `files`: where the result's files are served.
    pub fn new(files: &str, task_id: &'a str, task: &Task, status: TaskStatus) -> Self {
        TaskData {
            result: result(files, task_id, task, status),
            status,
            task_id,
            consumed: task.consumed(status).map(|c| c.format_places(8)),
            created_at: rfc3339_millis(task.created_at),
            status_reason: status_reason(status),
        }
    }
}

impl<'a> CallbackPayload<'a> {
    /// The payload for a task that is final; `None` while it is not.
    pub fn new(files: &str, task_id: &'a str, task: &Task, status: TaskStatus) -> Option<Self> {
        Some(CallbackPayload {
            result: result(files, task_id, task, status),
            status,
            task_id,
            consumed: task.consumed(status)?.format_places(6),
            status_reason: status_reason(status),
        })
    }
}

/// The result of a success, in its endpoint's shape; null before the end and on failure.
fn result(files: &str, task_id: &str, task: &Task, status: TaskStatus) -> Option<Value> {
    (status == TaskStatus::Success).then(|| task.endpoint.result(files, task_id, task.images))
}

fn status_reason(status: TaskStatus) -> StatusReason {
    StatusReason {
        message: (status == TaskStatus::Failed).then_some(FAILURE_REASON),
    }
}

/// `2025-09-10T10:22:20.010Z`, as in the captured response.
fn rfc3339_millis(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ketchup_domain::credits::Credits;

    const FILES: &str = "https://fake-upstream.invalid";

    fn task(fails: bool) -> Task {
        let created = "2025-09-10T10:22:20.010Z".parse().expect("valid time");
        let endpoint = crate::catalog::endpoint("/api/image/gen").unwrap();
        Task::new(
            endpoint,
            "m".into(),
            created,
            2,
            Credits::from_units(100_000),
            fails,
        )
    }

    #[test]
    fn query_data_matches_the_captured_shape() {
        let json = serde_json::to_string(&TaskData::new(
            FILES,
            "ta1",
            &task(false),
            TaskStatus::Success,
        ))
        .expect("serializes");
        assert_eq!(
            json,
            r#"{"result":[{"image":"https://fake-upstream.invalid/images/ta1/0.png"},{"image":"https://fake-upstream.invalid/images/ta1/1.png"}],"status":"success","task_id":"ta1","consumed":"0.00100000","created_at":"2025-09-10T10:22:20.010Z","status_reason":{"message":null}}"#
        );
        let json = serde_json::to_string(&TaskData::new(
            FILES,
            "ta1",
            &task(false),
            TaskStatus::InProgress,
        ))
        .expect("serializes");
        assert_eq!(
            json,
            r#"{"result":null,"status":"in_progress","task_id":"ta1","created_at":"2025-09-10T10:22:20.010Z","status_reason":{"message":null}}"#
        );
    }

    #[test]
    fn callback_payload_has_six_places_and_only_exists_when_final() {
        let failed = CallbackPayload::new(FILES, "ta1", &task(true), TaskStatus::Failed);
        let json = serde_json::to_string(&failed).expect("serializes");
        assert_eq!(
            json,
            r#"{"result":null,"status":"failed","task_id":"ta1","consumed":"0.000000","status_reason":{"message":"content policy violation"}}"#
        );
        assert!(CallbackPayload::new(FILES, "ta1", &task(false), TaskStatus::Submitted).is_none());
    }
}
