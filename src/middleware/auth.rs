//! Authentication, deny by default: every route needs a team key except the few listed in
//! [`access_for`]. A key is looked up by its SHA-256 digest and must be inside its validity
//! window (`not_before`, `expires_at`), else it gets the same 401 as an unknown key; the team it
//! belongs to and the key's name are put in the request's extensions for the handlers, and the
//! key itself goes no further. `/admin/*` takes an admin token instead, and no team key opens
//! it; the admin's label goes in the extensions, for the audit trail.
//!
//! A team key comes as `Authorization: Bearer`, and on the text routes of a dialect whose
//! public clients send their key elsewhere, also where they send it ([`key_places`]).

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};
use std::{borrow::Cow, sync::Arc};

use axum::{
    extract::Request,
    response::{IntoResponse, Response},
};
use futures_util::future::Either;
use http::{HeaderValue, header};
use tower::{Layer, Service};

use super::facts::{Caller, RequestFacts};
use arc_swap::ArcSwap;

use crate::{error::GatewayError, headers, metrics::Metrics};
use ketchup_domain::{
    clock::SharedClock,
    config::{Config, DigestMap, KeyDigest, KeyWindow},
};

/// Who may call a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No key: liveness and readiness probes, metrics, the OpenAPI document.
    Public,
    /// The admin token.
    Admin,
    /// A team key.
    Team,
}

/// The one list of routes that need no key.
pub fn access_for(path: &str) -> Access {
    match path {
        "/healthz" | "/readyz" | "/metrics" | "/openapi.json" => Access::Public,
        // The upstream calls these; the unguessable token in the path is the credential.
        _ if path.starts_with("/callbacks/") => Access::Public,
        _ if path == "/admin" || path.starts_with("/admin/") => Access::Admin,
        _ => Access::Team,
    }
}

/// The label of the admin token an admin request came with, in the request's extensions.
#[derive(Debug, Clone)]
pub struct Admin(pub Arc<str>);

/// The admin tokens' digests, each with its admin's label. Empty, the admin API does not exist.
pub type AdminTokens = Arc<DigestMap<Arc<str>>>;

/// The bearer token of the request's (first) `Authorization` header, for the admin API.
fn bearer(request: &Request) -> Option<&str> {
    bearer_token(request.headers().get(header::AUTHORIZATION)?)?
}

/// One `Authorization` value: its token if the scheme is Bearer, `Some(None)` for another
/// scheme, `None` if it is not readable text with a scheme.
fn bearer_token(value: &HeaderValue) -> Option<Option<&str>> {
    let (scheme, token) = value.to_str().ok()?.split_once(' ')?;
    Some(scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()))
}

/// Where a path's clients may put a team key besides `Authorization: Bearer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyPlaces {
    /// Nowhere else.
    Bearer,
    /// Anthropic messages: the Anthropic clients send their key as `x-api-key`.
    Anthropic,
    /// Gemini: the Google clients send `x-goog-api-key`; the REST examples put it in the
    /// `key` query parameter.
    Gemini,
}

fn key_places(path: &str) -> KeyPlaces {
    match path {
        "/api/v1/messages" => KeyPlaces::Anthropic,
        _ if path.starts_with("/api/v1beta/models/") => KeyPlaces::Gemini,
        _ => KeyPlaces::Bearer,
    }
}

/// The team key a request presents, in any of its path's places. `None` when it presents none,
/// one that is not readable text, or different keys in different places (which team pays would
/// be a guess): each gets the 401 of an unknown key.
fn team_key(request: &Request) -> Option<Cow<'_, str>> {
    let request_headers = request.headers();
    let mut key = None;
    for value in request_headers.get_all(header::AUTHORIZATION) {
        if let Some(bearer) = bearer_token(value)? {
            same_key(&mut key, Cow::Borrowed(bearer))?;
        }
    }
    let places = key_places(request.uri().path());
    let header_name = match places {
        KeyPlaces::Bearer => None,
        KeyPlaces::Anthropic => Some(headers::ANTHROPIC_API_KEY),
        KeyPlaces::Gemini => Some(headers::GOOGLE_API_KEY),
    };
    if let Some(name) = header_name {
        for value in request_headers.get_all(name) {
            same_key(&mut key, Cow::Borrowed(value.to_str().ok()?.trim()))?;
        }
    }
    if places == KeyPlaces::Gemini
        && let Some(query) = request.uri().query()
    {
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            if name == "key" {
                same_key(&mut key, value)?;
            }
        }
    }
    key
}

/// Keeps `key` as the request's key if it is the first found; `None` if it differs from it.
fn same_key<'a>(found: &mut Option<Cow<'a, str>>, key: Cow<'a, str>) -> Option<()> {
    match found {
        Some(first) => (*first == key).then_some(()),
        None => {
            *found = Some(key);
            Some(())
        }
    }
}

/// What authentication reads: the live configuration's keys, the admin tokens, the clock keys'
/// windows are judged by, and the metrics that watch keys.
#[derive(Clone)]
pub struct Keys {
    config: Arc<ArcSwap<Config>>,
    admin_tokens: AdminTokens,
    clock: SharedClock,
    metrics: Arc<Metrics>,
}

impl Keys {
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        admin_tokens: AdminTokens,
        clock: SharedClock,
        metrics: Arc<Metrics>,
    ) -> Self {
        Keys {
            config,
            admin_tokens,
            clock,
            metrics,
        }
    }
}

impl<S> Layer<S> for Keys {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            keys: Arc::new(self.clone()),
            inner,
        }
    }
}

/// The layer's service: a refused request is answered at once, an admitted one goes on to
/// `inner` as it is, without a future of this layer's own.
#[derive(Clone)]
pub struct Authenticate<S> {
    keys: Arc<Keys>,
    inner: S,
}

impl<S> Service<Request> for Authenticate<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        match self.keys.admit(&mut request) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(refused) => Either::Left(ready(Ok(refused.into_response()))),
        }
    }
}

impl Keys {
    /// Lets the request through (with its caller in its facts), or answers it.
    fn admit(&self, request: &mut Request) -> Result<(), GatewayError> {
        match access_for(request.uri().path()) {
            Access::Public => return Ok(()),
            Access::Admin => {
                // Without an admin token the admin API does not exist.
                if self.admin_tokens.is_empty() {
                    return Err(GatewayError::NoSuchRoute {
                        method: request.method().to_string(),
                        path: request.uri().path().chars().take(200).collect(),
                    });
                }
                // Looked up by digest, as team keys are: the time taken says nothing of the token.
                let presented = bearer(request).map(KeyDigest::of);
                let Some(label) = presented.and_then(|digest| self.admin_tokens.get(&digest))
                else {
                    return Err(GatewayError::InvalidApiKey);
                };
                let facts = RequestFacts::of(request.extensions())?;
                facts.set_team("admin");
                facts.set_key(label.clone());
                request.extensions_mut().insert(Admin(label.clone()));
                return Ok(());
            }
            Access::Team => {}
        }
        let Some(digest) = team_key(request).map(|key| KeyDigest::of(&key)) else {
            return Err(GatewayError::InvalidApiKey);
        };
        let config = self.config.load();
        let Some(entry) = config.key_by_digest(&digest) else {
            return Err(GatewayError::InvalidApiKey);
        };
        let facts = RequestFacts::of(request.extensions())?;
        // The request's log line names the team and key label whether or not the key is in its
        // window: an operator asking why a team gets 401 finds the expired key there.
        facts.set_key(entry.label.clone());
        let now = self.clock.now();
        match entry.window_at(now) {
            KeyWindow::Valid => {
                self.metrics.keys.used(&digest, now);
                facts.set_caller(Caller {
                    key: entry.name(&digest),
                    team: entry.team.clone(),
                });
                Ok(())
            }
            outside => {
                facts.set_team(&entry.team.name);
                self.metrics.keys.refused(&digest, entry, outside);
                Err(GatewayError::InvalidApiKey)
            }
        }
    }
}
