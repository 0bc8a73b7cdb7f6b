//! `[cache]`: the status cache and the in-memory index of who owns the newest tasks.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Invalid;
use super::values::HumanDuration;

const DEFAULT_STATUS_TTL: Duration = Duration::from_secs(1);
const DEFAULT_MAX_ENTRIES: u64 = 100_000;
const DEFAULT_MAX_BYTES: u64 = 64 << 20;
const DEFAULT_MAX_OWNERS: u64 = 1_000_000;

/// Most task owners kept in memory: up to 4 GB.
const MAX_OWNERS: u64 = 100_000_000;

/// `[cache]` as written; a key left out takes the default above.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    status_ttl: Option<HumanDuration>,
    max_entries: Option<u64>,
    max_bytes: Option<Spanned<u64>>,
    max_owners: Option<Spanned<u64>>,
}

/// Every key of it takes effect at start only: the cache and the ownership index are sized then.
#[derive(Debug, Clone, PartialEq, Eq)]
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

impl TryFrom<RawCache> for CacheConfig {
    type Error = Invalid;

    fn try_from(raw: RawCache) -> Result<Self, Invalid> {
        let max_entries = raw.max_entries.unwrap_or(DEFAULT_MAX_ENTRIES);
        let max_bytes = match raw.max_bytes {
            Some(bytes) if *bytes.get_ref() == 0 && max_entries > 0 => {
                return Err(Invalid::at(
                    bytes.span(),
                    "[cache] max_bytes must be above zero (turn the cache off with max_entries = 0)",
                ));
            }
            Some(bytes) => bytes.into_inner(),
            None => DEFAULT_MAX_BYTES,
        };
        let max_owners = match raw.max_owners {
            Some(owners) if *owners.get_ref() > MAX_OWNERS => {
                return Err(Invalid::at(
                    owners.span(),
                    format!(
                        "[cache] max_owners must be at most {MAX_OWNERS} (up to 40 bytes of \
                         memory each)"
                    ),
                ));
            }
            Some(owners) => owners.into_inner(),
            None => DEFAULT_MAX_OWNERS,
        };
        Ok(CacheConfig {
            status_ttl: raw.status_ttl.map_or(DEFAULT_STATUS_TTL, Duration::from),
            max_entries,
            max_bytes,
            max_owners,
        })
    }
}
