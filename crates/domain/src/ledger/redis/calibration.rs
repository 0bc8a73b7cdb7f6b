//! Settled costs in Redis: a hash per day, model and value (`settled over max` and a count per
//! bucket, `b:{units}`) and a set per day naming them, deleted as the window leaves their day
//! (and expiring then, should nothing be written the day after).

use std::sync::LazyLock;

use async_trait::async_trait;
use chrono::{Days, NaiveDate, TimeZone, Utc};
use redis::{Pipeline, Script, Value};

use super::{RedisStore, accepted, flag, parse, unexpected};
use crate::calibration::{
    CostHistogram, CostKeyOf, CostSample, WINDOW_DAYS, bucket, day_key, window_start,
};
use crate::credits::Credits;
use crate::ledger::{Calibration, StoreError};

static CALIBRATE: LazyLock<Script> = ledger_script!("calibrate.lua");

/// Most days one read covers: a window, with room for a clock that is a day off.
const MOST_DAYS: u64 = WINDOW_DAYS + 1;

impl RedisStore {
    fn settled_costs_key(&self, day: &str) -> String {
        format!("{}settled-costs:{day}", self.keys.prefix)
    }
}

/// A model and value as the day's set names them: a JSON array, so any text stays unambiguous.
fn member(model: &str, value: &Option<String>) -> String {
    serde_json::json!([model, value]).to_string()
}

#[async_trait]
impl Calibration for RedisStore {
    async fn record_cost(&self, sample: &CostSample) -> Result<(), StoreError> {
        let day = sample.at.date_naive();
        // The day is read for the window's length, from its own midnight on: its time to live
        // counts from the sample's time, so it follows the gateway's clock, not the server's.
        let expires = day
            .checked_add_days(Days::new(WINDOW_DAYS))
            .map(|end| Utc.from_utc_datetime(&end.and_time(chrono::NaiveTime::MIN)))
            .ok_or_else(|| unexpected("a day beyond the calendar"))?;
        let ttl = (expires - sample.at).num_milliseconds().max(1);
        let stale = window_start(sample.at)
            .pred_opt()
            .ok_or_else(|| unexpected("a day before the calendar"))?;
        let mut call = self.script(&CALIBRATE);
        call.arg(day_key(day))
            .arg(member(&sample.model, &sample.value))
            .arg(flag(sample.over))
            .arg(sample.each.units())
            .arg(bucket(sample.each).units())
            .arg(ttl)
            .arg(day_key(stale));
        accepted(self.eval(&call).await?)
    }

    async fn settled_costs(
        &self,
        first: NaiveDate,
        last: NaiveDate,
    ) -> Result<Vec<(CostKeyOf, CostHistogram)>, StoreError> {
        let days: Vec<String> = first
            .iter_days()
            .take_while(|day| *day <= last)
            .take(MOST_DAYS as usize)
            .map(|day| self.settled_costs_key(&day_key(day)))
            .collect();
        let mut pipeline = Pipeline::new();
        for day in &days {
            pipeline.cmd("SMEMBERS").arg(day);
        }
        if pipeline.is_empty() {
            return Ok(Vec::new());
        }
        let mut connection = self.connection.clone();
        let members: Vec<Vec<String>> = self.bounded(pipeline.query_async(&mut connection)).await?;
        let mut keys = Vec::new();
        let mut pipeline = Pipeline::new();
        for (day, members) in days.iter().zip(members) {
            for member in members {
                pipeline.cmd("HGETALL").arg(format!("{day}:{member}"));
                let (model, value): (String, Option<String>) = serde_json::from_str(&member)
                    .map_err(|e| unexpected(format!("settled-costs member {member:?}: {e}")))?;
                keys.push((model, value));
            }
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let hashes: Vec<Vec<(String, Value)>> =
            self.bounded(pipeline.query_async(&mut connection)).await?;
        let mut records = Vec::with_capacity(keys.len());
        for (key, fields) in keys.into_iter().zip(hashes) {
            let mut histogram = CostHistogram::default();
            for (field, value) in fields {
                let count = || parse::<u64>(value.clone());
                match field.as_str() {
                    "settled" => histogram.settled = count()?,
                    "over" => histogram.over = count()?,
                    "max" => histogram.max = Credits::from_units(parse(value)?),
                    other => {
                        let bound = other
                            .strip_prefix("b:")
                            .and_then(|units| units.parse().ok())
                            .ok_or_else(|| unexpected(format!("settled-costs field {other:?}")))?;
                        histogram
                            .buckets
                            .insert(Credits::from_units(bound), count()?);
                    }
                }
            }
            // A hash that expired between the two reads.
            if histogram.settled > 0 {
                records.push((key, histogram));
            }
        }
        Ok(records)
    }
}
