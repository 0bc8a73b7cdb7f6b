//! The header names the gateway adds to requests and answers, made once rather than parsed
//! from a string on every use.

use http::HeaderName;

/// The request's id: the caller's if sane, else a new one; logged, forwarded upstream and
/// returned.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// A team key as the Anthropic clients send it, taken on the messages route only.
pub const ANTHROPIC_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// A team key as the Google clients send it, taken on the Gemini routes only.
pub const GOOGLE_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");
/// `hit`, `miss` or `coalesced`: how a status read was served by the status cache.
pub const CACHE: HeaderName = HeaderName::from_static("x-cache");
/// The team's credits left this period, on an accepted generation or text answer.
pub const BUDGET_REMAINING: HeaderName = HeaderName::from_static("x-budget-remaining");
/// When the team's budget period ends, on an accepted generation or text answer.
pub const BUDGET_RESET: HeaderName = HeaderName::from_static("x-budget-reset");
/// A generation's Idempotency-Key (draft-ietf-httpapi-idempotency-key-header).
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// `true` on an answer replayed for a repeat of an Idempotency-Key's request.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The rate limit that applied (IETF draft `RateLimit-*` fields).
pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
