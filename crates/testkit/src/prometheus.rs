//! The Prometheus text format, as far as the tests read it.

use std::collections::BTreeMap;

/// Labels of a sample, by name.
pub type Labels = BTreeMap<String, String>;

/// How close a float sample (a sum of credits) must be to the value a test expects.
pub const EPSILON: f64 = 1e-9;

/// One line of a metrics page.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: Labels,
    pub value: f64,
}

/// A metrics page: its text and its samples.
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

/// Labels from `(name, value)` pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn parse_value(text: &str) -> f64 {
    match text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => text
            .parse()
            .unwrap_or_else(|e| panic!("bad sample value {text:?}: {e}")),
    }
}

/// `name{a="x",b="y"} value` (label values with `\\`, `\"` and `\n` escapes).
fn parse_line(line: &str) -> Sample {
    let name_end = line
        .find(['{', ' '])
        .unwrap_or_else(|| panic!("no value in {line:?}"));
    let name = line[..name_end].to_owned();
    let mut labels = Labels::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let end;
        loop {
            // Skip separators, find `key="`.
            while let Some((_, c)) = chars.peek() {
                if *c == ',' || *c == ' ' {
                    chars.next();
                } else {
                    break;
                }
            }
            match chars.peek() {
                Some((i, '}')) => {
                    end = *i;
                    break;
                }
                None => panic!("unterminated labels in {line:?}"),
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line:?}");
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => panic!("bad escape in {line:?}"),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => value.push(c),
                    None => panic!("unterminated label value in {line:?}"),
                }
            }
            assert!(
                labels.insert(key.clone(), value).is_none(),
                "label {key} twice in {line:?}"
            );
        }
        rest = &inner[end + 1..];
    }
    let mut fields = rest.split_whitespace();
    let value = parse_value(
        fields
            .next()
            .unwrap_or_else(|| panic!("no value: {line:?}")),
    );
    Sample {
        name,
        labels,
        value,
    }
}

impl Scrape {
    /// `GET url`, which must answer 200 in the Prometheus text format.
    pub async fn fetch(http: &reqwest::Client, url: &str) -> Scrape {
        let response = http.get(url).send().await.expect("metrics answer");
        assert_eq!(response.status().as_u16(), 200, "GET {url}");
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            content_type.as_deref(),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        Scrape::parse(response.text().await.expect("metrics body"))
    }

    fn parse(text: String) -> Scrape {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(parse_line)
            .collect();
        Scrape { text, samples }
    }

    /// Every sample of `name`.
    pub fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// The value of the series with exactly these labels, if it exists.
    pub fn find(&self, name: &str, pairs: &[(&str, &str)]) -> Option<f64> {
        let wanted = labels(pairs);
        let mut found = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels == wanted);
        let value = found.next().map(|s| s.value);
        assert!(found.next().is_none(), "{name}{wanted:?} appears twice");
        value
    }

    /// The value of the series with exactly these labels; it must exist.
    pub fn get(&self, name: &str, pairs: &[(&str, &str)]) -> f64 {
        self.find(name, pairs).unwrap_or_else(|| {
            panic!(
                "no series {name}{pairs:?}; the series of that name are:\n{:#?}",
                self.series(name)
            )
        })
    }

    /// Asserts an exact value (counters, integer gauges).
    pub fn assert_eq(&self, name: &str, pairs: &[(&str, &str)], expected: f64) {
        let value = self.get(name, pairs);
        assert!(
            value == expected,
            "{name}{pairs:?} is {value}, expected {expected}"
        );
    }

    /// Asserts a float value within [`EPSILON`] (credit sums).
    pub fn assert_close(&self, name: &str, pairs: &[(&str, &str)], expected: f64) {
        let value = self.get(name, pairs);
        assert!(
            (value - expected).abs() < EPSILON,
            "{name}{pairs:?} is {value}, expected {expected} (± {EPSILON})"
        );
    }

    /// Asserts that the series of `name` are exactly `expected` (labels → value), no more.
    pub fn assert_series(&self, name: &str, expected: &BTreeMap<Labels, f64>) {
        let actual: BTreeMap<Labels, f64> = self
            .series(name)
            .into_iter()
            .map(|s| (s.labels.clone(), s.value))
            .collect();
        assert_eq!(&actual, expected, "series of {name}");
    }

    /// The value of one series, written as on the page (`name{labels}`); 0 if absent.
    pub(crate) fn value_of(&self, series: &str) -> f64 {
        self.text
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}
