//! What layers and handlers learn about a request, in one place per request: made by the outer
//! layer when the request comes in, filled in on the way (the caller by authentication, the task
//! id by the handler, the time spent on the upstream), and read at the end by the request's
//! metrics and its closing log line. Handlers take it, or the caller alone, as an argument:
//! [`Facts`], [`Caller`].
//!
//! Kept here rather than recorded on the request's span: a field recorded on a span after it
//! was made costs the JSON log format a parse and a rewrite of all its fields each time. And one
//! extension for all of it, rather than one per part: each costs the request an allocation and
//! a lookup by type.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{FromRequestParts, MatchedPath};
use http::request::Parts;

use super::request_id::RequestId;
use crate::{error::GatewayError, logging};
use ketchup_domain::config::Team;

/// The authenticated caller: its team, and the name of the key it used
/// ([`ketchup_domain::config::KeyEntry::name`]), which its reservations record as the key that
/// spent.
#[derive(Debug, Clone)]
pub struct Caller {
    pub team: Arc<Team>,
    pub key: Arc<str>,
}

#[derive(Debug)]
pub struct RequestFacts {
    /// Known when the request comes in.
    request_id: RequestId,
    method: http::Method,
    route: Option<MatchedPath>,
    caller: OnceLock<Caller>,
    /// The team a request without a caller is logged and counted under: an admin's, a key's
    /// outside its validity window, a callback's task's.
    team: OnceLock<String>,
    /// The label of the key the request came with, valid or not.
    key: OnceLock<Arc<str>>,
    task_id: OnceLock<String>,
    upstream_wait_micros: AtomicU64,
    waited_on_upstream: AtomicBool,
}

impl RequestFacts {
    pub fn new(request_id: RequestId, method: http::Method, route: Option<MatchedPath>) -> Self {
        RequestFacts {
            request_id,
            method,
            route,
            caller: OnceLock::new(),
            team: OnceLock::new(),
            key: OnceLock::new(),
            task_id: OnceLock::new(),
            upstream_wait_micros: AtomicU64::new(0),
            waited_on_upstream: AtomicBool::new(false),
        }
    }

    pub fn request_id(&self) -> &RequestId {
        &self.request_id
    }

    pub fn method(&self) -> &str {
        self.method.as_str()
    }

    /// The route template (`/api/task/query`), or `unmatched`: the one value the request's
    /// span, its closing line and its metrics label it with.
    pub fn route(&self) -> &str {
        self.route.as_ref().map_or("unmatched", MatchedPath::as_str)
    }

    /// The team key's caller, once authentication admitted it.
    pub fn set_caller(&self, caller: Caller) {
        let _ = self.caller.set(caller);
    }

    pub fn caller(&self) -> Option<&Caller> {
        self.caller.get()
    }

    pub fn set_team(&self, team: &str) {
        let _ = self.team.set(team.to_owned());
    }

    /// The label of the key the caller used (never the key).
    pub fn set_key(&self, label: Arc<str>) {
        let _ = self.key.set(label);
    }

    pub fn set_task_id(&self, task_id: &str) {
        let _ = self.task_id.set(task_id.to_owned());
    }

    /// Adds time spent waiting on the upstream (or on another request's upstream read).
    pub fn add_upstream_wait(&self, wait: Duration) {
        let micros = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
        self.upstream_wait_micros
            .fetch_add(micros, Ordering::Relaxed);
        self.waited_on_upstream.store(true, Ordering::Relaxed);
    }

    /// The caller's team, else the team the request was named under.
    pub fn team(&self) -> Option<&str> {
        match self.caller.get() {
            Some(caller) => Some(&caller.team.name),
            None => self.team.get().map(String::as_str),
        }
    }

    pub fn key(&self) -> Option<&str> {
        self.key.get().map(|label| &**label)
    }

    pub fn task_id(&self) -> Option<&str> {
        self.task_id.get().map(String::as_str)
    }

    /// How long the request waited on the upstream, if it did at all.
    pub fn upstream_wait(&self) -> Option<Duration> {
        self.waited_on_upstream
            .load(Ordering::Relaxed)
            .then(|| Duration::from_micros(self.upstream_wait_micros.load(Ordering::Relaxed)))
    }
}

/// Lines logged while the request is served name it by these (see [`logging::InRequest`]).
impl logging::RequestContext for RequestFacts {
    fn request_id(&self) -> &str {
        self.request_id.as_str()
    }
    fn method(&self) -> &str {
        RequestFacts::method(self)
    }
    fn route(&self) -> &str {
        RequestFacts::route(self)
    }
}

impl RequestFacts {
    /// The facts in a request's extensions, where the outer layer put them.
    pub fn of(extensions: &http::Extensions) -> Result<&Arc<RequestFacts>, GatewayError> {
        extensions
            .get::<Arc<RequestFacts>>()
            .ok_or_else(|| GatewayError::Internal("a request without its facts".into()))
    }
}

/// A handler's argument: the request's facts.
pub struct Facts(pub Arc<RequestFacts>);

impl<S: Sync> FromRequestParts<S> for Facts {
    type Rejection = GatewayError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, GatewayError> {
        RequestFacts::of(&parts.extensions).map(|facts| Facts(facts.clone()))
    }
}

/// A handler's argument: the caller authentication admitted. Only the routes that take a team
/// key have one.
impl<S: Sync> FromRequestParts<S> for Caller {
    type Rejection = GatewayError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, GatewayError> {
        RequestFacts::of(&parts.extensions)?
            .caller()
            .cloned()
            .ok_or_else(|| GatewayError::Internal("a team route without its caller".into()))
    }
}
