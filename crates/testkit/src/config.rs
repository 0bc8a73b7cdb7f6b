//! The gateway's config file, built from the parts a test cares about.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::{ADMIN_TOKEN, ADS_KEY, DESIGN_KEY, WEBHOOK_SECRET, digest, free_port};

/// A gateway config. [`GatewayConfig::new`] is the base every test starts from: two teams,
/// `design` and `ads` (keys [`DESIGN_KEY`] and [`ADS_KEY`], no budget, the default limits of
/// 1000/s that no test reaches by accident), two models (`google/gempix2` reserving 0.50,
/// `google/gemini-2.5-flash-image` 0.25), a SQLite ledger, one retry of a failed status read
/// and an upstream account limit of 10 000/s. Each method changes one part.
///
/// Table methods take lines of TOML (`key = value`, one per line); a key given again replaces
/// the earlier value, so a test can override the base or its own earlier choice.
///
/// The config is rendered into a directory ([`GatewayConfig::write`]), which also holds its
/// ledger and the files its secrets are read from.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    server: Table,
    upstream: Table,
    /// `[[upstream.accounts]]`: name and token, each token written to a file of its own.
    accounts: Vec<(String, String)>,
    store: Table,
    cache: Table,
    reconciler: Table,
    webhooks: Table,
    admin: bool,
    /// Other lines of `[admin]` (labelled `tokens`, `keep_audit`).
    admin_lines: Table,
    /// Model ids with the lines of their table (`reserve = …`, or a text model's prices).
    models: Vec<(String, String)>,
    /// `[routes."…"]` tables, as written.
    routes: String,
    teams: Vec<Team>,
}

#[derive(Clone, Debug)]
struct Team {
    name: String,
    /// Inline tables of `keys`.
    keys: Vec<String>,
    budget: Option<String>,
    limits: Option<String>,
    signed_webhooks: bool,
    callback_hosts: Vec<String>,
    /// Any other lines.
    lines: Table,
}

/// The lines of one TOML table, in order, by key.
#[derive(Clone, Debug, Default)]
struct Table(Vec<(String, String)>);

impl Table {
    /// Sets every `key = value` line of `lines`, replacing a line of the same key.
    fn set(&mut self, lines: &str) {
        for line in lines.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let key = line
                .split_once('=')
                .map(|(key, _)| key.trim())
                .unwrap_or_else(|| panic!("not a `key = value` line: {line:?}"));
            match self.0.iter_mut().find(|(k, _)| k == key) {
                Some(entry) => entry.1 = line.to_owned(),
                None => self.0.push((key.to_owned(), line.to_owned())),
            }
        }
    }

    fn remove(&mut self, key: &str) {
        self.0.retain(|(k, _)| k != key);
    }

    fn has(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }

    fn render(&self, out: &mut String) {
        for (_, line) in &self.0 {
            out.push_str(line);
            out.push('\n');
        }
    }
}

impl Team {
    fn new(name: &str, key: &str) -> Team {
        Team {
            name: name.to_owned(),
            keys: vec![format!(
                "{{ sha256 = \"{}\", label = \"{name}-test\" }}",
                digest(key)
            )],
            budget: None,
            limits: None,
            signed_webhooks: false,
            callback_hosts: Vec::new(),
            lines: Table::default(),
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewayConfig {
    /// The base config (see [`GatewayConfig`]); the upstream's URL is set by
    /// [`GatewayConfig::upstream_url`], or by [`crate::Env`] to its fake's.
    pub fn new() -> GatewayConfig {
        let mut config = GatewayConfig {
            server: Table::default(),
            upstream: Table::default(),
            accounts: Vec::new(),
            store: Table::default(),
            cache: Table::default(),
            reconciler: Table::default(),
            webhooks: Table::default(),
            admin: false,
            admin_lines: Table::default(),
            models: vec![
                ("google/gempix2".into(), r#"reserve = "0.50""#.into()),
                (
                    "google/gemini-2.5-flash-image".into(),
                    r#"reserve = "0.25""#.into(),
                ),
            ],
            routes: String::new(),
            teams: vec![Team::new("design", DESIGN_KEY), Team::new("ads", ADS_KEY)],
        };
        config.server.set(r#"listen = "127.0.0.1:0""#);
        // No balance check unless a test asks for one: its reads of /api/user would show in
        // the fake's statistics and the upstream metrics that tests count exactly.
        config.upstream.set(
            "token_env = \"KETCHUP_UPSTREAM_TOKEN\"\nquery_retries = 1\n\
             max_requests_per_second = 10000\nbalance_check = \"0s\"",
        );
        config
    }

    /// `[upstream] base_url`.
    pub fn upstream_url(mut self, url: &str) -> Self {
        self.upstream.set(&format!("base_url = \"{url}\""));
        self
    }

    /// Lines of `[server]`.
    pub fn server(mut self, lines: &str) -> Self {
        self.server.set(lines);
        self
    }

    /// Listens on a port of its own, chosen now, and names it as its `public_url`: the
    /// upstream's callbacks reach it there. Every team must then sign its webhooks.
    pub fn public_url_on_own_port(self) -> Self {
        let listen = format!("127.0.0.1:{}", free_port());
        self.server(&format!(
            "listen = \"{listen}\"\npublic_url = \"http://{listen}\""
        ))
    }

    /// Lines of `[upstream]`.
    pub fn upstream(mut self, lines: &str) -> Self {
        self.upstream.set(lines);
        self
    }

    /// The upstream token comes from the file `path` instead of `KETCHUP_UPSTREAM_TOKEN`.
    pub fn upstream_token_file(mut self, path: &Path) -> Self {
        self.upstream.remove("token_env");
        self.upstream
            .set(&format!("token_file = \"{}\"", path.display()));
        self
    }

    /// Names the upstream accounts in `[[upstream.accounts]]` instead of the one token of
    /// `KETCHUP_UPSTREAM_TOKEN`: each `(name, token)`, its token read from a file.
    pub fn upstream_accounts(mut self, accounts: &[(&str, &str)]) -> Self {
        self.upstream.remove("token_env");
        self.upstream.remove("token_file");
        self.accounts = accounts
            .iter()
            .map(|(name, token)| ((*name).to_owned(), (*token).to_owned()))
            .collect();
        self
    }

    /// Lines of `[store]`, added to the SQLite ledger's or to [`GatewayConfig::redis`]'s.
    pub fn store(mut self, lines: &str) -> Self {
        self.store.set(lines);
        self
    }

    /// The store is the Redis at `url`, its keys under `key_prefix`.
    pub fn redis(self, url: &str, key_prefix: &str) -> Self {
        self.store(&format!(
            "kind = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"{key_prefix}\""
        ))
    }

    /// Lines of `[cache]`.
    pub fn cache(mut self, lines: &str) -> Self {
        self.cache.set(lines);
        self
    }

    /// Lines of `[reconciler]`.
    pub fn reconciler(mut self, lines: &str) -> Self {
        self.reconciler.set(lines);
        self
    }

    /// Lines of `[webhooks]`.
    pub fn webhooks(mut self, lines: &str) -> Self {
        self.webhooks.set(lines);
        self
    }

    /// An admin API, taking [`ADMIN_TOKEN`] (from a `token_file`).
    pub fn admin(mut self) -> Self {
        self.admin = true;
        self
    }

    /// Other lines of `[admin]`: labelled `tokens`, `keep_audit`.
    pub fn admin_lines(mut self, lines: &str) -> Self {
        self.admin_lines.set(lines);
        self
    }

    /// Offers `model` at a flat `reserve` (an amount such as `0.50`), replacing its earlier one.
    pub fn model(self, model: &str, reserve: &str) -> Self {
        self.model_reserve(model, &format!("\"{reserve}\""))
    }

    /// Offers `model` with `reserve` written as a TOML value (`"0.50"`, or a table pricing a
    /// field), replacing its earlier one.
    pub fn model_reserve(self, model: &str, reserve: &str) -> Self {
        self.model_table(model, &format!("reserve = {reserve}"))
    }

    /// Offers text model `model` at these prices per million input and output tokens,
    /// replacing its earlier table; `extra` adds lines (`max_output_tokens = 100`).
    pub fn text_model(self, model: &str, input: &str, output: &str, extra: &str) -> Self {
        self.model_table(
            model,
            &format!("input_per_million = \"{input}\"\noutput_per_million = \"{output}\"\n{extra}"),
        )
    }

    fn model_table(mut self, model: &str, lines: &str) -> Self {
        match self.models.iter_mut().find(|(name, _)| name == model) {
            Some(entry) => entry.1 = lines.to_owned(),
            None => self.models.push((model.to_owned(), lines.to_owned())),
        }
        self
    }

    /// Adds `[routes."…"]` tables, as written.
    pub fn routes(mut self, tables: &str) -> Self {
        self.routes.push_str(tables);
        self.routes.push('\n');
        self
    }

    /// Offers no model but `model`, at `reserve`.
    pub fn only_model(mut self, model: &str, reserve: &str) -> Self {
        self.models.clear();
        self.model(model, reserve)
    }

    /// Adds team `name`, whose key is `key`, labelled `{name}-test`.
    pub fn team(mut self, name: &str, key: &str) -> Self {
        assert!(
            self.teams.iter().all(|t| t.name != name),
            "team {name} twice"
        );
        self.teams.push(Team::new(name, key));
        self
    }

    /// Removes team `name`.
    pub fn without_team(mut self, name: &str) -> Self {
        self.teams.retain(|t| t.name != name);
        self
    }

    fn team_mut(&mut self, name: &str) -> &mut Team {
        self.teams
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no team {name}"))
    }

    /// Adds `entry` (an inline table, as `keygen` prints it) to team `name`'s keys.
    pub fn key_entry(mut self, name: &str, entry: &str) -> Self {
        self.team_mut(name).keys.push(entry.to_owned());
        self
    }

    /// Team `name`'s `budget`: an inline table, e.g. `{ credits = "5.00", period = "lifetime" }`.
    pub fn budget(mut self, name: &str, budget: &str) -> Self {
        self.team_mut(name).budget = Some(budget.to_owned());
        self
    }

    /// Team `name` without a budget.
    pub fn without_budget(mut self, name: &str) -> Self {
        self.team_mut(name).budget = None;
        self
    }

    /// Team `name`'s `limits`: an inline table, e.g. `{ generate = "60/min", generate_burst = 3 }`.
    pub fn limits(mut self, name: &str, limits: &str) -> Self {
        self.team_mut(name).limits = Some(limits.to_owned());
        self
    }

    /// Team `name` signs its webhooks with [`WEBHOOK_SECRET`] (from a `webhook_secret_file`).
    pub fn signed_webhooks(mut self, name: &str) -> Self {
        self.team_mut(name).signed_webhooks = true;
        self
    }

    /// Team `name`'s `callback_hosts`; none for an empty list.
    pub fn callback_hosts(mut self, name: &str, hosts: &[&str]) -> Self {
        self.team_mut(name).callback_hosts = hosts.iter().map(|h| (*h).to_owned()).collect();
        self
    }

    /// Other lines of team `name`'s table.
    pub fn team_lines(mut self, name: &str, lines: &str) -> Self {
        self.team_mut(name).lines.set(lines);
        self
    }

    /// The config's text for a gateway whose files live in `dir` (its SQLite ledger, and the
    /// files its secrets are read from, which this writes).
    pub fn render(&self, dir: &Path) -> String {
        assert!(self.upstream.has("base_url"), "no [upstream] base_url");
        let mut out = String::new();
        let table = |out: &mut String, name: &str, lines: &Table| {
            let _ = writeln!(out, "[{name}]");
            lines.render(out);
            out.push('\n');
        };
        table(&mut out, "server", &self.server);
        table(&mut out, "upstream", &self.upstream);
        for (name, token) in &self.accounts {
            let path = write_secret(dir, &format!("upstream_token_{name}"), token);
            let _ = writeln!(
                out,
                "[[upstream.accounts]]\nname = \"{name}\"\ntoken_file = \"{}\"\n",
                path.display()
            );
        }
        let mut store = self.store.clone();
        if !store.has("kind") {
            store.set(&format!("path = \"{}\"", dir.join("ledger.db").display()));
        }
        table(&mut out, "store", &store);
        for (name, lines) in [
            ("cache", &self.cache),
            ("reconciler", &self.reconciler),
            ("webhooks", &self.webhooks),
        ] {
            if !lines.0.is_empty() {
                table(&mut out, name, lines);
            }
        }
        if self.admin || !self.admin_lines.0.is_empty() {
            out.push_str("[admin]\n");
            if self.admin {
                let path = write_secret(dir, "admin_token", ADMIN_TOKEN);
                let _ = writeln!(out, "token_file = \"{}\"", path.display());
            }
            self.admin_lines.render(&mut out);
            out.push('\n');
        }
        for (model, lines) in &self.models {
            let _ = writeln!(out, "[models.\"{model}\"]\n{lines}\n");
        }
        out.push_str(&self.routes);
        out.push_str(
            "[defaults.limits]\ngenerate = \"1000/s\"\ngenerate_burst = 1000\n\
             query = \"1000/s\"\nquery_burst = 1000\ntext = \"1000/s\"\ntext_burst = 1000\n",
        );
        for team in &self.teams {
            let _ = writeln!(
                out,
                "\n[[teams]]\nname = \"{}\"\nkeys = [{}]",
                team.name,
                team.keys.join(", ")
            );
            if let Some(budget) = &team.budget {
                let _ = writeln!(out, "budget = {budget}");
            }
            if let Some(limits) = &team.limits {
                let _ = writeln!(out, "limits = {limits}");
            }
            if team.signed_webhooks {
                let path = write_secret(dir, "webhook_secret", WEBHOOK_SECRET);
                let _ = writeln!(out, "webhook_secret_file = \"{}\"", path.display());
            }
            if !team.callback_hosts.is_empty() {
                let hosts: Vec<String> = team
                    .callback_hosts
                    .iter()
                    .map(|h| format!("\"{h}\""))
                    .collect();
                let _ = writeln!(out, "callback_hosts = [{}]", hosts.join(", "));
            }
            team.lines.render(&mut out);
        }
        out
    }

    /// Renders the config into `dir` as `gateway.toml`; returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("gateway.toml");
        std::fs::write(&path, self.render(dir)).expect("config written");
        path
    }
}

/// Writes `secret` to `dir/name` as a secret file is written (with a trailing newline).
fn write_secret(dir: &Path, name: &str, secret: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).expect("secret written");
    path
}
