//! `[upstream]`: the Ketchup API, the accounts whose tokens the gateway sends, and how it talks
//! to it.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Invalid;
use super::values::{HttpUrl, HumanDuration, SecretSource, above_zero, secret_source};
use crate::credits::Credits;

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

/// The name of the one account `[upstream] token_env` / `token_file` configures.
pub const DEFAULT_ACCOUNT: &str = "default";
/// The most `[[upstream.accounts]]`: each is a label value of several metrics.
pub const MAX_ACCOUNTS: usize = 16;
/// The longest account name, for the same reason.
const MAX_ACCOUNT_NAME: usize = 32;

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
    balance_floor: Option<Credits>,
    accounts: Option<Spanned<Vec<Spanned<RawAccount>>>>,
}

/// One `[[upstream.accounts]]` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    name: Spanned<String>,
    token_env: Option<Spanned<String>>,
    token_file: Option<Spanned<PathBuf>>,
}

/// One upstream account: its name (a metric label, shown to admins) and where its token comes
/// from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAccount {
    pub name: String,
    pub token: SecretSource,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub base_url: url::Url,
    /// At least one, names unique, in the file's order. The first reads the tasks recorded
    /// without an account when no account is named `default`.
    pub accounts: Vec<UpstreamAccount>,
    /// Whether `accounts` came from `[[upstream.accounts]]` rather than `token_env`/`token_file`.
    accounts_from_tables: bool,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub max_reference_images: usize,
    pub max_requests_per_second: NonZeroU32,
    pub new_task_grace: Duration,
    pub query_retries: usize,
    /// How often the account's own balance is read; `None`: never.
    pub balance_check: Option<Duration>,
    /// An account whose credit the balance check finds at or below this leaves rotation.
    pub balance_floor: Credits,
}

impl TryFrom<Spanned<RawUpstream>> for UpstreamConfig {
    type Error = Invalid;

    fn try_from(raw: Spanned<RawUpstream>) -> Result<Self, Invalid> {
        let table = raw.span();
        let raw = raw.into_inner();
        let token = secret_source("[upstream]", "token", raw.token_env, raw.token_file)?;
        let accounts_from_tables = raw.accounts.is_some();
        let accounts = match (token, raw.accounts) {
            (Some(_), Some(tables)) => {
                return Err(Invalid::at(
                    tables.span(),
                    "[upstream] accounts and [upstream] token_env/token_file are both set: \
                     name every account in [[upstream.accounts]], or keep the one token",
                ));
            }
            (Some(token), None) => vec![UpstreamAccount {
                name: DEFAULT_ACCOUNT.to_owned(),
                token,
            }],
            (None, Some(tables)) => accounts(tables)?,
            (None, None) => {
                return Err(Invalid::at(
                    table,
                    "[upstream] needs token_env or token_file, or [[upstream.accounts]]: the \
                     upstream token is never written in this file",
                ));
            }
        };
        Ok(UpstreamConfig {
            base_url: raw.base_url.map_or_else(
                || url::Url::parse(DEFAULT_BASE_URL).expect("a valid default URL"),
                |url| url.0,
            ),
            accounts,
            accounts_from_tables,
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
            balance_floor: raw.balance_floor.unwrap_or(Credits::ZERO),
        })
    }
}

/// `[[upstream.accounts]]`: one to [`MAX_ACCOUNTS`], each with a unique name of lowercase
/// letters, digits, `-` and `_` (at most [`MAX_ACCOUNT_NAME`]) and exactly one token source.
fn accounts(tables: Spanned<Vec<Spanned<RawAccount>>>) -> Result<Vec<UpstreamAccount>, Invalid> {
    let span = tables.span();
    let tables = tables.into_inner();
    if tables.is_empty() || tables.len() > MAX_ACCOUNTS {
        return Err(Invalid::at(
            span,
            format!("[upstream] accounts must list 1 to {MAX_ACCOUNTS} accounts"),
        ));
    }
    let mut accounts: Vec<UpstreamAccount> = Vec::with_capacity(tables.len());
    for table in tables {
        let whole = table.span();
        let raw = table.into_inner();
        let name_span = raw.name.span();
        let name = raw.name.into_inner();
        let sane = !name.is_empty()
            && name.len() <= MAX_ACCOUNT_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !sane {
            return Err(Invalid::at(
                name_span,
                format!(
                    "[[upstream.accounts]] name {name:?} must be 1 to {MAX_ACCOUNT_NAME} \
                     lowercase letters, digits, '-' or '_'"
                ),
            ));
        }
        if accounts.iter().any(|account| account.name == name) {
            return Err(Invalid::at(
                name_span,
                format!("[[upstream.accounts]] name {name:?} is used twice"),
            ));
        }
        let what = format!("[[upstream.accounts]] name = {name:?}:");
        let token = secret_source(&what, "token", raw.token_env, raw.token_file)?
            .ok_or_else(|| Invalid::at(whole, format!("{what} needs token_env or token_file")))?;
        accounts.push(UpstreamAccount { name, token });
    }
    Ok(accounts)
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
    /// Each account's token, in the accounts' order; an error names the account whose token
    /// cannot be read (as `upstream token` for the one of `token_env`/`token_file`).
    pub fn resolve_tokens(&self) -> Result<Vec<super::Secret>, super::ConfigError> {
        self.accounts
            .iter()
            .map(|account| {
                let what = if self.accounts_from_tables {
                    format!("upstream account {} token", account.name)
                } else {
                    "upstream token".to_owned()
                };
                account.token.resolve(&what)
            })
            .collect()
    }

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
    /// connection pools, accounts and their tokens, timeouts and retries, is built once, at start.
    pub(super) fn restart_only_changes(&self, new: &Self) -> Vec<&'static str> {
        let UpstreamConfig {
            base_url,
            accounts,
            accounts_from_tables,
            connect_timeout,
            timeout,
            query_retries,
            // Read by each request, or taken on by the rate limits at reload.
            max_reference_images: _,
            max_requests_per_second: _,
            new_task_grace: _,
            // The balance check reads them at each check.
            balance_check: _,
            balance_floor: _,
        } = self;
        let accounts_key = if *accounts_from_tables || new.accounts_from_tables {
            "accounts"
        } else {
            "token_env or token_file"
        };
        super::changed([
            ("base_url", *base_url != new.base_url),
            (accounts_key, *accounts != new.accounts),
            ("connect_timeout", *connect_timeout != new.connect_timeout),
            ("timeout", *timeout != new.timeout),
            ("query_retries", *query_retries != new.query_retries),
        ])
    }
}
