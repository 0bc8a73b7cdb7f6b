//! `[store]`: where the ledger lives, an SQLite file or a Redis shared by replicas.

use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::values::{HumanDuration, SecretSource, above_zero, secret_source};
use super::{Invalid, span_of};

const DEFAULT_PATH: &str = "data/ledger.db";
const DEFAULT_KEY_PREFIX: &str = "ketchup:";
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_millis(250);

/// `store.kind`: which engine keeps the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StoreKind {
    #[default]
    Sqlite,
    Redis,
}

/// `store.rate_limits_when_unavailable`: what the rate limits do while Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitsWhenUnavailable {
    /// Refuse the requests they would count: a cluster-wide limit may not silently become one
    /// per replica.
    #[default]
    Refuse,
    /// Fall back to each replica's own limiters.
    Allow,
}

/// `[store]` as written; a key left out takes the default above.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    kind: Option<Spanned<StoreKind>>,
    path: Option<Spanned<PathBuf>>,
    url: Option<Spanned<String>>,
    password_env: Option<Spanned<String>>,
    password_file: Option<Spanned<PathBuf>>,
    key_prefix: Option<Spanned<String>>,
    command_timeout: Option<Spanned<HumanDuration>>,
    rate_limits_when_unavailable: Option<Spanned<RateLimitsWhenUnavailable>>,
    ca_file: Option<Spanned<PathBuf>>,
    client_cert_file: Option<Spanned<PathBuf>>,
    client_key_file: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "one value, built once per configuration load"
)]
pub enum StoreConfig {
    Sqlite {
        path: PathBuf,
    },
    /// Shared by every replica that points at it.
    Redis {
        /// Without a password: that comes from `password`, never from this file.
        url: url::Url,
        password: Option<SecretSource>,
        /// Starts every key, so several gateways (or tests) can share one Redis.
        key_prefix: String,
        /// Bound on every Redis call; past it the call counts as an outage.
        command_timeout: Duration,
        rate_limits_when_unavailable: RateLimitsWhenUnavailable,
        tls: RedisTls,
    },
}

/// Certificates for a `rediss://` store other than the public web roots: a Redis whose
/// certificate a private CA signed, or one that asks its clients for a certificate
/// (`tls-auth-clients`). The files are read when the gateway connects, never kept in the config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// PEM certificates of the CAs to trust for the server, instead of the public roots.
    pub ca_file: Option<PathBuf>,
    /// PEM files of the client certificate and of its private key.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl TryFrom<RawStore> for StoreConfig {
    type Error = Invalid;

    fn try_from(raw: RawStore) -> Result<Self, Invalid> {
        match &raw.kind {
            Some(kind) if *kind.get_ref() == StoreKind::Redis => {
                let kind = kind.span();
                redis(raw, kind)
            }
            _ => sqlite(raw),
        }
    }
}

fn sqlite(raw: RawStore) -> Result<StoreConfig, Invalid> {
    let redis_only = [
        ("url", span_of(&raw.url)),
        ("password_env", span_of(&raw.password_env)),
        ("password_file", span_of(&raw.password_file)),
        ("key_prefix", span_of(&raw.key_prefix)),
        ("command_timeout", span_of(&raw.command_timeout)),
        (
            "rate_limits_when_unavailable",
            span_of(&raw.rate_limits_when_unavailable),
        ),
        ("ca_file", span_of(&raw.ca_file)),
        ("client_cert_file", span_of(&raw.client_cert_file)),
        ("client_key_file", span_of(&raw.client_key_file)),
    ];
    if let Some((key, span)) = redis_only
        .into_iter()
        .find_map(|(key, span)| Some((key, span?)))
    {
        return Err(Invalid::at(
            span,
            format!("[store] {key} is for kind = \"redis\"; sqlite uses path"),
        ));
    }
    Ok(StoreConfig::Sqlite {
        path: raw
            .path
            .map_or_else(|| PathBuf::from(DEFAULT_PATH), Spanned::into_inner),
    })
}

fn redis(raw: RawStore, kind: Range<usize>) -> Result<StoreConfig, Invalid> {
    if let Some(path) = raw.path {
        return Err(Invalid::at(
            path.span(),
            "[store] path is for kind = \"sqlite\"; redis uses url",
        ));
    }
    let url = raw.url.ok_or_else(|| {
        Invalid::at(
            kind,
            "[store] kind = \"redis\" needs url, e.g. \"redis://127.0.0.1:6379/0\"",
        )
    })?;
    let url_span = url.span();
    let url = url::Url::parse(url.get_ref())
        .ok()
        .filter(|u| matches!(u.scheme(), "redis" | "rediss") && u.host().is_some())
        .ok_or_else(|| {
            Invalid::at(
                url_span.clone(),
                "[store] url must be a redis:// or rediss:// (TLS) URL with a host",
            )
        })?;
    if url.password().is_some() {
        return Err(Invalid::at(
            url_span,
            "[store] url must not hold a password: secrets are never written in this file; \
             use password_env or password_file",
        ));
    }
    let password = secret_source("[store]", "password", raw.password_env, raw.password_file)?;
    let command_timeout = above_zero(
        "[store] command_timeout",
        raw.command_timeout,
        DEFAULT_COMMAND_TIMEOUT,
    )?;
    let tls_key = [
        span_of(&raw.ca_file),
        span_of(&raw.client_cert_file),
        span_of(&raw.client_key_file),
    ]
    .into_iter()
    .flatten()
    .next();
    let client_cert = match (raw.client_cert_file, raw.client_key_file) {
        (Some(cert), Some(key)) => Some((cert.into_inner(), key.into_inner())),
        (None, None) => None,
        (Some(alone), None) | (None, Some(alone)) => {
            return Err(Invalid::at(
                alone.span(),
                "[store] client_cert_file and client_key_file go together",
            ));
        }
    };
    if let Some(span) = tls_key
        && url.scheme() != "rediss"
    {
        return Err(Invalid::at(
            span,
            "[store] ca_file, client_cert_file and client_key_file are for TLS: the url must \
             start with rediss://",
        ));
    }
    Ok(StoreConfig::Redis {
        url,
        password,
        key_prefix: raw
            .key_prefix
            .map_or_else(|| DEFAULT_KEY_PREFIX.into(), Spanned::into_inner),
        command_timeout,
        rate_limits_when_unavailable: raw
            .rate_limits_when_unavailable
            .map(Spanned::into_inner)
            .unwrap_or_default(),
        tls: RedisTls {
            ca_file: raw.ca_file.map(Spanned::into_inner),
            client_cert,
        },
    })
}
