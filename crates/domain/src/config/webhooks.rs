//! `[webhooks]`: callbacks from the upstream and the deliveries to teams they lead to.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::values::{HumanDuration, above_zero};
use super::{Invalid, span_of};

const DEFAULT_DELIVERY_DEADLINE: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_FIRST_RETRY: Duration = Duration::from_secs(5);
const DEFAULT_MAX_RETRY_DELAY: Duration = Duration::from_secs(3600);
const DEFAULT_MAX_CONCURRENT_DELIVERIES: usize = 32;
const DEFAULT_MAX_CONCURRENT_DELIVERIES_PER_TEAM: usize = 8;
const DEFAULT_MAX_CALLBACK_BYTES: usize = 32 << 20;
const DEFAULT_KEEP_FINISHED: Duration = Duration::from_secs(7 * 24 * 3600);

/// `[webhooks]` as written; a key left out takes the default above.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhooks {
    pub(super) always_intercept: Option<Spanned<bool>>,
    delivery_deadline: Option<HumanDuration>,
    attempt_timeout: Option<Spanned<HumanDuration>>,
    first_retry: Option<Spanned<HumanDuration>>,
    max_retry_delay: Option<Spanned<HumanDuration>>,
    max_concurrent_deliveries: Option<Spanned<usize>>,
    max_concurrent_deliveries_per_team: Option<Spanned<usize>>,
    max_callback_bytes: Option<Spanned<usize>>,
    keep_finished: Option<Spanned<HumanDuration>>,
}

/// Callbacks from the upstream and deliveries to teams (used when `server.public_url` is set).
#[derive(Debug, Clone)]
pub struct WebhooksConfig {
    /// Register the gateway's callback even for generations that gave no `callback_url`, so
    /// every task settles by push rather than by polling.
    pub always_intercept: bool,
    /// A delivery still failing this long after the callback arrived is dead-lettered.
    pub delivery_deadline: Duration,
    /// One delivery attempt's limit, connecting included.
    pub attempt_timeout: Duration,
    /// Wait before the first retry; each further retry waits about twice as long.
    pub first_retry: Duration,
    pub max_retry_delay: Duration,
    /// Deliveries attempted at once; a slow receiver holds one of these, never the others.
    pub max_concurrent_deliveries: usize,
    /// Deliveries to one team attempted at once, so that a team's receivers that never answer
    /// hold only this share of the slots and other teams' deliveries still go out.
    pub max_concurrent_deliveries_per_team: usize,
    /// Largest upstream callback accepted, in bytes. Apart from `server.max_body_bytes`: a
    /// callback's images may be base64 data URIs, far larger than any request a team sends.
    pub max_callback_bytes: usize,
    /// A delivered or dead delivery is listed this long after it ended, then deleted.
    pub keep_finished: Duration,
}

impl TryFrom<RawWebhooks> for WebhooksConfig {
    type Error = Invalid;

    fn try_from(raw: RawWebhooks) -> Result<Self, Invalid> {
        let first_retry_span = span_of(&raw.first_retry);
        let first_retry = above_zero(
            "[webhooks] first_retry",
            raw.first_retry,
            DEFAULT_FIRST_RETRY,
        )?;
        let max_retry_delay = match raw.max_retry_delay {
            Some(written) if Duration::from(*written.get_ref()) < first_retry => {
                return Err(Invalid::at(
                    written.span(),
                    "[webhooks] max_retry_delay must be at least first_retry",
                ));
            }
            Some(written) => written.into_inner().into(),
            None if DEFAULT_MAX_RETRY_DELAY < first_retry => {
                return Err(Invalid::new(
                    first_retry_span,
                    format!(
                        "[webhooks] first_retry must be at most max_retry_delay ({} unless set)",
                        humantime::format_duration(DEFAULT_MAX_RETRY_DELAY)
                    ),
                ));
            }
            None => DEFAULT_MAX_RETRY_DELAY,
        };
        Ok(WebhooksConfig {
            always_intercept: raw.always_intercept.is_some_and(Spanned::into_inner),
            delivery_deadline: raw
                .delivery_deadline
                .map_or(DEFAULT_DELIVERY_DEADLINE, Duration::from),
            attempt_timeout: above_zero(
                "[webhooks] attempt_timeout",
                raw.attempt_timeout,
                DEFAULT_ATTEMPT_TIMEOUT,
            )?,
            first_retry,
            max_retry_delay,
            max_concurrent_deliveries: above_zero(
                "[webhooks] max_concurrent_deliveries",
                raw.max_concurrent_deliveries,
                DEFAULT_MAX_CONCURRENT_DELIVERIES,
            )?,
            max_concurrent_deliveries_per_team: above_zero(
                "[webhooks] max_concurrent_deliveries_per_team",
                raw.max_concurrent_deliveries_per_team,
                DEFAULT_MAX_CONCURRENT_DELIVERIES_PER_TEAM,
            )?,
            max_callback_bytes: above_zero(
                "[webhooks] max_callback_bytes",
                raw.max_callback_bytes,
                DEFAULT_MAX_CALLBACK_BYTES,
            )?,
            keep_finished: above_zero(
                "[webhooks] keep_finished",
                raw.keep_finished,
                DEFAULT_KEEP_FINISHED,
            )?,
        })
    }
}

impl WebhooksConfig {
    /// The keys whose new value only a restart applies: the delivery worker takes its number of
    /// slots when it starts.
    pub(super) fn restart_only_changes(&self, new: &Self) -> Vec<&'static str> {
        let WebhooksConfig {
            max_concurrent_deliveries,
            // Read by each callback, claim or attempt.
            always_intercept: _,
            delivery_deadline: _,
            attempt_timeout: _,
            first_retry: _,
            max_retry_delay: _,
            max_concurrent_deliveries_per_team: _,
            max_callback_bytes: _,
            keep_finished: _,
        } = self;
        super::changed([(
            "max_concurrent_deliveries",
            *max_concurrent_deliveries != new.max_concurrent_deliveries,
        )])
    }
}
