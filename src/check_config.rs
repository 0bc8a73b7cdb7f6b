//! `ketchup-gateway check-config`: a configuration file checked, and with `--against URL` set
//! against the costs a running gateway settled, before it is deployed there.
//!
//! The running gateway's `GET /admin/models` gives, per model and cost-field value, what was
//! settled; the table printed sets the checked configuration's reservations against it. The
//! admin token comes from `KETCHUP_ADMIN_TOKEN`, never the command line, where other users of
//! the machine could read it.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use ketchup_domain::calibration::{self, Line, Row};
use ketchup_domain::config::Config;
use serde::Deserialize;

/// Where the admin token for `--against` is read from.
pub const ADMIN_TOKEN_ENV: &str = "KETCHUP_ADMIN_TOKEN";

/// How long the running gateway has to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The most of its answer read: far more than any table of configured models takes.
const MOST_BYTES: usize = 16 << 20;

/// How a valid configuration compares with the running gateway's settled costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every reservation is at least the largest cost settled for it (or nothing was settled).
    Fits,
    /// Some reservation is below a settled cost: teams could overrun their budgets.
    BelowSettled,
}

/// `GET /admin/models` as this command reads it.
#[derive(Deserialize)]
struct Models {
    from: String,
    to: String,
    models: Vec<Line>,
}

/// Checks the configuration at `path`; with `against`, prints its table against the running
/// gateway at that URL. `Err` for an invalid configuration or a gateway that cannot be read.
pub async fn run(path: &Path, against: Option<&str>) -> Result<Verdict, String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    println!(
        "{}: ok ({} teams, {} models)",
        path.display(),
        config.teams.len(),
        config.models.len()
    );
    let Some(url) = against else {
        return Ok(Verdict::Fits);
    };
    let token = std::env::var(ADMIN_TOKEN_ENV)
        .ok()
        .filter(|token| !token.is_empty())
        .ok_or_else(|| format!("--against needs the admin token in {ADMIN_TOKEN_ENV}"))?;
    let models = fetch(url, &token).await?;
    let rows = calibration::rows(&config, &calibration::observed_of(&models.models));
    println!(
        "Reservations of {} against the costs {url} settled from {} to {}:",
        path.display(),
        models.from,
        models.to
    );
    print!("{}", table(&rows));
    let below = rows.iter().filter(|row| row.fit().exceeded()).count();
    if below == 0 {
        return Ok(Verdict::Fits);
    }
    println!(
        "{below} reservation(s) below the costs settled for them: a team can overrun its budget \
         by the difference times its tasks in flight. Raise them to at least the max."
    );
    Ok(Verdict::BelowSettled)
}

/// Reads `{url}/admin/models` with the admin token.
async fn fetch(url: &str, token: &str) -> Result<Models, String> {
    let target = format!("{}/admin/models", url.trim_end_matches('/'));
    let uri: http::Uri = target.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    let client = Client::builder(TokioExecutor::new()).build::<_, Empty<Bytes>>(https);
    let mut request = http::Request::get(uri)
        .body(Empty::new())
        .map_err(|e| format!("bad URL {url}: {e}"))?;
    let bearer = http::HeaderValue::try_from(format!("Bearer {token}"))
        .map_err(|_| format!("{ADMIN_TOKEN_ENV} holds characters a header cannot"))?;
    request
        .headers_mut()
        .insert(http::header::AUTHORIZATION, bearer);
    let answer = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("{target}: {e}"))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MOST_BYTES)
            .collect()
            .await
            .map_err(|e| format!("{target}: {e}"))?
            .to_bytes();
        Ok::<_, String>((status, body))
    };
    let (status, body) = tokio::time::timeout(TIMEOUT, answer)
        .await
        .map_err(|_| format!("{target} did not answer within {} s", TIMEOUT.as_secs()))??;
    if status != http::StatusCode::OK {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|envelope| envelope["message"].as_str().map(str::to_owned))
            .unwrap_or_default();
        return Err(format!("{target} answered {status} {message}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("{target} answered an unknown table: {e}"))
}

/// The rows as aligned columns, a header first.
pub fn table(rows: &[Row]) -> String {
    let amount = |credits: Option<ketchup_domain::credits::Credits>| {
        credits.map_or_else(|| "-".to_owned(), |c| c.to_string())
    };
    let mut cells = vec![
        [
            "model", "value", "reserve", "settled", "over", "p50", "p99", "max", "fit",
        ]
        .map(str::to_owned),
    ];
    for row in rows {
        let seen = row.observed.as_ref();
        let value = match (&row.field, &row.value) {
            (Some(field), Some(value)) => format!("{field}={value}"),
            (None, Some(value)) => value.clone(),
            _ => "-".to_owned(),
        };
        cells.push([
            row.model.clone(),
            value,
            amount(row.reservation),
            seen.map_or(0, |s| s.settled).to_string(),
            seen.map_or(0, |s| s.over_reservation).to_string(),
            amount(seen.map(|s| s.p50)),
            amount(seen.map(|s| s.p99)),
            amount(seen.map(|s| s.max)),
            row.fit().as_str().to_owned(),
        ]);
    }
    let mut widths = [0; 9];
    for line in &cells {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in &cells {
        let mut text = String::new();
        for (cell, width) in line.iter().zip(widths) {
            text.push_str(&format!("{cell:<width$}  "));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}
