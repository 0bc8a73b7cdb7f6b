//! Configuration: the admin-facing TOML file.
//!
//! The file is read into `raw` types that mirror it one to one (`deny_unknown_fields`, so a typo
//! such as `budjet` is an error rather than a silently ignored key), then converted into the
//! validated runtime types below. Every value that can be wrong is parsed during deserialisation
//! (durations, rates, credits, key digests, URLs), so its error carries the line it came from;
//! checks that span several values report the line of the table they concern.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::credits::Credits;

/// Most HTTP worker threads (`server.workers`): far more than cores only adds switching.
pub const MAX_WORKERS: usize = 256;

/// A configuration problem, already phrased for the admin: it names the file, the line and what
/// is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    fn at(path: &Path, source: &str, span: Option<std::ops::Range<usize>>, what: &str) -> Self {
        match span {
            Some(span) => {
                let before = &source[..span.start.min(source.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                ConfigError(format!("{}:{line}:{column}: {what}", path.display()))
            }
            None => ConfigError(format!("{}: {what}", path.display())),
        }
    }
}

/// The validated configuration the gateway runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub store: StoreConfig,
    pub cache: CacheConfig,
    pub reconciler: ReconcilerConfig,
    pub webhooks: WebhooksConfig,
    pub admin_token: Option<SecretSource>,
    pub models: BTreeMap<String, Model>,
    pub teams: Vec<Arc<Team>>,
    keys: HashMap<KeyDigest, KeyEntry>,
}

/// Whose a key is, and the admin's label for it (not secret: it names the key in logs, which
/// shows whether an old key is still in use before it is removed).
#[derive(Debug, Clone)]
pub struct KeyEntry {
    pub team: Arc<Team>,
    pub label: Arc<str>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: String,
    pub public_url: Option<url::Url>,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub metrics_listen: Option<String>,
    pub shutdown_timeout: Duration,
    /// Threads that serve HTTP, each on its own share of the connections.
    pub workers: NonZeroUsize,
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
}

/// Waits between upstream attempts: doubling from the first, jittered up to twice as long.
pub const FIRST_RETRY_DELAY: Duration = Duration::from_millis(50);
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);

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
        /// With Redis unreachable, rate limits fall back to each replica's own limiters
        /// (`true`) or refuse the requests they would count (`false`, the default): a
        /// cluster-wide limit may not silently become one per replica.
        rate_limits_fail_open: bool,
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

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub status_ttl: Duration,
    pub max_entries: u64,
    /// Most bytes of answer bodies held: a status whose result carries base64 images can be
    /// megabytes, so a bound on entries alone would not bound memory.
    pub max_bytes: u64,
    /// Tasks whose owner is kept in memory (the newest), so that reading their status never
    /// waits on the ledger; 0 asks the ledger on every read.
    pub max_owners: u64,
}

/// The background job that settles tasks no client polls to the end.
#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    /// How often it looks for work.
    pub interval: Duration,
    /// An open task whose status nobody has read for this long is read by the reconciler.
    pub settle_after: Duration,
    /// Cap on the reconciler's upstream reads, all tasks together.
    pub max_reads_per_second: NonZeroU32,
    /// An unsettled task older than this settles at its reservation, marked `expired`.
    pub max_task_age: Duration,
    /// A reservation still waiting for the upstream's answer after this long (the gateway
    /// stopped mid-request) becomes `unknown_outcome`.
    pub abandon_after: Duration,
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

#[derive(Debug, Clone)]
pub struct Model {
    pub name: String,
    pub reserve: Credits,
}

#[derive(Debug)]
pub struct Team {
    pub name: String,
    pub budget: Option<Budget>,
    pub limits: Limits,
    pub webhook_secret: Option<SecretSource>,
    pub callback_hosts: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub credits: Credits,
    pub period: BudgetPeriod,
    pub max_in_flight: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    Daily,
    Weekly,
    Monthly,
    Lifetime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub generate: Rate,
    pub generate_burst: NonZeroU32,
    pub query: Rate,
    pub query_burst: NonZeroU32,
}

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

/// The SHA-256 digest of a team key: the only form in which keys are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyDigest([u8; 32]);

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

/// Most task owners kept in memory: up to 4 GB.
const MAX_OWNERS: u64 = 100_000_000;

/// Longest duration a setting may have. Every time the gateway computes from a setting (a
/// deadline, a lease, a cutoff) then stays well inside the calendar, where a typo such as
/// "1000000y" would otherwise overflow it and fail at the first request that needs it.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A duration written as `"500ms"`, `"1s"`, `"5m"`, at most [`MAX_DURATION`].
#[derive(Debug, Clone, Copy)]
struct HumanDuration(Duration);

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

/// An absolute http(s) URL.
#[derive(Debug, Clone)]
struct HttpUrl(url::Url);

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

mod raw {
    //! The file exactly as admins write it.

    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        #[serde(default)]
        pub server: Server,
        pub upstream: Spanned<Upstream>,
        #[serde(default)]
        pub store: Option<Spanned<Store>>,
        #[serde(default)]
        pub cache: Cache,
        #[serde(default)]
        pub reconciler: Option<Spanned<Reconciler>>,
        #[serde(default)]
        pub webhooks: Option<Spanned<Webhooks>>,
        #[serde(default)]
        pub admin: Option<Spanned<SecretRef>>,
        #[serde(default)]
        pub models: BTreeMap<String, Model>,
        #[serde(default)]
        pub defaults: Defaults,
        #[serde(default)]
        pub teams: Vec<Spanned<Team>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Server {
        #[serde(default = "default_listen")]
        pub listen: String,
        pub public_url: Option<HttpUrl>,
        #[serde(default = "default_max_body_bytes")]
        pub max_body_bytes: usize,
        #[serde(default = "default_request_timeout")]
        pub request_timeout: HumanDuration,
        pub metrics_listen: Option<String>,
        #[serde(default = "default_shutdown_timeout")]
        pub shutdown_timeout: HumanDuration,
        pub workers: Option<Spanned<usize>>,
    }

    impl Default for Server {
        fn default() -> Self {
            Server {
                listen: default_listen(),
                public_url: None,
                max_body_bytes: default_max_body_bytes(),
                request_timeout: default_request_timeout(),
                metrics_listen: None,
                shutdown_timeout: default_shutdown_timeout(),
                workers: None,
            }
        }
    }

    fn default_listen() -> String {
        "127.0.0.1:8080".into()
    }
    fn default_max_body_bytes() -> usize {
        1024 * 1024
    }
    fn default_request_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }
    fn default_shutdown_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Upstream {
        #[serde(default = "default_base_url")]
        pub base_url: HttpUrl,
        pub token_env: Option<String>,
        pub token_file: Option<PathBuf>,
        #[serde(default = "default_connect_timeout")]
        pub connect_timeout: HumanDuration,
        #[serde(default = "default_upstream_timeout")]
        pub timeout: HumanDuration,
        #[serde(default = "default_max_reference_images")]
        pub max_reference_images: usize,
        #[serde(default = "default_max_requests_per_second")]
        pub max_requests_per_second: NonZeroU32,
        #[serde(default = "default_new_task_grace")]
        pub new_task_grace: HumanDuration,
        #[serde(default = "default_query_retries")]
        pub query_retries: usize,
    }

    fn default_base_url() -> HttpUrl {
        HttpUrl(url::Url::parse("https://api.defapi.org").expect("valid default URL"))
    }
    fn default_connect_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(5))
    }
    fn default_upstream_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }
    fn default_max_reference_images() -> usize {
        4
    }
    fn default_max_requests_per_second() -> NonZeroU32 {
        NonZeroU32::new(50).expect("non-zero")
    }
    fn default_new_task_grace() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }
    fn default_query_retries() -> usize {
        2
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Store {
        #[serde(default = "default_store_kind")]
        pub kind: String,
        pub path: Option<PathBuf>,
        pub url: Option<String>,
        pub password_env: Option<String>,
        pub password_file: Option<PathBuf>,
        pub key_prefix: Option<String>,
        pub command_timeout: Option<HumanDuration>,
        pub rate_limits_when_unavailable: Option<String>,
        pub ca_file: Option<PathBuf>,
        pub client_cert_file: Option<PathBuf>,
        pub client_key_file: Option<PathBuf>,
    }

    fn default_store_kind() -> String {
        "sqlite".into()
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Cache {
        #[serde(default = "default_status_ttl")]
        pub status_ttl: HumanDuration,
        #[serde(default = "default_max_entries")]
        pub max_entries: u64,
        #[serde(default = "default_max_cache_bytes")]
        pub max_bytes: u64,
        #[serde(default = "default_max_owners")]
        pub max_owners: u64,
    }

    impl Default for Cache {
        fn default() -> Self {
            Cache {
                status_ttl: default_status_ttl(),
                max_entries: default_max_entries(),
                max_bytes: default_max_cache_bytes(),
                max_owners: default_max_owners(),
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Reconciler {
        #[serde(default = "default_reconcile_interval")]
        pub interval: HumanDuration,
        #[serde(default = "default_settle_after")]
        pub settle_after: HumanDuration,
        #[serde(default = "default_reconcile_reads")]
        pub max_reads_per_second: NonZeroU32,
        #[serde(default = "default_max_task_age")]
        pub max_task_age: HumanDuration,
        #[serde(default = "default_abandon_after")]
        pub abandon_after: HumanDuration,
    }

    impl Default for Reconciler {
        fn default() -> Self {
            Reconciler {
                interval: default_reconcile_interval(),
                settle_after: default_settle_after(),
                max_reads_per_second: default_reconcile_reads(),
                max_task_age: default_max_task_age(),
                abandon_after: default_abandon_after(),
            }
        }
    }

    fn default_reconcile_interval() -> HumanDuration {
        HumanDuration(Duration::from_secs(5))
    }
    fn default_settle_after() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }
    fn default_reconcile_reads() -> NonZeroU32 {
        NonZeroU32::new(10).expect("non-zero")
    }
    fn default_max_task_age() -> HumanDuration {
        HumanDuration(Duration::from_secs(24 * 3600))
    }
    fn default_abandon_after() -> HumanDuration {
        HumanDuration(Duration::from_secs(300))
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Webhooks {
        #[serde(default)]
        pub always_intercept: bool,
        #[serde(default = "default_delivery_deadline")]
        pub delivery_deadline: HumanDuration,
        #[serde(default = "default_attempt_timeout")]
        pub attempt_timeout: HumanDuration,
        #[serde(default = "default_first_retry")]
        pub first_retry: HumanDuration,
        #[serde(default = "default_max_retry_delay")]
        pub max_retry_delay: HumanDuration,
        #[serde(default = "default_max_concurrent_deliveries")]
        pub max_concurrent_deliveries: usize,
        #[serde(default = "default_max_concurrent_deliveries_per_team")]
        pub max_concurrent_deliveries_per_team: usize,
        #[serde(default = "default_max_callback_bytes")]
        pub max_callback_bytes: usize,
        #[serde(default = "default_keep_finished")]
        pub keep_finished: HumanDuration,
    }

    impl Default for Webhooks {
        fn default() -> Self {
            Webhooks {
                always_intercept: false,
                delivery_deadline: default_delivery_deadline(),
                attempt_timeout: default_attempt_timeout(),
                first_retry: default_first_retry(),
                max_retry_delay: default_max_retry_delay(),
                max_concurrent_deliveries: default_max_concurrent_deliveries(),
                max_concurrent_deliveries_per_team: default_max_concurrent_deliveries_per_team(),
                max_callback_bytes: default_max_callback_bytes(),
                keep_finished: default_keep_finished(),
            }
        }
    }

    fn default_delivery_deadline() -> HumanDuration {
        HumanDuration(Duration::from_secs(24 * 3600))
    }
    fn default_attempt_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(10))
    }
    fn default_first_retry() -> HumanDuration {
        HumanDuration(Duration::from_secs(5))
    }
    fn default_max_retry_delay() -> HumanDuration {
        HumanDuration(Duration::from_secs(3600))
    }
    fn default_max_concurrent_deliveries() -> usize {
        32
    }
    fn default_max_concurrent_deliveries_per_team() -> usize {
        8
    }
    fn default_max_callback_bytes() -> usize {
        32 << 20
    }
    fn default_keep_finished() -> HumanDuration {
        HumanDuration(Duration::from_secs(7 * 24 * 3600))
    }

    fn default_status_ttl() -> HumanDuration {
        HumanDuration(Duration::from_secs(1))
    }
    fn default_max_entries() -> u64 {
        100_000
    }
    fn default_max_owners() -> u64 {
        1_000_000
    }
    fn default_max_cache_bytes() -> u64 {
        64 << 20
    }

    /// `token_env` or `token_file`, exactly one.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct SecretRef {
        pub token_env: Option<String>,
        pub token_file: Option<PathBuf>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Model {
        pub reserve: Credits,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Defaults {
        #[serde(default)]
        pub limits: Option<Limits>,
    }

    #[derive(Deserialize, Clone, Copy)]
    #[serde(deny_unknown_fields)]
    pub struct Limits {
        pub generate: Option<Rate>,
        pub generate_burst: Option<NonZeroU32>,
        pub query: Option<Rate>,
        pub query_burst: Option<NonZeroU32>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Team {
        pub name: Spanned<String>,
        pub keys: Vec<Spanned<Key>>,
        pub budget: Option<Budget>,
        pub limits: Option<Limits>,
        pub webhook_secret_env: Option<String>,
        pub webhook_secret_file: Option<PathBuf>,
        #[serde(default)]
        pub callback_hosts: Vec<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Key {
        pub sha256: KeyDigest,
        pub label: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Budget {
        pub credits: Credits,
        pub period: BudgetPeriod,
        pub max_in_flight: Option<u32>,
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        Config::parse(path, &source)
    }

    /// Validates configuration text; `path` only names it in messages.
    pub fn parse(path: &Path, source: &str) -> Result<Config, ConfigError> {
        let file: raw::File = toml::from_str(source)
            .map_err(|e| ConfigError::at(path, source, e.span(), e.message().trim_end()))?;
        let fail = |span: std::ops::Range<usize>, what: &str| {
            ConfigError::at(path, source, Some(span), what)
        };

        let workers = match file.server.workers {
            None => std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            Some(workers) => match NonZeroUsize::new(*workers.get_ref()) {
                Some(n) if n.get() <= MAX_WORKERS => n,
                _ => {
                    return Err(fail(
                        workers.span(),
                        &format!("[server] workers must be between 1 and {MAX_WORKERS}"),
                    ));
                }
            },
        };
        let server = ServerConfig {
            listen: file.server.listen,
            public_url: file.server.public_url.map(|u| u.0),
            max_body_bytes: file.server.max_body_bytes,
            request_timeout: file.server.request_timeout.0,
            metrics_listen: file.server.metrics_listen,
            shutdown_timeout: file.server.shutdown_timeout.0,
            workers,
        };

        let upstream_span = file.upstream.span();
        let raw_upstream = file.upstream.into_inner();
        let token = secret_source(raw_upstream.token_env, raw_upstream.token_file)
            .map_err(|what| fail(upstream_span.clone(), &format!("[upstream] {what}")))?
            .ok_or_else(|| {
                fail(
                    upstream_span.clone(),
                    "[upstream] needs token_env or token_file: the upstream token is never written in this file",
                )
            })?;
        if raw_upstream.timeout.0.is_zero() || raw_upstream.connect_timeout.0.is_zero() {
            return Err(fail(
                upstream_span,
                "[upstream] timeouts must be above zero",
            ));
        }
        let upstream = UpstreamConfig {
            base_url: raw_upstream.base_url.0,
            token,
            connect_timeout: raw_upstream.connect_timeout.0,
            timeout: raw_upstream.timeout.0,
            max_reference_images: raw_upstream.max_reference_images,
            max_requests_per_second: raw_upstream.max_requests_per_second,
            new_task_grace: raw_upstream.new_task_grace.0,
            query_retries: raw_upstream.query_retries,
        };

        let store = match file.store {
            None => StoreConfig::Sqlite {
                path: PathBuf::from("data/ledger.db"),
            },
            Some(spanned) => {
                let span = spanned.span();
                let store = spanned.into_inner();
                match store.kind.as_str() {
                    "sqlite" => {
                        if store.url.is_some()
                            || store.password_env.is_some()
                            || store.password_file.is_some()
                            || store.key_prefix.is_some()
                            || store.command_timeout.is_some()
                            || store.rate_limits_when_unavailable.is_some()
                            || store.ca_file.is_some()
                            || store.client_cert_file.is_some()
                            || store.client_key_file.is_some()
                        {
                            return Err(fail(
                                span,
                                "[store] url, password_env, password_file, key_prefix, command_timeout, \
                                 rate_limits_when_unavailable, ca_file, client_cert_file and \
                                 client_key_file are for kind = \"redis\"; sqlite uses path",
                            ));
                        }
                        StoreConfig::Sqlite {
                            path: store
                                .path
                                .unwrap_or_else(|| PathBuf::from("data/ledger.db")),
                        }
                    }
                    "redis" => redis_store(store).map_err(|what| fail(span, &what))?,
                    other => {
                        return Err(fail(
                            span,
                            &format!(
                                "[store] kind {other:?} is unknown: use \"sqlite\" or \"redis\""
                            ),
                        ));
                    }
                }
            }
        };

        if file.cache.max_entries > 0 && file.cache.max_bytes == 0 {
            return Err(ConfigError::at(
                path,
                source,
                None,
                "[cache] max_bytes must be above zero (turn the cache off with max_entries = 0)",
            ));
        }
        if file.cache.max_owners > MAX_OWNERS {
            return Err(ConfigError::at(
                path,
                source,
                None,
                &format!(
                    "[cache] max_owners must be at most {MAX_OWNERS} (up to 40 bytes of memory each)"
                ),
            ));
        }
        let cache = CacheConfig {
            status_ttl: file.cache.status_ttl.0,
            max_entries: file.cache.max_entries,
            max_bytes: file.cache.max_bytes,
            max_owners: file.cache.max_owners,
        };

        let (reconciler_span, raw_reconciler) = match file.reconciler {
            Some(spanned) => (Some(spanned.span()), spanned.into_inner()),
            None => (None, raw::Reconciler::default()),
        };
        let reconciler = reconciler_config(raw_reconciler);
        let reconciler_error =
            |what: &str| ConfigError::at(path, source, reconciler_span.clone(), what);
        if reconciler.settle_after < Duration::from_secs(1) || reconciler.interval.is_zero() {
            return Err(reconciler_error(
                "[reconciler] interval must be above zero and settle_after at least 1s \
                 (the upstream asks for at most one status read per task per second)",
            ));
        }
        let longest = upstream.longest_generation();
        if reconciler.abandon_after <= longest {
            return Err(reconciler_error(&format!(
                "[reconciler] abandon_after must be longer than a generation can wait on the \
                 upstream ({}: [upstream] timeout, plus connect_timeout for each of the \
                 query_retries + 1 connection attempts, plus the waits between them), or \
                 requests still waiting for the upstream would be given up",
                humantime::format_duration(longest)
            )));
        }

        let (webhooks_span, raw_webhooks) = match file.webhooks {
            Some(spanned) => (Some(spanned.span()), spanned.into_inner()),
            None => (None, raw::Webhooks::default()),
        };
        let webhooks = WebhooksConfig {
            always_intercept: raw_webhooks.always_intercept,
            delivery_deadline: raw_webhooks.delivery_deadline.0,
            attempt_timeout: raw_webhooks.attempt_timeout.0,
            first_retry: raw_webhooks.first_retry.0,
            max_retry_delay: raw_webhooks.max_retry_delay.0,
            max_concurrent_deliveries: raw_webhooks.max_concurrent_deliveries,
            max_concurrent_deliveries_per_team: raw_webhooks.max_concurrent_deliveries_per_team,
            max_callback_bytes: raw_webhooks.max_callback_bytes,
            keep_finished: raw_webhooks.keep_finished.0,
        };
        let webhooks_error =
            |what: &str| ConfigError::at(path, source, webhooks_span.clone(), what);
        if webhooks.always_intercept && server.public_url.is_none() {
            return Err(webhooks_error(
                "[webhooks] always_intercept needs [server] public_url: the address at which \
                 the upstream can reach this gateway",
            ));
        }
        if webhooks.attempt_timeout.is_zero()
            || webhooks.first_retry.is_zero()
            || webhooks.max_retry_delay < webhooks.first_retry
            || webhooks.max_concurrent_deliveries == 0
            || webhooks.max_concurrent_deliveries_per_team == 0
            || webhooks.max_callback_bytes == 0
            || webhooks.keep_finished.is_zero()
        {
            return Err(webhooks_error(
                "[webhooks] attempt_timeout, first_retry, max_concurrent_deliveries, \
                 max_concurrent_deliveries_per_team, max_callback_bytes and keep_finished must \
                 be above zero, and max_retry_delay at least first_retry",
            ));
        }
        if let Some(url) = &server.public_url
            && (url.query().is_some() || url.fragment().is_some())
        {
            return Err(ConfigError::at(
                path,
                source,
                None,
                "[server] public_url must not have a query or fragment: callback paths are \
                 appended to it",
            ));
        }

        let admin_token = match file.admin {
            None => None,
            Some(spanned) => {
                let span = spanned.span();
                let admin = spanned.into_inner();
                secret_source(admin.token_env, admin.token_file)
                    .map_err(|what| fail(span, &format!("[admin] {what}")))?
            }
        };

        let models: BTreeMap<String, Model> = file
            .models
            .into_iter()
            .map(|(name, model)| {
                let model = Model {
                    name: name.clone(),
                    reserve: model.reserve,
                };
                (name, model)
            })
            .collect();
        if models.is_empty() {
            return Err(ConfigError::at(
                path,
                source,
                None,
                "no [models.\"…\"] table: list at least one model with its reserve",
            ));
        }

        let builtin_limits = Limits {
            generate: "60/min".parse().expect("valid default"),
            generate_burst: NonZeroU32::new(10).expect("non-zero"),
            query: "20/s".parse().expect("valid default"),
            query_burst: NonZeroU32::new(20).expect("non-zero"),
        };
        let default_limits = match file.defaults.limits {
            Some(raw) => merge_limits(builtin_limits, raw),
            None => builtin_limits,
        };

        let mut teams = Vec::new();
        let mut keys = HashMap::new();
        for spanned in file.teams {
            let team_span = spanned.span();
            let raw_team = spanned.into_inner();
            let name_span = raw_team.name.span();
            let name = raw_team.name.into_inner();
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(fail(
                    name_span,
                    &format!("team name {name:?} must be 1 to 64 letters, digits, '-' or '_'"),
                ));
            }
            if teams.iter().any(|t: &Arc<Team>| t.name == name) {
                return Err(fail(name_span, &format!("team {name:?} is listed twice")));
            }
            if raw_team.keys.is_empty() {
                return Err(fail(
                    team_span,
                    &format!(
                        "team {name:?} has no keys; add one with `ketchup-gateway keygen --team {name}`"
                    ),
                ));
            }
            if let Some(budget) = &raw_team.budget
                && budget.max_in_flight == Some(0)
            {
                return Err(fail(
                    team_span,
                    &format!("team {name:?}: budget.max_in_flight must be at least 1"),
                ));
            }
            let webhook_secret =
                secret_source(raw_team.webhook_secret_env, raw_team.webhook_secret_file).map_err(
                    |what| fail(team_span.clone(), &format!("team {name:?}: webhook {what}")),
                )?;
            if webhook_secret.is_none() && server.public_url.is_some() {
                return Err(fail(
                    team_span,
                    &format!(
                        "team {name:?} has no webhook secret: with [server] public_url set, the \
                         gateway relays callbacks to the team's callback_url and signs every \
                         delivery; set webhook_secret_env or webhook_secret_file \
                         (`ketchup-gateway keygen --team {name} --webhook-secret` prints one)"
                    ),
                ));
            }
            let team = Arc::new(Team {
                name: name.clone(),
                budget: raw_team.budget.map(|b| Budget {
                    credits: b.credits,
                    period: b.period,
                    max_in_flight: b.max_in_flight,
                }),
                limits: raw_team
                    .limits
                    .map_or(default_limits, |raw| merge_limits(default_limits, raw)),
                webhook_secret,
                callback_hosts: raw_team.callback_hosts,
            });
            for key in raw_team.keys {
                let key_span = key.span();
                let key = key.into_inner();
                let entry = KeyEntry {
                    team: team.clone(),
                    label: key.label.unwrap_or_default().into(),
                };
                if let Some(other) = keys.insert(key.sha256, entry) {
                    return Err(fail(
                        key_span,
                        &format!(
                            "this key digest is already used by team {:?}; every key belongs to one team",
                            other.team.name
                        ),
                    ));
                }
            }
            teams.push(team);
        }

        Ok(Config {
            server,
            upstream,
            store,
            cache,
            reconciler,
            webhooks,
            admin_token,
            models,
            teams,
            keys,
        })
    }

    /// The team a key belongs to. Keys are compared by digest only.
    pub fn key(&self, key: &str) -> Option<&KeyEntry> {
        self.keys.get(&KeyDigest::of(key))
    }

    /// A team's metric label: its configured name (or `admin`), else `unknown`, so that labels
    /// stay a bounded set whatever a ledger row or request says.
    pub fn team_label<'a>(&self, team: &'a str) -> &'a str {
        if self.team(team).is_some() || team == "admin" {
            team
        } else {
            "unknown"
        }
    }

    /// A model's metric label: its configured id, else `other`.
    pub fn model_label<'a>(&self, model: &'a str) -> &'a str {
        if self.models.contains_key(model) {
            model
        } else {
            "other"
        }
    }

    pub fn team(&self, name: &str) -> Option<&Arc<Team>> {
        self.teams.iter().find(|t| t.name == name)
    }
}

fn redis_store(store: raw::Store) -> Result<StoreConfig, String> {
    if store.path.is_some() {
        return Err("[store] path is for kind = \"sqlite\"; redis uses url".into());
    }
    let text = store
        .url
        .ok_or("[store] kind = \"redis\" needs url, e.g. \"redis://127.0.0.1:6379/0\"")?;
    let url = url::Url::parse(&text)
        .ok()
        .filter(|u| matches!(u.scheme(), "redis" | "rediss") && u.host().is_some())
        .ok_or("[store] url must be a redis:// or rediss:// (TLS) URL with a host")?;
    if url.password().is_some() {
        return Err(
            "[store] url must not hold a password: secrets are never written in this file; \
             use password_env or password_file"
                .into(),
        );
    }
    let password = secret_source(store.password_env, store.password_file)
        .map_err(|what| format!("[store] {}", what.replace("token", "password")))?;
    let command_timeout = store
        .command_timeout
        .map_or(Duration::from_millis(250), |t| t.0);
    if command_timeout.is_zero() {
        return Err("[store] command_timeout must be above zero".into());
    }
    let rate_limits_fail_open = match store.rate_limits_when_unavailable.as_deref() {
        None | Some("refuse") => false,
        Some("allow") => true,
        Some(other) => {
            return Err(format!(
                "[store] rate_limits_when_unavailable {other:?} is unknown: use \"refuse\" \
                 (the default) or \"allow\" (each replica's own limits apply)"
            ));
        }
    };
    let client_cert = match (store.client_cert_file, store.client_key_file) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => return Err("[store] client_cert_file and client_key_file go together".into()),
    };
    let tls = RedisTls {
        ca_file: store.ca_file,
        client_cert,
    };
    if tls != RedisTls::default() && url.scheme() != "rediss" {
        return Err(
            "[store] ca_file, client_cert_file and client_key_file are for TLS: the url must \
             start with rediss://"
                .into(),
        );
    }
    Ok(StoreConfig::Redis {
        url,
        password,
        key_prefix: store.key_prefix.unwrap_or_else(|| "ketchup:".into()),
        command_timeout,
        rate_limits_fail_open,
        tls,
    })
}

fn reconciler_config(raw: raw::Reconciler) -> ReconcilerConfig {
    ReconcilerConfig {
        interval: raw.interval.0,
        settle_after: raw.settle_after.0,
        max_reads_per_second: raw.max_reads_per_second,
        max_task_age: raw.max_task_age.0,
        abandon_after: raw.abandon_after.0,
    }
}

fn secret_source(
    env: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<SecretSource>, String> {
    match (env, file) {
        (Some(_), Some(_)) => Err("set token_env or token_file, not both".into()),
        (Some(var), None) if var.is_empty() => Err("token_env is empty".into()),
        (Some(var), None) => Ok(Some(SecretSource::Env(var))),
        (None, Some(path)) => Ok(Some(SecretSource::File(path))),
        (None, None) => Ok(None),
    }
}

fn merge_limits(base: Limits, raw: raw::Limits) -> Limits {
    let generate = raw.generate.unwrap_or(base.generate);
    let query = raw.query.unwrap_or(base.query);
    Limits {
        generate,
        // A new rate without a burst of its own allows one period's worth at once.
        generate_burst: raw.generate_burst.unwrap_or(if raw.generate.is_some() {
            generate.count
        } else {
            base.generate_burst
        }),
        query,
        query_burst: raw.query_burst.unwrap_or(if raw.query.is_some() {
            query.count
        } else {
            base.query_burst
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[upstream]
token_env = "KETCHUP_UPSTREAM_TOKEN"

[models."google/gempix2"]
reserve = "0.50"

[[teams]]
name = "design"
keys = [{ sha256 = "c3ab8ff13720e8ad9047dd39466b3c8974e592c2fa383d4a3960714caef0c4f2", label = "prod" }]
budget = { credits = "250.00", period = "monthly", max_in_flight = 50 }
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("gateway.toml"), text)
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:8080");
        assert_eq!(config.server.max_body_bytes, 1 << 20);
        assert_eq!(config.upstream.base_url.as_str(), "https://api.defapi.org/");
        assert_eq!(config.upstream.max_reference_images, 4);
        assert_eq!(config.upstream.new_task_grace, Duration::from_secs(30));
        assert_eq!(config.cache.status_ttl, Duration::from_secs(1));
        assert_eq!(
            config.store,
            StoreConfig::Sqlite {
                path: "data/ledger.db".into()
            }
        );
    }

    #[test]
    fn http_workers_default_to_one_per_core_and_are_bounded() {
        let cores = std::thread::available_parallelism().unwrap();
        assert_eq!(parse(MINIMAL).unwrap().server.workers, cores);
        let three = parse(&format!("[server]\nworkers = 3\n{MINIMAL}")).unwrap();
        assert_eq!(three.server.workers.get(), 3);
        for refused in [0, MAX_WORKERS + 1] {
            let error = error_of(&format!("[server]\nworkers = {refused}\n{MINIMAL}"));
            assert!(
                error.contains("gateway.toml:2:11: [server] workers must be between 1 and 256"),
                "{error}"
            );
        }
    }

    #[test]
    fn keys_are_found_by_digest() {
        let config = parse(MINIMAL).unwrap();
        // The digest in MINIMAL is the SHA-256 of "foobar".
        let entry = config.key("foobar").unwrap();
        assert_eq!(
            (entry.team.name.as_str(), &*entry.label),
            ("design", "prod")
        );
        assert!(config.key("foobaz").is_none());
    }

    #[test]
    fn deliveries_per_team_take_a_quarter_of_the_slots_unless_set_and_never_none() {
        let webhooks = parse(MINIMAL).unwrap().webhooks;
        assert_eq!(
            (
                webhooks.max_concurrent_deliveries,
                webhooks.max_concurrent_deliveries_per_team
            ),
            (32, 8)
        );
        let error = error_of(&format!(
            "{MINIMAL}\n[webhooks]\nmax_concurrent_deliveries_per_team = 0\n"
        ));
        assert!(
            error.contains("max_concurrent_deliveries_per_team, max_callback_bytes and"),
            "{error}"
        );
    }

    #[test]
    fn callbacks_may_be_larger_than_requests_but_not_empty() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.webhooks.max_callback_bytes, 32 << 20);
        assert_eq!(config.server.max_body_bytes, 1 << 20);
        let error = error_of(&format!("{MINIMAL}\n[webhooks]\nmax_callback_bytes = 0\n"));
        assert!(
            error.contains("max_callback_bytes and keep_finished must be above zero"),
            "{error}"
        );
    }

    #[test]
    fn durations_past_a_century_are_refused_before_any_time_is_computed_from_them() {
        for setting in [
            "[webhooks]\ndelivery_deadline",
            "[webhooks]\nmax_retry_delay",
            "[reconciler]\nmax_task_age",
        ] {
            let error = error_of(&format!("{MINIMAL}\n{setting} = \"1000000y\"\n"));
            assert!(
                error.contains("duration \"1000000y\" is longer than the most allowed, 100 years"),
                "{setting}: {error}"
            );
        }
        let config = parse(&format!(
            "{MINIMAL}\n[webhooks]\ndelivery_deadline = \"99y\"\n"
        ));
        assert!(config.is_ok(), "{:?}", config.err());
    }

    #[test]
    fn finished_deliveries_are_kept_a_week_unless_set_and_not_for_no_time() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(
            config.webhooks.keep_finished,
            Duration::from_secs(7 * 24 * 3600)
        );
        let config = parse(&format!("{MINIMAL}\n[webhooks]\nkeep_finished = \"36h\"\n")).unwrap();
        assert_eq!(
            config.webhooks.keep_finished,
            Duration::from_secs(36 * 3600)
        );
        let error = error_of(&format!("{MINIMAL}\n[webhooks]\nkeep_finished = \"0s\"\n"));
        assert!(
            error.contains("keep_finished must be above zero"),
            "{error}"
        );
    }

    #[test]
    fn the_ownership_index_is_bounded() {
        assert_eq!(parse(MINIMAL).unwrap().cache.max_owners, 1_000_000);
        let off = parse(&format!("{MINIMAL}\n[cache]\nmax_owners = 0\n")).unwrap();
        assert_eq!(off.cache.max_owners, 0);
        let error = error_of(&format!("{MINIMAL}\n[cache]\nmax_owners = 100000001\n"));
        assert!(
            error.contains("max_owners must be at most 100000000"),
            "{error}"
        );
    }

    #[test]
    fn the_status_cache_is_bounded_in_bytes_too() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.cache.max_bytes, 64 << 20);
        let error = error_of(&format!("{MINIMAL}\n[cache]\nmax_bytes = 0\n"));
        assert!(error.contains("max_bytes must be above zero"), "{error}");
        let off = parse(&format!(
            "{MINIMAL}\n[cache]\nmax_entries = 0\nmax_bytes = 0\n"
        ))
        .unwrap();
        assert_eq!(
            off.cache.max_entries, 0,
            "a cache that is off needs no byte bound"
        );
    }

    #[test]
    fn with_public_url_every_team_needs_a_webhook_secret() {
        let with_public_url = MINIMAL.replace(
            "[upstream]",
            "[server]\npublic_url = \"https://gw.example\"\n\n[upstream]",
        );
        let error = error_of(&with_public_url);
        assert!(error.starts_with("gateway.toml:11:1:"), "{error}");
        assert!(
            error.contains("team \"design\" has no webhook secret"),
            "{error}"
        );
        assert!(error.contains("--team design --webhook-secret"), "{error}");
        let signed = with_public_url.replace(
            "budget = {",
            "webhook_secret_env = \"KETCHUP_WEBHOOK_SECRET_DESIGN\"\nbudget = {",
        );
        assert!(parse(&signed).is_ok());
        // Without public_url nothing is relayed, so nothing needs signing.
        assert!(parse(MINIMAL).unwrap().teams[0].webhook_secret.is_none());
    }

    fn error_of(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn a_typo_names_file_line_and_key() {
        let text = MINIMAL.replace("budget = {", "budjet = {");
        let error = error_of(&text);
        assert!(error.starts_with("gateway.toml:11:1:"), "{error}");
        assert!(error.contains("unknown field `budjet`"), "{error}");
    }

    #[test]
    fn bad_values_name_their_line() {
        let cases = [
            (
                MINIMAL.replace("\"0.50\"", "\"0.5x\""),
                "gateway.toml:6:",
                "not a plain decimal",
            ),
            (
                MINIMAL.replace("\"monthly\"", "\"yearly\""),
                "gateway.toml:11:",
                "unknown variant `yearly`",
            ),
            (
                MINIMAL.replace("c3ab8ff1", "zzab8ff1"),
                "gateway.toml:10:",
                "64 hex digits",
            ),
            (
                MINIMAL.replace("name = \"design\"", "name = \"design team\""),
                "gateway.toml:9:",
                "must be 1 to 64 letters",
            ),
            (
                format!("{MINIMAL}\n[server]\nrequest_timeout = \"soon\"\n"),
                "gateway.toml:14:",
                "duration \"soon\" is not valid",
            ),
            (
                format!("{MINIMAL}\n[defaults.limits]\ngenerate = \"60 per minute\"\n"),
                "gateway.toml:14:",
                "must look like",
            ),
        ];
        for (text, at, what) in cases {
            let error = error_of(&text);
            assert!(
                error.starts_with(at) && error.contains(what),
                "{at} {what}: got {error}"
            );
        }
    }

    #[test]
    fn a_tls_redis_store_may_name_its_ca_and_client_certificate() {
        let config = parse(&format!(
            "{MINIMAL}\n[store]\nkind = \"redis\"\nurl = \"rediss://redis.internal:6380/2\"\n\
             ca_file = \"/etc/redis/ca.pem\"\nclient_cert_file = \"/etc/redis/client.pem\"\n\
             client_key_file = \"/run/secrets/redis-client-key\"\n"
        ))
        .unwrap();
        let StoreConfig::Redis { tls, .. } = config.store else {
            panic!("a Redis store");
        };
        assert_eq!(
            tls,
            RedisTls {
                ca_file: Some("/etc/redis/ca.pem".into()),
                client_cert: Some((
                    "/etc/redis/client.pem".into(),
                    "/run/secrets/redis-client-key".into()
                )),
            }
        );
    }

    #[test]
    fn a_redis_store_takes_its_password_from_outside_the_file() {
        let config = parse(&format!(
            "{MINIMAL}\n[store]\nkind = \"redis\"\nurl = \"rediss://redis.internal:6380/2\"\n\
             password_file = \"/run/secrets/redis\"\n"
        ))
        .unwrap();
        assert_eq!(
            config.store,
            StoreConfig::Redis {
                url: url::Url::parse("rediss://redis.internal:6380/2").unwrap(),
                password: Some(SecretSource::File("/run/secrets/redis".into())),
                key_prefix: "ketchup:".into(),
                command_timeout: Duration::from_millis(250),
                rate_limits_fail_open: false,
                tls: RedisTls::default(),
            }
        );
        let redis =
            |lines: &str| error_of(&format!("{MINIMAL}\n[store]\nkind = \"redis\"\n{lines}\n"));
        assert!(redis("").contains("needs url"));
        assert!(redis("url = \"redis://:hunter2@r:6379\"").contains("must not hold a password"));
        assert!(!redis("url = \"redis://:hunter2@r:6379\"").contains("hunter2"));
        assert!(redis("url = \"http://r:6379\"").contains("redis:// or rediss://"));
        assert!(redis("url = \"redis://r\"\npath = \"x.db\"").contains("path is for kind"));
        assert!(redis("url = \"redis://r\"\ncommand_timeout = \"0s\"").contains("above zero"));
        assert!(
            redis("url = \"redis://r\"\nrate_limits_when_unavailable = \"maybe\"")
                .contains("use \"refuse\"")
        );
        assert!(
            redis("url = \"redis://r\"\nca_file = \"ca.pem\"")
                .contains("must start with rediss://")
        );
        assert!(
            redis("url = \"rediss://r\"\nclient_cert_file = \"c.pem\"").contains("go together")
        );
        let sqlite_with_url = error_of(&format!(
            "{MINIMAL}\n[store]\npath = \"x.db\"\nkey_prefix = \"k:\"\n"
        ));
        assert!(
            sqlite_with_url.contains("are for kind = \"redis\""),
            "{sqlite_with_url}"
        );
    }

    #[test]
    fn cross_field_mistakes_are_refused() {
        let duplicate_team = format!(
            "{MINIMAL}\n[[teams]]\nname = \"design\"\nkeys = [{{ sha256 = \"{}\" }}]\n",
            KeyDigest::of("other").to_hex()
        );
        assert!(error_of(&duplicate_team).contains("team \"design\" is listed twice"));

        let shared_key = format!(
            "{MINIMAL}\n[[teams]]\nname = \"ads\"\nkeys = [{{ sha256 = \"{}\" }}]\n",
            KeyDigest::of("foobar").to_hex()
        );
        assert!(error_of(&shared_key).contains("already used by team \"design\""));

        let both_tokens = MINIMAL.replace(
            "token_env = \"KETCHUP_UPSTREAM_TOKEN\"",
            "token_env = \"A\"\ntoken_file = \"/run/secrets/t\"",
        );
        assert!(error_of(&both_tokens).contains("not both"));

        let no_token = MINIMAL.replace("token_env = \"KETCHUP_UPSTREAM_TOKEN\"", "");
        assert!(error_of(&no_token).contains("needs token_env or token_file"));

        let no_keys = MINIMAL.replace(
            "keys = [{ sha256 = \"c3ab8ff13720e8ad9047dd39466b3c8974e592c2fa383d4a3960714caef0c4f2\", label = \"prod\" }]",
            "keys = []",
        );
        assert!(error_of(&no_keys).contains("has no keys"));

        let slow_upstream = MINIMAL.replace(
            "token_env = \"KETCHUP_UPSTREAM_TOKEN\"",
            "token_env = \"KETCHUP_UPSTREAM_TOKEN\"\ntimeout = \"10m\"",
        );
        assert!(error_of(&slow_upstream).contains("abandon_after must be longer"));

        let token_in_file = MINIMAL.replace("token_env", "token");
        assert!(error_of(&token_in_file).contains("unknown field `token`"));
    }

    #[test]
    fn secrets_resolve_from_files_without_the_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "dk-secret\n").unwrap();
        let secret = SecretSource::File(path).resolve("upstream token").unwrap();
        assert_eq!(secret.expose(), "dk-secret");
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
        let missing =
            SecretSource::Env("KETCHUP_TEST_SURELY_UNSET".into()).resolve("upstream token");
        assert!(
            missing
                .unwrap_err()
                .to_string()
                .contains("KETCHUP_TEST_SURELY_UNSET is not set")
        );
    }
}
