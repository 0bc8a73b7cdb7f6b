//! Which settings a reload applies and which only a restart does, tried key by key.

use super::{error_of, parse};

/// A file that has every table, for reloads to be compared against.
const EVERY_TABLE: &str = r#"[server]
public_url = "https://gw.example"
workers = 1

[upstream]
token_env = "KETCHUP_UPSTREAM_TOKEN"

[store]

[cache]

[reconciler]

[webhooks]

[admin]

[models."google/gempix2"]
reserve = "0.50"

[models."openai/gpt-5.2"]
input_per_million = "2.00"
output_per_million = "10.00"
max_output_tokens = 4096
max_input_tokens = 400000

[routes."/api/kling/gen"]
family = "video"

[defaults.limits]

[[teams]]
name = "design"
keys = [{ sha256 = "c3ab8ff13720e8ad9047dd39466b3c8974e592c2fa383d4a3960714caef0c4f2", label = "prod" }]
budget = { credits = "250.00", period = "monthly", max_in_flight = 50 }
webhook_secret_env = "KETCHUP_WEBHOOK_SECRET_DESIGN"
"#;

/// Every key of every table with a value unlike [`EVERY_TABLE`]'s, and the name a reload that
/// changes it warns with, `None` when a reload applies it. The detection itself keeps no list
/// (see [`crate::config::Config::restart_only_changes`]); this one makes sure every key has
/// been tried, and [`every_key_of_every_table_has_a_reload_case`] that it stays whole.
const RELOADS: &[(&str, &str, Option<&str>)] = &[
    (
        "[server]",
        "listen = \"0.0.0.0:8081\"",
        Some("[server] listen"),
    ),
    ("[server]", "public_url = \"https://gw2.example\"", None),
    ("[server]", "max_body_bytes = 2048", None),
    (
        "[server]",
        "request_timeout = \"31s\"",
        Some("[server] request_timeout"),
    ),
    (
        "[server]",
        "metrics_listen = \"127.0.0.1:9464\"",
        Some("[server] metrics_listen"),
    ),
    (
        "[server]",
        "shutdown_timeout = \"31s\"",
        Some("[server] shutdown_timeout"),
    ),
    ("[server]", "workers = 2", Some("[server] workers")),
    (
        "[server]",
        "header_read_timeout = \"11s\"",
        Some("[server] header_read_timeout"),
    ),
    (
        "[server]",
        "keep_alive_timeout = \"76s\"",
        Some("[server] keep_alive_timeout"),
    ),
    (
        "[server]",
        "max_connections = 9",
        Some("[server] max_connections"),
    ),
    ("[server]", "idempotency_ttl = \"25h\"", None),
    (
        "[upstream]",
        "base_url = \"https://ketchup.example\"",
        Some("[upstream] base_url"),
    ),
    (
        "[upstream]",
        "token_env = \"OTHER_TOKEN\"",
        Some("[upstream] token_env or token_file"),
    ),
    (
        "[upstream]",
        "-token_env\ntoken_file = \"/run/secrets/upstream\"",
        Some("[upstream] token_env or token_file"),
    ),
    (
        "[upstream]",
        "connect_timeout = \"6s\"",
        Some("[upstream] connect_timeout"),
    ),
    (
        "[upstream]",
        "timeout = \"31s\"",
        Some("[upstream] timeout"),
    ),
    ("[upstream]", "max_reference_images = 5", None),
    ("[upstream]", "max_requests_per_second = 51", None),
    ("[upstream]", "new_task_grace = \"31s\"", None),
    (
        "[upstream]",
        "query_retries = 3",
        Some("[upstream] query_retries"),
    ),
    ("[store]", "path = \"data/other.db\"", Some("[store]")),
    (
        "[store]",
        "kind = \"redis\"\nurl = \"redis://r\"\npassword_env = \"P\"\nkey_prefix = \"k:\"\n\
         command_timeout = \"1s\"\nrate_limits_when_unavailable = \"allow\"",
        Some("[store]"),
    ),
    (
        "[store]",
        "kind = \"redis\"\nurl = \"rediss://r\"\npassword_file = \"/run/secrets/p\"\n\
         ca_file = \"ca.pem\"\nclient_cert_file = \"c.pem\"\nclient_key_file = \"k.pem\"",
        Some("[store]"),
    ),
    ("[cache]", "status_ttl = \"2s\"", Some("[cache]")),
    ("[cache]", "max_entries = 10", Some("[cache]")),
    ("[cache]", "max_bytes = 1024", Some("[cache]")),
    ("[cache]", "max_owners = 10", Some("[cache]")),
    (
        "[reconciler]",
        "interval = \"6s\"",
        Some("[reconciler] interval"),
    ),
    (
        "[reconciler]",
        "settle_after = \"31s\"",
        Some("[reconciler] settle_after"),
    ),
    (
        "[reconciler]",
        "max_reads_per_second = 11",
        Some("[reconciler] max_reads_per_second"),
    ),
    ("[reconciler]", "max_task_age = \"25h\"", None),
    ("[reconciler]", "abandon_after = \"6m\"", None),
    ("[webhooks]", "always_intercept = true", None),
    ("[webhooks]", "delivery_deadline = \"25h\"", None),
    ("[webhooks]", "attempt_timeout = \"11s\"", None),
    ("[webhooks]", "first_retry = \"6s\"", None),
    ("[webhooks]", "max_retry_delay = \"2h\"", None),
    (
        "[webhooks]",
        "max_concurrent_deliveries = 33",
        Some("[webhooks] max_concurrent_deliveries"),
    ),
    ("[webhooks]", "max_concurrent_deliveries_per_team = 9", None),
    ("[webhooks]", "max_callback_bytes = 1024", None),
    ("[webhooks]", "keep_finished = \"8d\"", None),
    (
        "[admin]",
        "token_env = \"KETCHUP_ADMIN_TOKEN\"",
        Some("[admin] token_env or token_file"),
    ),
    (
        "[admin]",
        "token_file = \"/run/secrets/admin\"",
        Some("[admin] token_env or token_file"),
    ),
    (
        "[admin]",
        "tokens = [{ sha256 = \"2222222222222222222222222222222222222222222222222222222222222222\", \
         label = \"alice\" }]",
        Some("[admin] tokens"),
    ),
    ("[admin]", "keep_audit = \"30d\"", None),
    ("[upstream]", "balance_check = \"1m\"", None),
    ("[upstream]", "balance_floor = \"5.00\"", None),
    // The upstream client holds every account's token from the start.
    (
        "[upstream]",
        "-token_env\naccounts = [{ name = \"default\", token_env = \"KETCHUP_UPSTREAM_TOKEN\" }]",
        None,
    ),
    (
        "[upstream]",
        "-token_env\naccounts = [{ name = \"main\", token_env = \"KETCHUP_UPSTREAM_TOKEN\" }]",
        Some("[upstream] accounts"),
    ),
    ("[models.\"google/gempix2\"]", "reserve = \"0.75\"", None),
    // A model may change kind on reload: each request reads its model as it comes.
    (
        "[models.\"google/gempix2\"]",
        "-reserve\ninput_per_million = \"1.00\"\noutput_per_million = \"4.00\"\n\
         max_output_tokens = 100\nmax_input_tokens = 1000",
        None,
    ),
    (
        "[models.\"openai/gpt-5.2\"]",
        "input_per_million = \"2.50\"\noutput_per_million = \"12.00\"\n\
         max_output_tokens = 8000\nmax_input_tokens = 200000",
        None,
    ),
    (
        "[models.\"openai/gpt-5.2\"]",
        "-input_per_million\n-output_per_million\n-max_output_tokens\n-max_input_tokens\n\
         reserve = \"0.10\"",
        None,
    ),
    ("[defaults.limits]", "generate = \"61/min\"", None),
    ("[defaults.limits]", "generate_burst = 11", None),
    ("[defaults.limits]", "query = \"21/s\"", None),
    ("[defaults.limits]", "query_burst = 21", None),
    ("[defaults.limits]", "text = \"121/min\"", None),
    ("[defaults.limits]", "text_burst = 21", None),
    ("[[teams]]", "name = \"studio\"", None),
    (
        "[[teams]]",
        "keys = [{ sha256 = \"1111111111111111111111111111111111111111111111111111111111111111\" }]",
        None,
    ),
    (
        "[[teams]]",
        "budget = { credits = \"300.00\", period = \"weekly\" }",
        None,
    ),
    ("[[teams]]", "limits = { generate = \"1/s\" }", None),
    ("[[teams]]", "webhook_secret_env = \"OTHER_SECRET\"", None),
    (
        "[[teams]]",
        "-webhook_secret_env\nwebhook_secret_file = \"/run/secrets/design\"",
        None,
    ),
    (
        "[[teams]]",
        "callback_hosts = [\"hooks.design.internal\"]",
        None,
    ),
    ("[[teams]]", "models = [\"google/*\"]", None),
    (
        "[[teams]]",
        "budget = { credits = \"250.00\", period = \"monthly\", notify_at = [50, 80] }\n\
         notify_url = \"https://hooks.design.example/budget\"",
        None,
    ),
    (
        "[[teams]]",
        "keys = [{ sha256 = \"c3ab8ff13720e8ad9047dd39466b3c8974e592c2fa383d4a3960714caef0c4f2\", \
         expires_at = \"2027-01-01T00:00:00Z\", not_before = \"2026-12-01T00:00:00Z\" }]",
        None,
    ),
    (ROUTE, "family = \"film\"", None),
    (ROUTE, "model_field = \"engine\"", None),
    (ROUTE, "fixed_model = \"kling/v2\"", None),
    (ROUTE, "prompt_field = \"text\"", None),
    (ROUTE, "prompt_required = false", None),
    (ROUTE, "references = { images = 2 }", None),
    (ROUTE, "types = { duration = \"integer\" }", None),
    (ROUTE, "accepts_callback = true", None),
];

/// A route's checks are read by each request, so a reload applies them; a path added or removed
/// needs a restart, as the router is built once.
const ROUTE: &str = "[routes.\"/api/kling/gen\"]";

/// `text` with `changes` made in `table`: each `key = value` line replaces the line of that key
/// or is added after the header, each `-key` line removes it.
fn edited(text: &str, table: &str, changes: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let header = lines
        .iter()
        .position(|line| line == table)
        .unwrap_or_else(|| panic!("no {table} in the file"));
    for change in changes.lines() {
        let end = lines[header + 1..]
            .iter()
            .position(|line| line.starts_with('['))
            .map_or(lines.len(), |i| header + 1 + i);
        let key = change.trim_start_matches('-').split(" =").next().unwrap();
        let at = lines[header + 1..end]
            .iter()
            .position(|line| line.starts_with(&format!("{key} =")))
            .map(|i| header + 1 + i);
        match (change.starts_with('-'), at) {
            (true, Some(at)) => {
                lines.remove(at);
            }
            (true, None) => panic!("no {key} in {table} to remove"),
            (false, Some(at)) => lines[at] = change.to_owned(),
            (false, None) => lines.insert(header + 1, change.to_owned()),
        }
    }
    lines.join("\n") + "\n"
}

#[test]
fn a_reload_names_each_setting_only_a_restart_applies_and_no_other() {
    let running = parse(EVERY_TABLE).unwrap();
    assert_eq!(running.restart_only_changes(&running), Vec::<String>::new());
    for (table, changes, expected) in RELOADS {
        let new = parse(&edited(EVERY_TABLE, table, changes))
            .unwrap_or_else(|e| panic!("{table} {changes}: {e}"));
        let expected: Vec<String> = expected.iter().map(|name| name.to_string()).collect();
        assert_eq!(
            running.restart_only_changes(&new),
            expected,
            "{table} {changes}"
        );
    }
}

#[test]
fn a_route_path_added_or_removed_needs_a_restart() {
    let running = parse(EVERY_TABLE).unwrap();
    let added = format!("{EVERY_TABLE}\n[routes.\"/api/pika/gen\"]\nfamily = \"video\"\n");
    assert_eq!(
        running.restart_only_changes(&parse(&added).unwrap()),
        ["[routes]"]
    );
    let removed = EVERY_TABLE.replace(&format!("{ROUTE}\nfamily = \"video\"\n"), "");
    assert_ne!(removed, EVERY_TABLE);
    assert_eq!(
        running.restart_only_changes(&parse(&removed).unwrap()),
        ["[routes]"]
    );
}

#[test]
fn a_reload_that_changes_several_restart_only_settings_names_each_in_file_order() {
    let running = parse(EVERY_TABLE).unwrap();
    let mut text = EVERY_TABLE.to_owned();
    for (table, changes) in [
        ("[admin]", "token_env = \"KETCHUP_ADMIN_TOKEN\""),
        (
            "[webhooks]",
            "max_concurrent_deliveries = 4\nkeep_finished = \"1d\"",
        ),
        ("[store]", "path = \"data/other.db\""),
        (
            "[server]",
            "listen = \"0.0.0.0:8081\"\nmax_body_bytes = 2048",
        ),
    ] {
        text = edited(&text, table, changes);
    }
    assert_eq!(
        running.restart_only_changes(&parse(&text).unwrap()),
        [
            "[server] listen",
            "[store]",
            "[webhooks] max_concurrent_deliveries",
            "[admin] token_env or token_file"
        ]
    );
}

/// The keys a table accepts, as the reader lists them when it meets one it does not know.
fn keys_of(table: &str) -> Vec<String> {
    let text = match table {
        "" => format!("zz_unknown = 1\n{EVERY_TABLE}"),
        table => edited(EVERY_TABLE, table, "zz_unknown = 1"),
    };
    let error = error_of(&text);
    let (_, expected) = error
        .split_once("expected ")
        .unwrap_or_else(|| panic!("{error}"));
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_key_of_every_table_has_a_reload_case() {
    let tables: Vec<&str> = EVERY_TABLE
        .lines()
        .filter(|line| line.starts_with('['))
        .collect();
    for key in keys_of("") {
        assert!(
            tables
                .iter()
                .any(|table| table.trim_matches(['[', ']']).split('.').next() == Some(&key)),
            "[{key}] is missing from EVERY_TABLE"
        );
    }
    for table in tables {
        for key in keys_of(table) {
            assert!(
                RELOADS.iter().any(|(of, changes, _)| *of == table
                    && changes
                        .lines()
                        .any(|line| line.starts_with(&format!("{key} =")))),
                "{table} {key} has no case in RELOADS: say whether a reload applies it"
            );
        }
    }
}
