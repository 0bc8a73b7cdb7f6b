//! The value types several tables share: secrets and where they come from, key digests, rates,
//! durations and URLs. Each is parsed while the file is read, so a wrong value is reported with
//! its key and line.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use nohash_hasher::BuildNoHashHasher;

use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};
use toml::Spanned;

use super::{ConfigError, Invalid};

/// Where a secret comes from. The secret itself is never written in the TOML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
}

/// A resolved secret. Its `Debug` never shows the value, so it cannot leak through a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl SecretSource {
    /// Reads the secret; a trailing newline (as `echo` writes into a Docker secret) is dropped.
    pub fn resolve(&self, what: &str) -> Result<Secret, ConfigError> {
        let value = match self {
            SecretSource::Env(var) => std::env::var(var).map_err(|_| {
                ConfigError(format!("{what}: environment variable {var} is not set"))
            })?,
            SecretSource::File(path) => std::fs::read_to_string(path)
                .map_err(|e| ConfigError(format!("{what}: cannot read {}: {e}", path.display())))?,
        };
        let value = value.trim_end_matches(['\n', '\r']).to_owned();
        if value.is_empty() {
            return Err(ConfigError(format!("{what}: the secret is empty")));
        }
        Ok(Secret(value))
    }
}

/// A secret's pair of keys in one table, `{stem}_env` and `{stem}_file`, of which at most one may
/// be set. `table` names the table in messages, as in `[upstream]` or `[[teams]] name = "design":`.
pub(super) fn secret_source(
    table: &str,
    stem: &str,
    env: Option<Spanned<String>>,
    file: Option<Spanned<PathBuf>>,
) -> Result<Option<SecretSource>, Invalid> {
    match (env, file) {
        (Some(_), Some(file)) => Err(Invalid::at(
            file.span(),
            format!("{table} {stem}_env and {stem}_file are both set: set one, not both"),
        )),
        (Some(var), None) if var.get_ref().is_empty() => Err(Invalid::at(
            var.span(),
            format!(
                "{table} {stem}_env is empty: it names the environment variable that holds the \
                 secret"
            ),
        )),
        (Some(var), None) => Ok(Some(SecretSource::Env(var.into_inner()))),
        (None, Some(path)) => Ok(Some(SecretSource::File(path.into_inner()))),
        (None, None) => Ok(None),
    }
}

/// The SHA-256 digest of a team key: the only form in which keys are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyDigest([u8; 32]);

/// A map by key digest, which hashes a digest as its first eight bytes: they are already spread
/// evenly, and only configured keys are ever inserted, so a keyed hash (SipHash, on every
/// authenticated request) would guard against nothing.
pub type DigestMap<V> = HashMap<KeyDigest, V, BuildNoHashHasher<KeyDigest>>;

impl Hash for KeyDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let (first, _) = self.0.split_first_chunk::<8>().expect("32 bytes");
        state.write_u64(u64::from_ne_bytes(*first));
    }
}

impl nohash_hasher::IsEnabled for KeyDigest {}

impl KeyDigest {
    pub fn of(key: &str) -> Self {
        KeyDigest(Sha256::digest(key.as_bytes()).into())
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }
}

impl<'de> Deserialize<'de> for KeyDigest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let mut digest = [0u8; 32];
        hex::decode_to_slice(text.to_ascii_lowercase(), &mut digest).map_err(|_| {
            serde::de::Error::custom(
                "sha256 must be 64 hex digits (the SHA-256 of the key; `ketchup-gateway keygen` prints one)",
            )
        })?;
        Ok(KeyDigest(digest))
    }
}

/// A rate such as `"60/min"`: `count` events per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: NonZeroU32,
    pub per: Duration,
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "second",
            60 => "minute",
            _ => "hour",
        };
        write!(f, "{} per {unit}", self.count)
    }
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("rate {text:?} must look like \"20/s\", \"60/min\" or \"1000/h\"");
        let (count, unit) = text.split_once('/').ok_or_else(bad)?;
        let count = count.trim().parse::<NonZeroU32>().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        Ok(Rate { count, per })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Longest duration a setting may have. Every time the gateway computes from a setting (a
/// deadline, a lease, a cutoff) then stays well inside the calendar, where a typo such as
/// "1000000y" would otherwise overflow it and fail at the first request that needs it.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A duration written as `"500ms"`, `"1s"`, `"5m"`, at most [`MAX_DURATION`].
#[derive(Debug, Clone, Copy)]
pub(super) struct HumanDuration(Duration);

impl From<HumanDuration> for Duration {
    fn from(duration: HumanDuration) -> Duration {
        duration.0
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let duration = humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "duration {text:?} is not valid ({e}); write e.g. \"500ms\", \"30s\" or \"5m\""
            ))
        })?;
        if duration > MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "duration {text:?} is longer than the most allowed, 100 years"
            )));
        }
        Ok(HumanDuration(duration))
    }
}

/// An instant written as an RFC 3339 string with an offset, as in `"2027-01-01T00:00:00Z"`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Instant(pub(super) DateTime<Utc>);

impl<'de> Deserialize<'de> for Instant {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|at| Instant(at.with_timezone(&Utc)))
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "{text:?} is not an RFC 3339 instant ({e}); write e.g. \"2027-01-01T00:00:00Z\""
                ))
            })
    }
}

/// An absolute http(s) URL.
#[derive(Debug, Clone)]
pub(super) struct HttpUrl(pub(super) url::Url);

impl<'de> Deserialize<'de> for HttpUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match url::Url::parse(&text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
                Ok(HttpUrl(url))
            }
            _ => Err(serde::de::Error::custom(format!(
                "{text:?} is not an absolute http(s) URL"
            ))),
        }
    }
}

/// The value of a key that must be above zero (a count or a duration), or `default` when the
/// file leaves the key out. `key` names it in the message, as in `[webhooks] attempt_timeout`.
pub(super) fn above_zero<T, U>(
    key: &str,
    value: Option<Spanned<T>>,
    default: U,
) -> Result<U, Invalid>
where
    U: From<T> + Default + PartialEq,
{
    let Some(value) = value else {
        return Ok(default);
    };
    let span = value.span();
    let value = U::from(value.into_inner());
    if value == U::default() {
        return Err(Invalid::at(span, format!("{key} must be above zero")));
    }
    Ok(value)
}
