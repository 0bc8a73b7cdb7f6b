//! `[[teams]]` and `[defaults.limits]`: who may call the gateway, with which keys, within which
//! budget and limits.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;
use toml::Spanned;

use super::Invalid;
use super::values::{DigestMap, HttpUrl, Instant, KeyDigest, Rate, SecretSource, secret_source};
use crate::credits::Credits;

/// The limits of a team when neither it nor `[defaults.limits]` sets them.
const BUILTIN_LIMITS: Limits = Limits {
    generate: Rate {
        count: NonZeroU32::new(60).unwrap(),
        per: Duration::from_secs(60),
    },
    generate_burst: NonZeroU32::new(10).unwrap(),
    query: Rate {
        count: NonZeroU32::new(20).unwrap(),
        per: Duration::from_secs(1),
    },
    query_burst: NonZeroU32::new(20).unwrap(),
    text: Rate {
        count: NonZeroU32::new(120).unwrap(),
        per: Duration::from_secs(60),
    },
    text_burst: NonZeroU32::new(20).unwrap(),
};

/// Longest team name, in bytes.
const MAX_NAME_LEN: usize = 64;

/// `[defaults]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    limits: Option<RawLimits>,
}

/// `[defaults.limits]` or a team's `limits` as written: each key left out is inherited.
#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    generate: Option<Rate>,
    generate_burst: Option<NonZeroU32>,
    query: Option<Rate>,
    query_burst: Option<NonZeroU32>,
    text: Option<Rate>,
    text_burst: Option<NonZeroU32>,
}

/// One `[[teams]]` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTeam {
    name: Spanned<String>,
    keys: Spanned<Vec<Spanned<RawKey>>>,
    budget: Option<RawBudget>,
    limits: Option<RawLimits>,
    webhook_secret_env: Option<Spanned<String>>,
    webhook_secret_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    callback_hosts: Vec<String>,
    models: Option<Spanned<Vec<Spanned<String>>>>,
    notify_url: Option<Spanned<HttpUrl>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    sha256: KeyDigest,
    label: Option<String>,
    not_before: Option<Spanned<Instant>>,
    expires_at: Option<Spanned<Instant>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    credits: Credits,
    period: BudgetPeriod,
    max_in_flight: Option<Spanned<u32>>,
    notify_at: Option<Spanned<Vec<Spanned<i64>>>>,
}

#[derive(Debug)]
pub struct Team {
    pub name: String,
    pub budget: Option<Budget>,
    pub limits: Limits,
    pub webhook_secret: Option<SecretSource>,
    pub callback_hosts: Vec<String>,
    /// The models the team may use; `None`: every configured model.
    pub models: Option<ModelAllowList>,
    /// Where the team's budget notifications go (http(s)); set exactly when its budget has
    /// `notify_at`, and only beside a webhook secret, which signs them.
    pub notify_url: Option<String>,
}

impl Team {
    /// Whether the team may use `model`.
    pub fn may_use(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|list| list.allows(model))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub credits: Credits,
    pub period: BudgetPeriod,
    pub max_in_flight: Option<u32>,
    /// The percentages of `credits` at which the team is notified; empty: none.
    pub notify_at: Thresholds,
}

/// Most percentages one `notify_at` may list.
pub const MAX_THRESHOLDS: usize = 10;

/// A set of whole percentages from 1 to 100, one bit each: what a budget's `notify_at` lists,
/// and which of them a team's spending has reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Thresholds(u128);

impl Thresholds {
    /// The set of `percents`; `None` if one is outside 1..=100.
    pub fn of(percents: impl IntoIterator<Item = u8>) -> Option<Thresholds> {
        let mut set = Thresholds::default();
        for percent in percents {
            if !(1..=100).contains(&percent) {
                return None;
            }
            set.0 |= 1 << percent;
        }
        Some(set)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, percent: u8) -> bool {
        percent <= 100 && self.0 & (1 << percent) != 0
    }

    /// The percentages in this set and not in `other`.
    pub fn without(self, other: Thresholds) -> Thresholds {
        Thresholds(self.0 & !other.0)
    }

    pub fn with(self, other: Thresholds) -> Thresholds {
        Thresholds(self.0 | other.0)
    }

    /// The percentages in ascending order.
    pub fn iter(self) -> impl Iterator<Item = u8> {
        (1..=100u8).filter(move |&p| self.contains(p))
    }

    /// Those of the set that `used` credits reach or pass, out of `budget`: `used` is at least
    /// `percent`/100 of it, exactly, in integer units.
    pub fn reached(self, budget: Credits, used: Credits) -> Thresholds {
        let (budget, used) = (i128::from(budget.units()), i128::from(used.units()));
        Thresholds::of(
            self.iter()
                .filter(|&p| used * 100 >= budget * i128::from(p)),
        )
        .expect("a subset of the set")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
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
    /// Text requests (chat completions, messages, generateContent), streamed or not.
    pub text: Rate,
    pub text_burst: NonZeroU32,
}

/// Whose a key is, the admin's label for it (not secret: it names the key in logs and metrics,
/// which shows whether an old key is still in use before it is removed), and when it is valid.
#[derive(Debug, Clone)]
pub struct KeyEntry {
    pub team: Arc<Team>,
    pub label: Arc<str>,
    pub not_before: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Where an instant falls in a key's validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyWindow {
    Valid,
    NotYetValid,
    Expired,
}

impl KeyWindow {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyWindow::Valid => "valid",
            KeyWindow::NotYetValid => "not_yet_valid",
            KeyWindow::Expired => "expired",
        }
    }
}

impl KeyEntry {
    /// The key's name in usage reports and metrics: the admin's label, or for a key without one
    /// the start of its digest (which the config file shows anyway), so two unlabelled keys stay
    /// apart.
    pub fn name(&self, digest: &KeyDigest) -> Arc<str> {
        if self.label.is_empty() {
            format!("sha256:{}", &digest.to_hex()[..12]).into()
        } else {
            self.label.clone()
        }
    }

    /// `not_before` is the first valid instant; `expires_at` the first invalid one.
    pub fn window_at(&self, now: DateTime<Utc>) -> KeyWindow {
        if self.not_before.is_some_and(|start| now < start) {
            KeyWindow::NotYetValid
        } else if self.expires_at.is_some_and(|end| now >= end) {
            KeyWindow::Expired
        } else {
            KeyWindow::Valid
        }
    }
}

/// A team's `models`: globs over model ids (`*` any run of characters, `?` one, `[…]` a class).
#[derive(Debug)]
pub struct ModelAllowList {
    patterns: Vec<String>,
    set: GlobSet,
}

impl ModelAllowList {
    pub fn allows(&self, model: &str) -> bool {
        self.set.is_match(model)
    }

    /// The patterns as written, for the refusal's detail.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

/// The teams in the file's order, and every key's entry by its digest.
pub(super) struct Teams {
    pub(super) teams: Vec<Arc<Team>>,
    pub(super) keys: DigestMap<KeyEntry>,
}

/// A team's table as messages name it: `[[teams]] name = "design":`.
pub(super) fn table_of(name: &str) -> String {
    format!("[[teams]] name = {name:?}:")
}

/// Validates every team, and that no two share a name or a key. `models` are the configured
/// model ids, which every allow-list pattern must match at least one of.
pub(super) fn teams(
    raw: Vec<Spanned<RawTeam>>,
    defaults: RawDefaults,
    models: &[&str],
) -> Result<Teams, Invalid> {
    let default_limits = match defaults.limits {
        Some(raw) => merge_limits(BUILTIN_LIMITS, raw),
        None => BUILTIN_LIMITS,
    };
    let mut teams: Vec<Arc<Team>> = Vec::with_capacity(raw.len());
    let mut keys = DigestMap::default();
    for raw_team in raw {
        let raw_team = raw_team.into_inner();
        let name_span = raw_team.name.span();
        let (team, team_keys) = team(raw_team, default_limits, models)?;
        if teams.iter().any(|t| t.name == team.name) {
            return Err(Invalid::at(
                name_span,
                format!(
                    "{} listed twice; every team needs a name of its own",
                    table_of(&team.name)
                ),
            ));
        }
        let team = Arc::new(team);
        for key in team_keys {
            let span = key.span();
            let key = key.into_inner();
            check_window(&team.name, &key)?;
            let entry = KeyEntry {
                team: team.clone(),
                label: key.label.unwrap_or_default().into(),
                not_before: key.not_before.map(|at| at.into_inner().0),
                expires_at: key.expires_at.map(|at| at.into_inner().0),
            };
            if let Some(other) = keys.insert(key.sha256, entry) {
                return Err(Invalid::at(
                    span,
                    format!(
                        "{} keys: this sha256 is already used by {} every key belongs to one \
                         team",
                        table_of(&team.name),
                        table_of(&other.team.name)
                    ),
                ));
            }
        }
        teams.push(team);
    }
    Ok(Teams { teams, keys })
}

/// A key's `not_before` and `expires_at` must leave it a moment of validity.
fn check_window(team: &str, key: &RawKey) -> Result<(), Invalid> {
    if let (Some(start), Some(end)) = (&key.not_before, &key.expires_at)
        && end.get_ref().0 <= start.get_ref().0
    {
        return Err(Invalid::at(
            end.span(),
            format!(
                "{} keys: expires_at must be later than not_before",
                table_of(team)
            ),
        ));
    }
    Ok(())
}

/// A team's `models`: every pattern a valid glob matching at least one configured model, so a
/// typo cannot silently lock a team out of what it was meant to use.
fn allow_list(
    table: &str,
    raw: Spanned<Vec<Spanned<String>>>,
    models: &[&str],
) -> Result<ModelAllowList, Invalid> {
    if raw.get_ref().is_empty() {
        return Err(Invalid::at(
            raw.span(),
            format!("{table} models is empty; leave it out to allow every configured model"),
        ));
    }
    let mut set = GlobSetBuilder::new();
    let mut patterns = Vec::with_capacity(raw.get_ref().len());
    for pattern in raw.into_inner() {
        let span = pattern.span();
        let pattern = pattern.into_inner();
        let glob = Glob::new(&pattern).map_err(|e| {
            Invalid::at(
                span.clone(),
                format!("{table} models: {pattern:?} is not a glob: {e}"),
            )
        })?;
        let matcher = glob.compile_matcher();
        if !models.iter().any(|model| matcher.is_match(model)) {
            return Err(Invalid::at(
                span,
                format!("{table} models: {pattern:?} matches no model under [models]"),
            ));
        }
        set.add(glob);
        patterns.push(pattern);
    }
    let set = set
        .build()
        .map_err(|e| Invalid::new(None, format!("{table} models: {e}")))?;
    Ok(ModelAllowList { patterns, set })
}

/// One team, with its keys still to be checked against the other teams'.
fn team(
    raw: RawTeam,
    default_limits: Limits,
    models: &[&str],
) -> Result<(Team, Vec<Spanned<RawKey>>), Invalid> {
    let name_span = raw.name.span();
    let name = raw.name.into_inner();
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Invalid::at(
            name_span,
            format!(
                "[[teams]] name {name:?} must be 1 to {MAX_NAME_LEN} letters, digits, '-' or '_'"
            ),
        ));
    }
    let table = table_of(&name);
    if raw.keys.get_ref().is_empty() {
        return Err(Invalid::at(
            raw.keys.span(),
            format!("{table} keys is empty; add one with `ketchup-gateway keygen --team {name}`"),
        ));
    }
    let notify_at_span = raw
        .budget
        .as_ref()
        .and_then(|b| b.notify_at.as_ref().map(Spanned::span));
    let budget = match raw.budget {
        None => None,
        Some(budget) => Some(Budget {
            credits: budget.credits,
            period: budget.period,
            max_in_flight: match budget.max_in_flight {
                Some(cap) if *cap.get_ref() == 0 => {
                    return Err(Invalid::at(
                        cap.span(),
                        format!("{table} budget.max_in_flight must be at least 1"),
                    ));
                }
                cap => cap.map(Spanned::into_inner),
            },
            notify_at: match budget.notify_at {
                None => Thresholds::default(),
                Some(list) => notify_at(&table, budget.credits, list)?,
            },
        }),
    };
    let webhook_secret = secret_source(
        &table,
        "webhook_secret",
        raw.webhook_secret_env,
        raw.webhook_secret_file,
    )?;
    let notify_url = notify_url(
        &table,
        notify_at_span,
        webhook_secret.is_some(),
        raw.notify_url,
    )?;
    let team = Team {
        name,
        budget,
        limits: raw
            .limits
            .map_or(default_limits, |raw| merge_limits(default_limits, raw)),
        webhook_secret,
        callback_hosts: raw.callback_hosts,
        models: raw
            .models
            .map(|list| allow_list(&table, list, models))
            .transpose()?,
        notify_url,
    };
    Ok((team, raw.keys.into_inner()))
}

/// A budget's `notify_at`: 1 to [`MAX_THRESHOLDS`] whole percentages of a budget above zero,
/// each from 1 to 100, strictly increasing (so none twice).
fn notify_at(
    table: &str,
    credits: Credits,
    list: Spanned<Vec<Spanned<i64>>>,
) -> Result<Thresholds, Invalid> {
    let key = format!("{table} budget.notify_at");
    let span = list.span();
    let list = list.into_inner();
    if list.is_empty() {
        return Err(Invalid::at(
            span,
            format!("{key} is empty; leave it out for no budget notifications"),
        ));
    }
    if list.len() > MAX_THRESHOLDS {
        return Err(Invalid::at(
            span,
            format!(
                "{key} lists {} percentages; at most {MAX_THRESHOLDS}",
                list.len()
            ),
        ));
    }
    if credits <= Credits::ZERO {
        return Err(Invalid::at(
            span,
            format!("{key} needs a budget above zero credits: it names percentages of it"),
        ));
    }
    let mut percents = Vec::with_capacity(list.len());
    for written in list {
        let at = written.span();
        let percent = match u8::try_from(*written.get_ref()) {
            Ok(p @ 1..=100) => p,
            _ => {
                return Err(Invalid::at(
                    at,
                    format!(
                        "{key}: {} is not a whole percentage from 1 to 100",
                        written.get_ref()
                    ),
                ));
            }
        };
        if let Some(&before) = percents.last()
            && percent <= before
        {
            let what = if percent == before {
                "is listed twice"
            } else {
                "comes after a larger one"
            };
            return Err(Invalid::at(
                at,
                format!("{key}: {percent} {what}; list each percentage once, smallest first"),
            ));
        }
        percents.push(percent);
    }
    Ok(Thresholds::of(percents).expect("each checked to be from 1 to 100"))
}

/// A team's `notify_url`, which goes with `budget.notify_at` both ways (either alone would be a
/// notification configured to go nowhere, or never to be sent), and needs a webhook secret:
/// notifications are signed as every delivery is.
fn notify_url(
    table: &str,
    notify_at: Option<std::ops::Range<usize>>,
    signed: bool,
    url: Option<Spanned<HttpUrl>>,
) -> Result<Option<String>, Invalid> {
    match (url, notify_at) {
        (None, Some(notify_at)) => Err(Invalid::at(
            notify_at,
            format!("{table} budget.notify_at needs notify_url: where the notifications go"),
        )),
        (None, None) => Ok(None),
        (Some(url), None) => Err(Invalid::at(
            url.span(),
            format!(
                "{table} notify_url needs budget.notify_at: the percentages of the budget at \
                 which to notify"
            ),
        )),
        (Some(url), Some(_)) if !signed => Err(Invalid::at(
            url.span(),
            format!(
                "{table} notify_url needs webhook_secret_env or webhook_secret_file: budget \
                 notifications are signed as every delivery is"
            ),
        )),
        (Some(url), Some(_)) => Ok(Some(url.into_inner().0.into())),
    }
}

fn merge_limits(base: Limits, raw: RawLimits) -> Limits {
    let generate = raw.generate.unwrap_or(base.generate);
    let query = raw.query.unwrap_or(base.query);
    let text = raw.text.unwrap_or(base.text);
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
        text,
        text_burst: raw.text_burst.unwrap_or(if raw.text.is_some() {
            text.count
        } else {
            base.text_burst
        }),
    }
}
