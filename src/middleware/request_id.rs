//! Gives every request an id: the caller's `X-Request-Id` if it is a sane token, otherwise a new
//! UUIDv7. The id is logged, forwarded upstream and returned to the caller.
//!
//! tower-http's `SetRequestId` would keep any client value verbatim; this one bounds it, because
//! the id ends up in our logs and in the upstream's.

use std::sync::Arc;

use axum::{extract::Request, middleware::Next, response::Response};
use http::HeaderValue;

use crate::headers::REQUEST_ID as HEADER;

const MAX_LEN: usize = 128;

/// The request's id, in the request's extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub Arc<str>);

impl RequestId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn acceptable(value: &HeaderValue) -> Option<&str> {
    let text = value.to_str().ok()?;
    let sane = !text.is_empty()
        && text.len() <= MAX_LEN
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    sane.then_some(text)
}

pub async fn assign(mut request: Request, next: Next) -> Response {
    let id: Arc<str> = match request.headers().get(HEADER).and_then(acceptable) {
        Some(given) => given.into(),
        // Without the crate's shared context, whose lock every worker would take in turn: ids
        // made in the same millisecond need not sort in the order they were made.
        None => uuid::Uuid::new_v7(uuid::Timestamp::now(uuid::NoContext))
            .to_string()
            .into(),
    };
    let header = HeaderValue::from_str(&id).expect("request ids are header-safe by construction");
    request.headers_mut().insert(HEADER, header.clone());
    request.extensions_mut().insert(RequestId(id));
    let mut response = next.run(request).await;
    response.headers_mut().insert(HEADER, header);
    response
}
