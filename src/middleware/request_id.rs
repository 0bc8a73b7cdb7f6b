//! Gives every request an id: the caller's `X-Request-Id` if it is a sane token, otherwise a new
//! UUIDv7. The id is logged, forwarded upstream and returned to the caller. It lives in the
//! request's facts ([`RequestFacts`](super::facts::RequestFacts)), which handlers
//! extract it from.
//!
//! tower-http's `SetRequestId` would keep any client value verbatim; this one bounds it, because
//! the id ends up in our logs and in the upstream's.

use std::sync::Arc;

use axum::extract::Request;
use http::HeaderValue;

use crate::headers::REQUEST_ID as HEADER;

const MAX_LEN: usize = 128;

/// The request's id.
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

/// The request's id, with the header value the response carries back.
pub fn assign(request: &Request) -> (RequestId, HeaderValue) {
    let (id, header): (Arc<str>, HeaderValue) =
        match request.headers().get(HEADER).and_then(acceptable) {
            // The caller's header, kept as it came: its value is already the one to return.
            Some(given) => (given.into(), request.headers()[HEADER].clone()),
            None => {
                // Without the crate's shared context, whose lock every worker would take in
                // turn: ids made in the same millisecond need not sort in the order they were
                // made. Written on the stack, so the id costs one allocation for its text.
                let uuid = uuid::Uuid::new_v7(uuid::Timestamp::now(uuid::NoContext));
                let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
                let text: &str = uuid.hyphenated().encode_lower(&mut text);
                let header = HeaderValue::from_str(text)
                    .expect("request ids are header-safe by construction");
                (text.into(), header)
            }
        };
    (RequestId(id), header)
}
