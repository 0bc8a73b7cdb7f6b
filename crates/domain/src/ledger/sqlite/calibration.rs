//! Settled costs in SQLite: a row of totals and a row per bucket for each day, model and value,
//! added to in the writer's transaction; days before the window are deleted as new ones come.

use async_trait::async_trait;
use chrono::NaiveDate;
use rusqlite::params;

use super::{SqliteStore, execute, unavailable};
use crate::calibration::{CostHistogram, CostKeyOf, CostSample, bucket, day_key, window_start};
use crate::credits::Credits;
use crate::ledger::{Calibration, StoreError};

/// A cost-field value as the tables key it: `(priced, value)`, `(0, '')` for a flat reserve.
fn stored(value: &Option<String>) -> (i64, &str) {
    match value {
        Some(value) => (1, value.as_str()),
        None => (0, ""),
    }
}

#[async_trait]
impl Calibration for SqliteStore {
    async fn record_cost(&self, sample: &CostSample) -> Result<(), StoreError> {
        let sample = sample.clone();
        self.write(move |conn| {
            let day = day_key(sample.at.date_naive());
            let oldest = day_key(window_start(sample.at));
            let (priced, value) = stored(&sample.value);
            let each = sample.each.units();
            execute(
                conn,
                "INSERT INTO settled_costs (day, model, priced, value, settled, over, max)
                     VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6)
                     ON CONFLICT DO UPDATE SET settled = settled + 1, over = over + excluded.over,
                         max = max(max, excluded.max)",
                params![
                    day,
                    sample.model,
                    priced,
                    value,
                    i64::from(sample.over),
                    each
                ],
            )
            .and_then(|_| {
                execute(
                    conn,
                    "INSERT INTO settled_cost_buckets (day, model, priced, value, bucket, settled)
                         VALUES (?1, ?2, ?3, ?4, ?5, 1)
                         ON CONFLICT DO UPDATE SET settled = settled + 1",
                    params![
                        day,
                        sample.model,
                        priced,
                        value,
                        bucket(sample.each).units()
                    ],
                )
            })
            // Both keyed by day first: deleting what the window left behind is a range.
            .and_then(|_| execute(conn, "DELETE FROM settled_costs WHERE day < ?1", [&oldest]))
            .and_then(|_| {
                execute(
                    conn,
                    "DELETE FROM settled_cost_buckets WHERE day < ?1",
                    [&oldest],
                )
            })
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn settled_costs(
        &self,
        first: NaiveDate,
        last: NaiveDate,
    ) -> Result<Vec<(CostKeyOf, CostHistogram)>, StoreError> {
        let (first, last) = (day_key(first), day_key(last));
        self.read(move |conn| {
            let key =
                |model: String, priced: i64, value: String| (model, (priced != 0).then_some(value));
            let mut totals = conn
                .prepare_cached(
                    "SELECT day, model, priced, value, settled, over, max FROM settled_costs
                         WHERE day >= ?1 AND day <= ?2 ORDER BY day, model, priced, value",
                )
                .map_err(unavailable)?;
            let mut days: Vec<(String, CostKeyOf, CostHistogram)> = totals
                .query_map([&first, &last], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        key(r.get(1)?, r.get(2)?, r.get(3)?),
                        CostHistogram {
                            settled: r.get::<_, i64>(4)?.unsigned_abs(),
                            over: r.get::<_, i64>(5)?.unsigned_abs(),
                            max: Credits::from_units(r.get(6)?),
                            buckets: Default::default(),
                        },
                    ))
                })
                .and_then(Iterator::collect)
                .map_err(unavailable)?;
            let mut buckets = conn
                .prepare_cached(
                    "SELECT day, model, priced, value, bucket, settled FROM settled_cost_buckets
                         WHERE day >= ?1 AND day <= ?2",
                )
                .map_err(unavailable)?;
            let rows = buckets
                .query_map([&first, &last], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        key(r.get(1)?, r.get(2)?, r.get(3)?),
                        Credits::from_units(r.get(4)?),
                        r.get::<_, i64>(5)?.unsigned_abs(),
                    ))
                })
                .map_err(unavailable)?;
            for row in rows {
                let (day, key, bound, count) = row.map_err(unavailable)?;
                // `days` is sorted by day and key, as the totals were read.
                if let Ok(at) = days.binary_search_by(|(d, k, _)| (d, k).cmp(&(&day, &key))) {
                    days[at].2.buckets.insert(bound, count);
                }
            }
            Ok(days.into_iter().map(|(_, key, h)| (key, h)).collect())
        })
        .await
    }
}
