//! `[upstream]`: the Ketchup API, the account's token and how the gateway talks to it.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Invalid;
use super::values::{HttpUrl, HumanDuration, SecretSource, above_zero, secret_source};

const DEFAULT_BASE_URL: &str = "https://api.defapi.org";
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How many reference images `/api/image/gen` takes unless `max_reference_images` says otherwise.
pub const DEFAULT_MAX_REFERENCE_IMAGES: usize = 4;
const DEFAULT_MAX_REQUESTS_PER_SECOND: NonZeroU32 = NonZeroU32::new(50).unwrap();
const DEFAULT_NEW_TASK_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_QUERY_RETRIES: usize = 2;
const DEFAULT_BALANCE_CHECK: Duration = Duration::from_secs(5 * 60);
/// More often would spend the account's request limit on watching it.
const MIN_BALANCE_CHECK: Duration = Duration::from_secs(1);

/// Waits between upstream attempts: doubling from the first, jittered up to twice as long.
pub const FIRST_RETRY_DELAY: Duration = Duration::from_millis(50);
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);

/// `[upstream]` as written; a key left out takes the default above.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    base_url: Option<HttpUrl>,
    token_env: Option<Spanned<String>>,
    token_file: Option<Spanned<PathBuf>>,
    connect_timeout: Option<Spanned<HumanDuration>>,
    timeout: Option<Spanned<HumanDuration>>,
    max_reference_images: Option<usize>,
    max_requests_per_second: Option<NonZeroU32>,
    new_task_grace: Option<HumanDuration>,
    query_retries: Option<usize>,
    balance_check: Option<Spanned<HumanDuration>>,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub base_url: url::Url,
    pub token: SecretSource,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub max_reference_images: usize,
    pub max_requests_per_second: NonZeroU32,
    pub new_task_grace: Duration,
    pub query_retries: usize,
    /// How often the account's own balance is read; `None`: never.
    pub balance_check: Option<Duration>,
}

impl TryFrom<Spanned<RawUpstream>> for UpstreamConfig {
    type Error = Invalid;

    fn try_from(raw: Spanned<RawUpstream>) -> Result<Self, Invalid> {
        let table = raw.span();
        let raw = raw.into_inner();
        let token = secret_source("[upstream]", "token", raw.token_env, raw.token_file)?
            .ok_or_else(|| {
                Invalid::at(
                    table,
                    "[upstream] needs token_env or token_file: the upstream token is never \
                     written in this file",
                )
            })?;
        Ok(UpstreamConfig {
            base_url: raw.base_url.map_or_else(
                || url::Url::parse(DEFAULT_BASE_URL).expect("a valid default URL"),
                |url| url.0,
            ),
            token,
            connect_timeout: above_zero(
                "[upstream] connect_timeout",
                raw.connect_timeout,
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            timeout: above_zero("[upstream] timeout", raw.timeout, DEFAULT_TIMEOUT)?,
            max_reference_images: raw
                .max_reference_images
                .unwrap_or(DEFAULT_MAX_REFERENCE_IMAGES),
            max_requests_per_second: raw
                .max_requests_per_second
                .unwrap_or(DEFAULT_MAX_REQUESTS_PER_SECOND),
            new_task_grace: raw
                .new_task_grace
                .map_or(DEFAULT_NEW_TASK_GRACE, Duration::from),
            query_retries: raw.query_retries.unwrap_or(DEFAULT_QUERY_RETRIES),
            balance_check: balance_check(raw.balance_check)?,
        })
    }
}

/// `balance_check`: `"0s"` turns the check off; otherwise at least [`MIN_BALANCE_CHECK`].
fn balance_check(raw: Option<Spanned<HumanDuration>>) -> Result<Option<Duration>, Invalid> {
    let Some(raw) = raw else {
        return Ok(Some(DEFAULT_BALANCE_CHECK));
    };
    let span = raw.span();
    match Duration::from(raw.into_inner()) {
        Duration::ZERO => Ok(None),
        every if every < MIN_BALANCE_CHECK => Err(Invalid::at(
            span,
            "[upstream] balance_check must be \"0s\" (off) or at least \"1s\"",
        )),
        every => Ok(Some(every)),
    }
}

impl UpstreamConfig {
    /// The longest a generation can wait on the upstream: every connection attempt up to
    /// `connect_timeout`, the waits between them, then the answer up to `timeout`.
    pub fn longest_generation(&self) -> Duration {
        let retries = u32::try_from(self.query_retries).unwrap_or(u32::MAX);
        let waits: Duration = (0..retries.min(16))
            .map(|i| (FIRST_RETRY_DELAY * 2u32.pow(i)).min(MAX_RETRY_DELAY) * 2)
            .sum();
        let connecting = self
            .connect_timeout
            .checked_mul(retries.saturating_add(1))
            .unwrap_or(Duration::MAX);
        self.timeout
            .saturating_add(connecting)
            .saturating_add(waits)
    }

    /// The keys whose new value only a restart applies: the upstream client, with its
    /// connection pools, token, timeouts and retries, is built once, at start.
    pub(super) fn restart_only_changes(&self, new: &Self) -> Vec<&'static str> {
        let UpstreamConfig {
            base_url,
            token,
            connect_timeout,
            timeout,
            query_retries,
            // Read by each request, or taken on by the rate limits at reload.
            max_reference_images: _,
            max_requests_per_second: _,
            new_task_grace: _,
            // The balance check reads it before each wait.
            balance_check: _,
        } = self;
        super::changed([
            ("base_url", *base_url != new.base_url),
            ("token_env or token_file", *token != new.token),
            ("connect_timeout", *connect_timeout != new.connect_timeout),
            ("timeout", *timeout != new.timeout),
            ("query_retries", *query_retries != new.query_retries),
        ])
    }
}
