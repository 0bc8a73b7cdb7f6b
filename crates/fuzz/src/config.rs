//! `config`: `Config::parse` of any text, of generated valid files, and of valid files with one
//! thing broken.
//!
//! Any text: never a panic, and an error says where (`gateway.toml:line:column:` within the
//! file) and what. A generated file is written from a [`Spec`] of values for keys of every
//! table; it must load with exactly those values (and the spec's cross-table rules decide
//! whether it must load at all), and a reload of the same file must change nothing. A valid
//! file with one value replaced by a wrong one, an unknown key, a repeated line or a cut must be
//! refused with an error naming that key, or load.

use std::path::Path;
use std::time::Duration;

use arbitrary::Unstructured;
use ketchup_domain::config::{Config, KeyDigest, SecretSource, StoreConfig};
use ketchup_domain::credits::Credits;

use crate::generate::{below, flag, pick, text};

pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    match below(&mut u, 3) {
        0 => {
            let source = String::from_utf8_lossy(u.take_rest()).into_owned();
            let _ = parse(&source);
        }
        1 => {
            let spec = Spec::generate(&mut u);
            spec.check(parse(&spec.render()));
        }
        _ => broken(&mut u),
    }
}

/// Parses as the gateway does, and checks what any error says.
fn parse(source: &str) -> Result<Config, String> {
    let result = Config::parse(Path::new("gateway.toml"), source).map_err(|e| e.to_string());
    if let Err(message) = &result {
        let rest = message
            .strip_prefix("gateway.toml")
            .unwrap_or_else(|| panic!("the error names the file: {message}"));
        let place: Vec<&str> = rest.splitn(4, ':').collect();
        if let [_, line, column, what] = place[..]
            && let (Ok(line), Ok(column)) = (line.parse::<usize>(), column.parse::<usize>())
        {
            let lines = source.split('\n').count();
            assert!(
                (1..=lines).contains(&line),
                "line {line} of {lines}: {message}"
            );
            assert!(column >= 1, "{message}");
            assert!(!what.trim().is_empty(), "{message}");
            // The reader's own words for a repeated key, which names none.
            assert!(!what.ends_with("duplicate key"), "names the key: {message}");
        } else {
            assert!(rest.starts_with(": ") && rest.len() > 2, "{message}");
        }
    }
    result
}

/// A duration as written, and what it is.
type Written = (&'static str, Duration);

const DURATIONS: &[Written] = &[
    ("500ms", Duration::from_millis(500)),
    ("1s", Duration::from_secs(1)),
    ("2s", Duration::from_secs(2)),
    ("30s", Duration::from_secs(30)),
    ("5m", Duration::from_secs(300)),
    ("1h", Duration::from_secs(3600)),
    ("2h 30m", Duration::from_secs(9000)),
];

/// Values for keys of every table; `None` leaves a key out.
#[derive(Debug)]
struct Spec {
    listen: Option<String>,
    public_url: Option<&'static str>,
    workers: Option<usize>,
    max_body_bytes: Option<usize>,
    request_timeout: Option<Written>,
    token_env: bool,
    base_url: Option<&'static str>,
    timeout: Option<Written>,
    connect_timeout: Option<Written>,
    query_retries: Option<usize>,
    redis: Option<&'static str>,
    max_owners: Option<u64>,
    abandon_after: Option<Written>,
    settle_after: Option<Written>,
    always_intercept: Option<bool>,
    models: Vec<(String, &'static str)>,
    route: Option<&'static str>,
    teams: Vec<TeamSpec>,
}

#[derive(Debug)]
struct TeamSpec {
    name: String,
    keys: Vec<String>,
    budget: Option<(&'static str, &'static str, Option<u32>)>,
    generate: Option<(&'static str, u32, u64)>,
    secret: bool,
}

impl Spec {
    fn generate(u: &mut Unstructured) -> Spec {
        let models = (0..1 + below(u, 3))
            .map(|i| {
                let name = pick(u, &["google/gempix2", "sora-2", "a", "model-é"]);
                (
                    format!("{name}{i}"),
                    pick(u, &["0.50", "0", "1.25", "0.00000001"]),
                )
            })
            .collect();
        let teams = (0..below(u, 4))
            .map(|i| TeamSpec {
                name: format!("{}{i}", pick(u, &["design", "ads", "a-b_c"])),
                keys: (0..1 + below(u, 2))
                    .map(|k| format!("key {i} {k}"))
                    .collect(),
                budget: flag(u).then(|| {
                    let credits = pick(u, &["250.00", "0", "1.5", "92233720368.54775807"]);
                    let period = pick(u, &["daily", "weekly", "monthly", "lifetime"]);
                    (credits, period, flag(u).then(|| 1 + below(u, 100) as u32))
                }),
                generate: flag(u).then(|| {
                    let (unit, seconds) = pick(u, &[("s", 1), ("min", 60), ("h", 3600)]);
                    (unit, 1 + below(u, 1000) as u32, seconds)
                }),
                secret: flag(u),
            })
            .collect();
        Spec {
            listen: flag(u).then(|| format!("127.0.0.1:{}", below(u, 65536))),
            public_url: flag(u).then(|| pick(u, &["https://gw.example", "http://10.0.0.1:8/x"])),
            workers: flag(u).then(|| 1 + below(u, 256)),
            max_body_bytes: flag(u).then(|| below(u, 1 << 24)),
            request_timeout: flag(u).then(|| pick(u, DURATIONS)),
            token_env: flag(u),
            base_url: flag(u).then(|| pick(u, &["https://api.defapi.org", "http://127.0.0.1:9"])),
            timeout: flag(u).then(|| pick(u, DURATIONS)),
            connect_timeout: flag(u).then(|| pick(u, DURATIONS)),
            query_retries: flag(u).then(|| below(u, 40)),
            redis: flag(u).then(|| pick(u, &["redis://127.0.0.1:6379/0", "rediss://r.example"])),
            max_owners: flag(u).then(|| below(u, 1 << 20) as u64),
            abandon_after: flag(u).then(|| pick(u, DURATIONS)),
            settle_after: flag(u).then(|| pick(u, &DURATIONS[1..])),
            always_intercept: flag(u).then(|| flag(u)),
            models,
            route: flag(u).then(|| pick(u, &["/api/kling/gen", "/api/image/gen"])),
            teams,
        }
    }

    /// The file, one key per line.
    fn render(&self) -> String {
        let mut out = String::from("[server]\n");
        let mut line = |key: &str, value: Option<String>| {
            if let Some(value) = value {
                out.push_str(&format!("{key} = {value}\n"));
            }
        };
        line("listen", self.listen.as_ref().map(|l| format!("{l:?}")));
        line("public_url", self.public_url.map(|url| format!("{url:?}")));
        line("workers", self.workers.map(|n| n.to_string()));
        line("max_body_bytes", self.max_body_bytes.map(|n| n.to_string()));
        line(
            "request_timeout",
            self.request_timeout.map(|d| format!("{:?}", d.0)),
        );
        out.push_str("\n[upstream]\n");
        let mut line = |key: &str, value: Option<String>| {
            if let Some(value) = value {
                out.push_str(&format!("{key} = {value}\n"));
            }
        };
        if self.token_env {
            line("token_env", Some("\"KETCHUP_UPSTREAM_TOKEN\"".into()));
        } else {
            line("token_file", Some("\"/run/secrets/upstream_token\"".into()));
        }
        line("base_url", self.base_url.map(|url| format!("{url:?}")));
        line("timeout", self.timeout.map(|d| format!("{:?}", d.0)));
        line(
            "connect_timeout",
            self.connect_timeout.map(|d| format!("{:?}", d.0)),
        );
        line("query_retries", self.query_retries.map(|n| n.to_string()));
        if let Some(url) = self.redis {
            out.push_str(&format!("\n[store]\nkind = \"redis\"\nurl = {url:?}\n"));
        }
        if let Some(owners) = self.max_owners {
            out.push_str(&format!("\n[cache]\nmax_owners = {owners}\n"));
        }
        out.push_str("\n[reconciler]\n");
        if let Some(after) = self.abandon_after {
            out.push_str(&format!("abandon_after = {:?}\n", after.0));
        }
        if let Some(after) = self.settle_after {
            out.push_str(&format!("settle_after = {:?}\n", after.0));
        }
        if let Some(intercept) = self.always_intercept {
            out.push_str(&format!("\n[webhooks]\nalways_intercept = {intercept}\n"));
        }
        for (name, reserve) in &self.models {
            out.push_str(&format!("\n[models.{name:?}]\nreserve = {reserve:?}\n"));
        }
        if let Some(path) = self.route {
            out.push_str(&format!("\n[routes.{path:?}]\nfamily = \"video\"\n"));
        }
        for team in &self.teams {
            out.push_str(&format!("\n[[teams]]\nname = {:?}\n", team.name));
            let keys: Vec<String> = team
                .keys
                .iter()
                .map(|key| {
                    let hex = KeyDigest::of(key).to_hex();
                    format!(
                        "{{ sha256 = {:?}, label = {key:?} }}",
                        hex.to_ascii_uppercase()
                    )
                })
                .collect();
            out.push_str(&format!("keys = [{}]\n", keys.join(", ")));
            if let Some((credits, period, cap)) = team.budget {
                let cap = cap.map_or(String::new(), |cap| format!(", max_in_flight = {cap}"));
                out.push_str(&format!(
                    "budget = {{ credits = {credits:?}, period = {period:?}{cap} }}\n"
                ));
            }
            if let Some((unit, count, _)) = team.generate {
                out.push_str(&format!("limits = {{ generate = \"{count}/{unit}\" }}\n"));
            }
            if team.secret {
                out.push_str(&format!("webhook_secret_env = \"SECRET_{}\"\n", team.name));
            }
        }
        out
    }

    /// The key a file written from this spec must be refused for, if any: the rules that span
    /// tables, worked out here from the keys' meanings.
    fn refused_for(&self) -> Option<&'static str> {
        let timeout = self.timeout.map_or(Duration::from_secs(30), |d| d.1);
        let connect = self.connect_timeout.map_or(Duration::from_secs(5), |d| d.1);
        let retries = self.query_retries.unwrap_or(2) as u32;
        let waits: Duration = (0..retries.min(16))
            .map(|i| (Duration::from_millis(50) * 2u32.pow(i)).min(Duration::from_secs(2)) * 2)
            .sum();
        let longest = timeout + connect * (retries + 1) + waits;
        let abandon = self.abandon_after.map_or(Duration::from_secs(300), |d| d.1);
        if abandon <= longest {
            return Some("abandon_after");
        }
        if self.always_intercept == Some(true) && self.public_url.is_none() {
            return Some("always_intercept");
        }
        if self.public_url.is_some() && self.teams.iter().any(|team| !team.secret) {
            return Some("webhook_secret_env");
        }
        None
    }

    /// The file loaded with this spec's values, or was refused for the key the spec breaks.
    fn check(&self, loaded: Result<Config, String>) {
        let config = match (loaded, self.refused_for()) {
            (Ok(config), None) => config,
            (Err(message), Some(key)) => {
                assert!(message.contains(key), "{message} should name {key}");
                return;
            }
            (Ok(_), Some(key)) => panic!("loaded, though {key} breaks a rule: {self:?}"),
            (Err(message), None) => panic!("refused a valid file: {message}\n{}", self.render()),
        };
        let server = &config.server;
        assert_eq!(
            server.listen,
            self.listen.clone().unwrap_or("127.0.0.1:8080".into())
        );
        let public = server
            .public_url
            .as_ref()
            .map(|url| url.as_str().trim_end_matches('/'));
        assert_eq!(public, self.public_url);
        if let Some(workers) = self.workers {
            assert_eq!(server.workers.get(), workers);
        }
        assert_eq!(
            server.max_body_bytes,
            self.max_body_bytes.unwrap_or(1 << 20)
        );
        assert_eq!(server.request_timeout, duration(self.request_timeout, 30));
        let upstream = &config.upstream;
        let token = match self.token_env {
            true => SecretSource::Env("KETCHUP_UPSTREAM_TOKEN".into()),
            false => SecretSource::File("/run/secrets/upstream_token".into()),
        };
        assert_eq!(upstream.accounts.len(), 1);
        assert_eq!(upstream.accounts[0].name, "default");
        assert_eq!(upstream.accounts[0].token, token);
        let base = self.base_url.unwrap_or("https://api.defapi.org");
        assert_eq!(upstream.base_url.as_str().trim_end_matches('/'), base);
        assert_eq!(upstream.timeout, duration(self.timeout, 30));
        assert_eq!(upstream.connect_timeout, duration(self.connect_timeout, 5));
        assert_eq!(upstream.query_retries, self.query_retries.unwrap_or(2));
        match (&config.store, self.redis) {
            (StoreConfig::Redis { url, .. }, Some(written)) => {
                assert_eq!(
                    url.as_str().trim_end_matches('/'),
                    written.trim_end_matches('/')
                );
            }
            (StoreConfig::Sqlite { path }, None) => assert_eq!(path, Path::new("data/ledger.db")),
            (store, written) => panic!("{store:?} from {written:?}"),
        }
        assert_eq!(
            config.cache.max_owners,
            self.max_owners.unwrap_or(1_000_000)
        );
        assert_eq!(
            config.reconciler.abandon_after,
            duration(self.abandon_after, 300)
        );
        assert_eq!(
            config.reconciler.settle_after,
            duration(self.settle_after, 30)
        );
        assert_eq!(
            config.webhooks.always_intercept,
            self.always_intercept == Some(true)
        );
        assert_eq!(config.models.len(), self.models.len());
        for (name, reserve) in &self.models {
            let model = &config.models[name];
            let amount: Credits = reserve.parse().expect("a generated amount");
            assert_eq!(
                model.task_reserve(),
                Some(&ketchup_domain::pricing::Reserve::Flat(amount))
            );
        }
        if let Some(path) = self.route {
            assert_eq!(
                config.routes.get(path).map(|r| r.family.as_str()),
                Some("video")
            );
        }
        self.check_teams(&config);
        let again = parse(&self.render()).expect("the same file loads again");
        assert_eq!(config.restart_only_changes(&again), Vec::<String>::new());
    }

    fn check_teams(&self, config: &Config) {
        assert_eq!(config.teams.len(), self.teams.len());
        for (team, spec) in config.teams.iter().zip(&self.teams) {
            assert_eq!(team.name, spec.name);
            for key in &spec.keys {
                let entry = config.key(key).expect("every key is found by its digest");
                assert_eq!(
                    (entry.team.name.as_str(), &*entry.label),
                    (&*spec.name, &**key)
                );
            }
            let budget = team
                .budget
                .map(|b| (b.credits, format!("{:?}", b.period), b.max_in_flight));
            let written = spec.budget.map(|(credits, period, cap)| {
                let credits: Credits = credits.parse().expect("a generated amount");
                let mut period = period.to_owned();
                period[..1].make_ascii_uppercase();
                (credits, period, cap)
            });
            assert_eq!(budget, written);
            if let Some((_, count, seconds)) = spec.generate {
                let rate = team.limits.generate;
                assert_eq!((rate.count.get(), rate.per.as_secs()), (count, seconds));
                assert_eq!(team.limits.generate_burst.get(), count);
            }
            assert_eq!(team.webhook_secret.is_some(), spec.secret);
        }
    }
}

fn duration(written: Option<Written>, default_secs: u64) -> Duration {
    written.map_or(Duration::from_secs(default_secs), |d| d.1)
}

/// Values no key takes, or that only some keys take.
const WRONG: &[&str] = &[
    "-1",
    "0",
    "\"\"",
    "\"x\"",
    "1e400",
    "18446744073709551616",
    "9223372036854775807",
    "\"1000000000y\"",
    "\"0s\"",
    "true",
    "[]",
    "{}",
    "\"\\u0000\"",
    "\"http://\"",
    "\"redis://:pw@h\"",
    "\"-1\"",
    "\"ſ\"",
    "nan",
];

/// A valid file with one thing broken: it loads, or the error names the broken key.
fn broken(u: &mut Unstructured) {
    let mut spec = Spec::generate(u);
    // A spec that breaks a cross-table rule is not valid to begin with: abandon_after outlasts
    // the longest generation (at most 10 h with two retries of the longest timeouts) and stays
    // within the default idempotency_ttl (24 h).
    spec.query_retries = spec.query_retries.map(|retries| retries.min(2));
    spec.abandon_after = Some(("20h", Duration::from_secs(72_000)));
    spec.always_intercept = None;
    spec.public_url = None;
    let mut lines: Vec<String> = spec.render().lines().map(str::to_owned).collect();
    let at = below(u, lines.len());
    let key = lines[at].split(" = ").next().unwrap_or_default().to_owned();
    let named = match below(u, 5) {
        0 | 1 if lines[at].contains(" = ") => {
            let value = if flag(u) {
                pick(u, WRONG).to_owned()
            } else {
                // On the key's line: a line break would make the rest another key's line.
                text(u, 12).replace(['\n', '\r'], " ")
            };
            lines[at] = format!("{key} = {value}");
            // A multi-line string, an array or an inline table opened here may end in another
            // key's line (TOML 1.1 lets inline tables span lines too), which the error names.
            let unclosed = |open: char, close: char| {
                value.matches(open).count() > value.matches(close).count()
            };
            let spans_lines = value.contains("\"\"\"")
                || value.contains("\'\'\'")
                || unclosed('[', ']')
                || unclosed('{', '}');
            (!spans_lines).then_some(key)
        }
        2 => {
            lines.insert(at, "typo_key = 1".into());
            Some("typo_key".into())
        }
        3 if lines[at].contains(" = ") => {
            lines.insert(at, lines[at].clone());
            Some(key)
        }
        _ => {
            let mut source = lines.join("\n");
            let cut = below(u, source.len() + 1);
            let cut = (0..=cut)
                .rev()
                .find(|i| source.is_char_boundary(*i))
                .unwrap_or(0);
            source.truncate(cut);
            let _ = parse(&source);
            return;
        }
    };
    let source = lines.join("\n");
    if let (Err(message), Some(key)) = (parse(&source), named) {
        assert!(
            message.contains(&key),
            "{message} should name {key}:\n{source}"
        );
    }
}
