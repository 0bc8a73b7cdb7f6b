//! `[reconciler]`: the background job that settles tasks no client polls to the end.

use std::num::NonZeroU32;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Invalid;
use super::values::{HumanDuration, above_zero};

const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
const DEFAULT_SETTLE_AFTER: Duration = Duration::from_secs(30);
const DEFAULT_MAX_READS_PER_SECOND: NonZeroU32 = NonZeroU32::new(10).unwrap();
const DEFAULT_MAX_TASK_AGE: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_ABANDON_AFTER: Duration = Duration::from_secs(300);

/// Shortest `settle_after`: the upstream asks for at most one status read per task per second.
const MIN_SETTLE_AFTER: Duration = Duration::from_secs(1);

/// `[reconciler]` as written; a key left out takes the default above.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReconciler {
    interval: Option<Spanned<HumanDuration>>,
    settle_after: Option<Spanned<HumanDuration>>,
    max_reads_per_second: Option<NonZeroU32>,
    max_task_age: Option<HumanDuration>,
    pub(super) abandon_after: Option<Spanned<HumanDuration>>,
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

impl TryFrom<RawReconciler> for ReconcilerConfig {
    type Error = Invalid;

    fn try_from(raw: RawReconciler) -> Result<Self, Invalid> {
        let settle_after = match raw.settle_after {
            Some(written) if Duration::from(*written.get_ref()) < MIN_SETTLE_AFTER => {
                return Err(Invalid::at(
                    written.span(),
                    "[reconciler] settle_after must be at least 1s (the upstream asks for at \
                     most one status read per task per second)",
                ));
            }
            Some(written) => written.into_inner().into(),
            None => DEFAULT_SETTLE_AFTER,
        };
        Ok(ReconcilerConfig {
            interval: above_zero("[reconciler] interval", raw.interval, DEFAULT_INTERVAL)?,
            settle_after,
            max_reads_per_second: raw
                .max_reads_per_second
                .unwrap_or(DEFAULT_MAX_READS_PER_SECOND),
            max_task_age: raw
                .max_task_age
                .map_or(DEFAULT_MAX_TASK_AGE, Duration::from),
            abandon_after: raw
                .abandon_after
                .map_or(DEFAULT_ABANDON_AFTER, |written| written.into_inner().into()),
        })
    }
}

impl ReconcilerConfig {
    /// The keys whose new value only a restart applies: the job's pace and read cap are set when
    /// it starts, and half of `settle_after` is how long a task a client just read is left alone,
    /// a bound fixed at start.
    pub(super) fn restart_only_changes(&self, new: &Self) -> Vec<&'static str> {
        let ReconcilerConfig {
            interval,
            max_reads_per_second,
            settle_after,
            // Read by each pass.
            max_task_age: _,
            abandon_after: _,
        } = self;
        super::changed([
            ("interval", *interval != new.interval),
            (
                "max_reads_per_second",
                *max_reads_per_second != new.max_reads_per_second,
            ),
            ("settle_after", *settle_after != new.settle_after),
        ])
    }
}
