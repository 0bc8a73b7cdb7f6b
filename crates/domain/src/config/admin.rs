//! `[admin]`: who may use the admin API, and how long its audit trail is kept. Without a token
//! the admin API is off.
//!
//! Admins are told apart by label, as team keys are: `tokens` lists labelled tokens by their
//! SHA-256 (`ketchup-gateway keygen` prints one), and the one token of `token_env` or
//! `token_file` is labelled `admin`. The label is what the audit trail records of who acted; the
//! token itself is never stored.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Invalid;
use super::values::{HumanDuration, KeyDigest, SecretSource, above_zero, secret_source};

/// The label of the token of `token_env` or `token_file`.
pub const SINGLE_TOKEN_LABEL: &str = "admin";
/// How long an admin action stays in the audit trail when `keep_audit` is not set.
const DEFAULT_KEEP_AUDIT: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest admin label, in bytes.
const MAX_LABEL_LEN: usize = 64;

/// `[admin]` as written: `token_env` or `token_file` (at most one), labelled `tokens`, and the
/// audit trail's retention.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    token_env: Option<Spanned<String>>,
    token_file: Option<Spanned<PathBuf>>,
    tokens: Option<Spanned<Vec<Spanned<RawToken>>>>,
    keep_audit: Option<Spanned<HumanDuration>>,
}

/// One of `tokens` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    sha256: KeyDigest,
    label: Spanned<String>,
}

/// The admin API's tokens and its audit trail's retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// The token of `token_env` or `token_file`, labelled [`SINGLE_TOKEN_LABEL`].
    pub token: Option<SecretSource>,
    /// Labelled tokens, by digest.
    pub tokens: Vec<AdminToken>,
    /// An admin action is listed by `GET /admin/audit` this long, then deleted.
    pub keep_audit: Duration,
}

/// A labelled admin token: its digest, and the label the audit trail names its holder by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminToken {
    pub digest: KeyDigest,
    pub label: String,
}

impl AdminConfig {
    /// Whether the admin API exists: some token opens it.
    pub fn enabled(&self) -> bool {
        self.token.is_some() || !self.tokens.is_empty()
    }

    /// The keys whose new value only a restart applies: the tokens are read once, at start.
    pub(super) fn restart_only_changes(&self, new: &Self) -> Vec<&'static str> {
        let AdminConfig {
            token,
            tokens,
            keep_audit: _,
        } = self;
        super::changed([
            ("token_env or token_file", *token != new.token),
            ("tokens", *tokens != new.tokens),
        ])
    }
}

impl TryFrom<RawAdmin> for AdminConfig {
    type Error = Invalid;

    fn try_from(raw: RawAdmin) -> Result<Self, Invalid> {
        let token = secret_source("[admin]", "token", raw.token_env, raw.token_file)?;
        let mut tokens: Vec<AdminToken> = Vec::new();
        if let Some(written) = raw.tokens {
            for entry in written.into_inner() {
                let span = entry.span();
                let entry = entry.into_inner();
                let label_span = entry.label.span();
                let label = entry.label.into_inner();
                if !valid_label(&label) {
                    return Err(Invalid::at(
                        label_span,
                        format!(
                            "[admin] tokens: label {label:?} must be 1 to {MAX_LABEL_LEN} letters, \
                             digits, '-', '_', '.' or '@'"
                        ),
                    ));
                }
                let taken = tokens.iter().any(|t| t.label == label)
                    || (token.is_some() && label == SINGLE_TOKEN_LABEL);
                if taken {
                    return Err(Invalid::at(
                        label_span,
                        format!(
                            "[admin] tokens: label {label:?} is used twice (the token of \
                             token_env or token_file is labelled {SINGLE_TOKEN_LABEL:?}); the \
                             audit trail tells admins apart by label"
                        ),
                    ));
                }
                if tokens.iter().any(|t| t.digest == entry.sha256) {
                    return Err(Invalid::at(
                        span,
                        "[admin] tokens: this sha256 is listed twice; every token has one label",
                    ));
                }
                tokens.push(AdminToken {
                    digest: entry.sha256,
                    label,
                });
            }
        }
        Ok(AdminConfig {
            token,
            tokens,
            keep_audit: above_zero("[admin] keep_audit", raw.keep_audit, DEFAULT_KEEP_AUDIT)?,
        })
    }
}

/// Labels are shown in listings and log lines: short, and free of anything that needs quoting.
fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= MAX_LABEL_LEN
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}
