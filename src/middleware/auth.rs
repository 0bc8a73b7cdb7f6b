//! Authentication, deny by default: every route needs a team key except the few listed in
//! [`access_for`]. A key is looked up by its SHA-256 digest; the team it belongs to is put in the
//! request's extensions for the handlers, and the key itself goes no further.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http::header;

use crate::{app::AppState, config::Team, error::GatewayError};

/// Who may call a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No key: liveness and readiness probes.
    Public,
    /// A team key.
    Team,
}

/// The one list of routes that need no key.
pub fn access_for(path: &str) -> Access {
    match path {
        "/healthz" | "/readyz" => Access::Public,
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

pub async fn authenticate(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    if access_for(request.uri().path()) == Access::Public {
        return next.run(request).await;
    }
    let entry = bearer(&request).and_then(|key| state.config.load().key(key).cloned());
    match entry {
        Some(entry) => {
            let span = tracing::Span::current();
            span.record("team", entry.team.name.as_str());
            span.record("key", &*entry.label);
            request.extensions_mut().insert(Caller(entry.team));
            next.run(request).await
        }
        None => GatewayError::InvalidApiKey.into_response(),
    }
}
