//! Configuration: the admin-facing TOML file.
//!
//! Each table of the file has its own module with two types: a raw one that mirrors the table
//! key for key (`deny_unknown_fields`, so a typo such as `budjet` is an error rather than a
//! silently ignored key), beside the defaults of the keys left out, and the validated one the
//! gateway runs with, made from the raw one by a single conversion. Every value that can be wrong
//! on its own is parsed while the file is read (durations, rates, credits, key digests, URLs, the
//! closed sets of words such as `store.kind`), so its error names its key and line; a value wrong
//! only beside others is checked by its table's conversion, or by [`check_across_sections`] when
//! the others are in other tables.

mod admin;
mod cache;
mod location;
mod models;
mod reconciler;
mod routes;
mod server;
mod store;
mod teams;
#[cfg(test)]
mod tests;
mod upstream;
mod values;
mod webhooks;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::route_table::{RawRoute, RouteTable};

pub use admin::{AdminConfig, AdminToken, SINGLE_TOKEN_LABEL};
pub use cache::CacheConfig;
pub use models::{DEFAULT_MAX_OUTPUT_TOKENS, Model, ModelKind};
pub use reconciler::ReconcilerConfig;
pub use server::{
    DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_KEEP_ALIVE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, MAX_WORKERS,
    ServerConfig,
};
pub use store::{RateLimitsWhenUnavailable, RedisTls, StoreConfig};
pub use teams::{
    Budget, BudgetPeriod, KeyEntry, KeyWindow, Limits, MAX_THRESHOLDS, ModelAllowList, Team,
    Thresholds,
};
pub use upstream::{
    DEFAULT_ACCOUNT, DEFAULT_MAX_REFERENCE_IMAGES, FIRST_RETRY_DELAY, MAX_ACCOUNTS,
    MAX_RETRY_DELAY, UpstreamAccount, UpstreamConfig,
};
pub use values::{DigestMap, KeyDigest, Rate, Secret, SecretSource};
pub use webhooks::WebhooksConfig;

/// A configuration problem, already phrased for the admin: it names the file, the line, the key
/// and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    fn at(path: &Path, source: &str, span: Option<Range<usize>>, what: &str) -> Self {
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

    /// Something the TOML reader refused (bad syntax, an unknown key, a value of the wrong type
    /// or outside its set), named by its place in the file: its message names only the value.
    fn unreadable(path: &Path, source: &str, error: &toml::de::Error) -> Self {
        let mut message = error.message().trim_end().to_owned();
        // The reader says only "duplicate key": the key is the text the error points at.
        if message == "duplicate key"
            && let Some(key) = error.span().and_then(|span| source.get(span))
        {
            message = format!("duplicate key `{}`", key.trim_matches('"'));
        }
        let what = match error
            .span()
            .and_then(|span| location::describe(source, span.start))
        {
            Some(place) => format!("{place}: {message}"),
            None => message,
        };
        ConfigError::at(path, source, error.span(), &what)
    }
}

/// A value found wrong once the file was read. Its message names the key as the admin wrote it;
/// `at` is where it is written, `None` when the key was left out and its default is what clashes.
#[derive(Debug)]
struct Invalid {
    at: Option<Range<usize>>,
    message: String,
}

impl Invalid {
    fn new(at: Option<Range<usize>>, message: impl Into<String>) -> Self {
        Invalid {
            at,
            message: message.into(),
        }
    }

    fn at(span: Range<usize>, message: impl Into<String>) -> Self {
        Invalid::new(Some(span), message)
    }
}

/// Where a key the file may leave out is written.
fn span_of<T>(key: &Option<Spanned<T>>) -> Option<Range<usize>> {
    key.as_ref().map(Spanned::span)
}

/// The names among `keys` whose value changed.
fn changed<const N: usize>(keys: [(&'static str, bool); N]) -> Vec<&'static str> {
    keys.into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
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
    pub admin: AdminConfig,
    pub models: BTreeMap<String, Model>,
    /// The asynchronous endpoints served: the built-in ones and `[routes."…"]`.
    pub routes: RouteTable,
    pub teams: Vec<Arc<Team>>,
    keys: DigestMap<KeyEntry>,
}

/// The file as written: one field per table, each parsed by its module.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    server: server::RawServer,
    upstream: Spanned<upstream::RawUpstream>,
    #[serde(default)]
    store: store::RawStore,
    #[serde(default)]
    cache: cache::RawCache,
    #[serde(default)]
    reconciler: reconciler::RawReconciler,
    #[serde(default)]
    webhooks: webhooks::RawWebhooks,
    #[serde(default)]
    admin: admin::RawAdmin,
    #[serde(default)]
    models: BTreeMap<String, Spanned<models::RawModel>>,
    #[serde(default)]
    routes: BTreeMap<String, Spanned<RawRoute>>,
    #[serde(default)]
    defaults: teams::RawDefaults,
    #[serde(default)]
    teams: Vec<Spanned<teams::RawTeam>>,
}

/// Where the keys [`check_across_sections`] looks at are written, taken before the tables are
/// converted (the validated types keep no places).
struct CrossPlaces {
    abandon_after: Option<Range<usize>>,
    idempotency_ttl: Option<Range<usize>>,
    always_intercept: Option<Range<usize>>,
    /// Each team's table, in the file's order.
    teams: Vec<Range<usize>>,
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
        let raw: RawFile = toml::from_str(source)
            .map_err(|error| ConfigError::unreadable(path, source, &error))?;
        Config::validate(raw)
            .map_err(|invalid| ConfigError::at(path, source, invalid.at, &invalid.message))
    }

    fn validate(raw: RawFile) -> Result<Config, Invalid> {
        let places = CrossPlaces {
            abandon_after: span_of(&raw.reconciler.abandon_after),
            idempotency_ttl: span_of(&raw.server.idempotency_ttl),
            always_intercept: span_of(&raw.webhooks.always_intercept),
            teams: raw.teams.iter().map(Spanned::span).collect(),
        };
        let server = raw.server.try_into()?;
        let upstream: UpstreamConfig = raw.upstream.try_into()?;
        let routes = routes::routes(raw.routes, upstream.max_reference_images)?;
        let store = raw.store.try_into()?;
        let cache = raw.cache.try_into()?;
        let reconciler = raw.reconciler.try_into()?;
        let webhooks = raw.webhooks.try_into()?;
        let admin = raw.admin.try_into()?;
        let models = models::models(raw.models)?;
        let model_ids: Vec<&str> = models.keys().map(String::as_str).collect();
        let teams = teams::teams(raw.teams, raw.defaults, &model_ids)?;
        let config = Config {
            server,
            upstream,
            store,
            cache,
            reconciler,
            webhooks,
            admin,
            models,
            routes,
            teams: teams.teams,
            keys: teams.keys,
        };
        check_across_sections(&config, places)?;
        Ok(config)
    }

    /// The settings of `new` that differ from this configuration's but that only a restart
    /// applies, named as in the file (`[server] listen`, `[store]`): the running gateway read
    /// them once, when it started. A reload applies every other setting.
    ///
    /// No list here needs keeping up to date. The tables a restart alone applies are compared
    /// whole (`PartialEq`), so a key added to them is compared too. `Config` and the types of
    /// the tables a reload applies in part are taken apart in patterns without `..`, so a field
    /// added to them does not compile until it is sorted into restart-only or reloadable.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<String> {
        let Config {
            server,
            upstream,
            store,
            cache,
            reconciler,
            webhooks,
            admin,
            // Read by each request, or taken on by the rate limits and metrics at reload.
            models: _,
            routes,
            teams: _,
            keys: _,
        } = self;
        let in_part = |table: &str, keys: Vec<&str>| -> Vec<String> {
            keys.into_iter()
                .map(|key| format!("[{table}] {key}"))
                .collect()
        };
        let whole = |table: &str, changed: bool| -> Vec<String> {
            if changed {
                vec![format!("[{table}]")]
            } else {
                Vec::new()
            }
        };
        [
            in_part("server", server.restart_only_changes(&new.server)),
            in_part("upstream", upstream.restart_only_changes(&new.upstream)),
            // The ledger is opened once, at start.
            whole("store", *store != new.store),
            // The status cache and the ownership index are sized once, at start.
            whole("cache", *cache != new.cache),
            in_part(
                "reconciler",
                reconciler.restart_only_changes(&new.reconciler),
            ),
            in_part("webhooks", webhooks.restart_only_changes(&new.webhooks)),
            in_part("admin", admin.restart_only_changes(&new.admin)),
            // The router is built once, at start: a reload changes what a route checks, but
            // adds or removes no path.
            whole("routes", !routes.same_paths(&new.routes)),
        ]
        .concat()
    }

    /// The team a key belongs to. Keys are compared by digest only.
    pub fn key(&self, key: &str) -> Option<&KeyEntry> {
        self.keys.get(&KeyDigest::of(key))
    }

    /// The entry of a key whose digest is already known.
    pub fn key_by_digest(&self, digest: &KeyDigest) -> Option<&KeyEntry> {
        self.keys.get(digest)
    }

    /// Every team key, by digest, in no particular order.
    pub fn key_entries(&self) -> impl Iterator<Item = (&KeyDigest, &KeyEntry)> {
        self.keys.iter()
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

    /// A key's metric label: the name ([`KeyEntry::name`]) of one of the team's configured keys,
    /// else `unknown`, so that labels stay a bounded set whatever a ledger row says.
    pub fn key_label<'a>(&self, team: &str, key: &'a str) -> &'a str {
        let configured = self
            .keys
            .iter()
            .any(|(digest, entry)| entry.team.name == team && *entry.name(digest) == *key);
        if configured { key } else { "unknown" }
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

/// The checks that span tables: each table's conversion sees only its own keys.
fn check_across_sections(config: &Config, places: CrossPlaces) -> Result<(), Invalid> {
    let longest = config.upstream.longest_generation();
    if config.reconciler.abandon_after <= longest {
        return Err(Invalid::new(
            places.abandon_after,
            format!(
                "[reconciler] abandon_after ({}) must be longer than a generation can wait on \
                 the upstream ({}: [upstream] timeout, plus connect_timeout for each of the \
                 query_retries + 1 connection attempts, plus the waits between them), or \
                 requests still waiting for the upstream would be given up",
                humantime::format_duration(config.reconciler.abandon_after),
                humantime::format_duration(longest)
            ),
        ));
    }
    if config.server.idempotency_ttl <= config.reconciler.abandon_after {
        return Err(Invalid::new(
            places.idempotency_ttl,
            format!(
                "[server] idempotency_ttl ({}) must be longer than [reconciler] abandon_after \
                 ({}): a key must outlive every request of it that may still wait on the \
                 upstream, or a retry could start a second render",
                humantime::format_duration(config.server.idempotency_ttl),
                humantime::format_duration(config.reconciler.abandon_after)
            ),
        ));
    }
    let public_url = config.server.public_url.is_some();
    if config.webhooks.always_intercept && !public_url {
        return Err(Invalid::new(
            places.always_intercept,
            "[webhooks] always_intercept needs [server] public_url: the address at which the \
             upstream can reach this gateway",
        ));
    }
    if public_url {
        let mut teams = config.teams.iter().zip(places.teams);
        if let Some((team, span)) = teams.find(|(team, _)| team.webhook_secret.is_none()) {
            return Err(Invalid::at(
                span,
                format!(
                    "{} needs webhook_secret_env or webhook_secret_file: with [server] \
                     public_url set, the gateway relays callbacks to the team's callback_url and \
                     signs every delivery (`ketchup-gateway keygen --team {} --webhook-secret` \
                     prints one)",
                    teams::table_of(&team.name),
                    team.name
                ),
            ));
        }
    }
    Ok(())
}
