//! Authentication, deny by default: every route needs a team key except the few listed in
//! [`access_for`]. A key is looked up by its SHA-256 digest and must be inside its validity
//! window (`not_before`, `expires_at`), else it gets the same 401 as an unknown key; the team it
//! belongs to is put in the request's extensions for the handlers, and the key itself goes no
//! further. `/admin/*` takes the admin token instead, and no team key opens it.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::{
    extract::Request,
    response::{IntoResponse, Response},
};
use futures_util::future::Either;
use http::header;
use tower::{Layer, Service};

use super::request_metrics::RequestFacts;
use arc_swap::ArcSwap;

use crate::{error::GatewayError, metrics::Metrics};
use ketchup_domain::{
    clock::SharedClock,
    config::{Config, KeyDigest, KeyWindow, Team},
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

/// The authenticated team, in the request's extensions.
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<Team>);

fn bearer(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// What authentication reads: the live configuration's keys, the admin token's digest, the
/// clock keys' windows are judged by, and the metrics that watch keys.
#[derive(Clone)]
pub struct Keys {
    config: Arc<ArcSwap<Config>>,
    /// `None` turns the admin API off.
    admin_token_digest: Option<KeyDigest>,
    clock: SharedClock,
    metrics: Arc<Metrics>,
}

impl Keys {
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        admin_token_digest: Option<KeyDigest>,
        clock: SharedClock,
        metrics: Arc<Metrics>,
    ) -> Self {
        Keys {
            config,
            admin_token_digest,
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
            Ok(()) => {
                // The service that was made ready is the one called; its clone waits for the next.
                let ready = self.inner.clone();
                Either::Right(std::mem::replace(&mut self.inner, ready).call(request))
            }
            Err(refused) => Either::Left(ready(Ok(refused.into_response()))),
        }
    }
}

impl Keys {
    /// Lets the request through (with its team in its extensions), or answers it.
    fn admit(&self, request: &mut Request) -> Result<(), GatewayError> {
        match access_for(request.uri().path()) {
            Access::Public => return Ok(()),
            Access::Admin => {
                let presented = bearer(request).map(KeyDigest::of);
                return match self.admin_token_digest {
                    // Without an admin token the admin API does not exist.
                    None => Err(GatewayError::NoSuchRoute {
                        method: request.method().to_string(),
                        path: request.uri().path().chars().take(200).collect(),
                    }),
                    // Digests of equal length are compared, so the time taken says nothing useful.
                    Some(expected) if presented == Some(expected) => {
                        if let Some(facts) = request.extensions().get::<Arc<RequestFacts>>() {
                            facts.set_team("admin");
                        }
                        Ok(())
                    }
                    Some(_) => Err(GatewayError::InvalidApiKey),
                };
            }
            Access::Team => {}
        }
        let Some(digest) = bearer(request).map(KeyDigest::of) else {
            return Err(GatewayError::InvalidApiKey);
        };
        let config = self.config.load();
        let Some(entry) = config.key_by_digest(&digest) else {
            return Err(GatewayError::InvalidApiKey);
        };
        // The request's log line names the team and key label whether or not the key is in its
        // window: an operator asking why a team gets 401 finds the expired key there.
        if let Some(facts) = request.extensions().get::<Arc<RequestFacts>>() {
            facts.set_team(&entry.team.name);
            facts.set_key(entry.label.clone());
        }
        let now = self.clock.now();
        match entry.window_at(now) {
            KeyWindow::Valid => {
                self.metrics.keys.used(&digest, now);
                request.extensions_mut().insert(Caller(entry.team.clone()));
                Ok(())
            }
            outside => {
                self.metrics.keys.refused(&digest, entry, outside);
                Err(GatewayError::InvalidApiKey)
            }
        }
    }
}
