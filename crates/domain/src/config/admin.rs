//! `[admin]`: the bearer token of the admin API; without one the admin API is off.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::Invalid;
use super::values::{SecretSource, secret_source};

/// `[admin]` as written: `token_env` or `token_file`, at most one.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    token_env: Option<Spanned<String>>,
    token_file: Option<Spanned<PathBuf>>,
}

/// Where the admin token comes from, if there is one.
pub(super) fn admin_token(raw: RawAdmin) -> Result<Option<SecretSource>, Invalid> {
    secret_source("[admin]", "token", raw.token_env, raw.token_file)
}
