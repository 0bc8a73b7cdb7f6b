//! The configuration as admins write it: what it accepts, its defaults, and how each mistake is
//! reported (file, line, key, what is wrong).

use std::path::Path;
use std::time::Duration;

use super::*;
use crate::credits::Credits;

mod admin;
mod models;
mod notify;
mod reload;
mod teams;

const MINIMAL: &str = r#"
[upstream]
token_env = "KETCHUP_UPSTREAM_TOKEN"

[models."google/gempix2"]
reserve = "0.50"

[[teams]]
name = "design"
keys = [{ sha256 = "c3ab8ff13720e8ad9047dd39466b3c8974e592c2fa383d4a3960714caef0c4f2", label = "prod" }]
budget = { credits = "250.00", period = "monthly", max_in_flight = 50 }
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("gateway.toml"), text)
}

#[test]
fn minimal_file_gets_defaults() {
    let config = parse(MINIMAL).unwrap();
    assert_eq!(config.server.listen, "127.0.0.1:8080");
    assert_eq!(config.server.max_body_bytes, 1 << 20);
    assert_eq!(config.upstream.base_url.as_str(), "https://api.defapi.org/");
    assert_eq!(config.upstream.max_reference_images, 4);
    assert_eq!(config.upstream.new_task_grace, Duration::from_secs(30));
    assert_eq!(config.cache.status_ttl, Duration::from_secs(1));
    assert_eq!(
        config.store,
        StoreConfig::Sqlite {
            path: "data/ledger.db".into()
        }
    );
}

#[test]
fn connection_limits_have_defaults_and_refuse_zero() {
    let server = parse(MINIMAL).unwrap().server;
    assert_eq!(server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(server.keep_alive_timeout, Duration::from_secs(75));
    assert_eq!(server.max_connections.get(), 10_000);
    let set = parse(&format!(
        "[server]\nheader_read_timeout = \"2s\"\nkeep_alive_timeout = \"500ms\"\n\
         max_connections = 3\n{MINIMAL}"
    ))
    .unwrap()
    .server;
    assert_eq!(set.header_read_timeout, Duration::from_secs(2));
    assert_eq!(set.keep_alive_timeout, Duration::from_millis(500));
    assert_eq!(set.max_connections.get(), 3);
    for (line, message) in [
        (
            "header_read_timeout = \"0s\"",
            "gateway.toml:2:23: [server] header_read_timeout must be more than zero",
        ),
        (
            "keep_alive_timeout = \"0s\"",
            "gateway.toml:2:22: [server] keep_alive_timeout must be more than zero",
        ),
        (
            "max_connections = 0",
            "gateway.toml:2:19: [server] max_connections must be at least 1",
        ),
    ] {
        let error = error_of(&format!("[server]\n{line}\n{MINIMAL}"));
        assert!(error.contains(message), "{error}");
    }
}

#[test]
fn idempotency_keys_last_a_day_unless_set_and_outlive_abandoned_requests() {
    assert_eq!(
        parse(MINIMAL).unwrap().server.idempotency_ttl,
        Duration::from_secs(24 * 3600)
    );
    let set = parse(&format!("[server]\nidempotency_ttl = \"1h\"\n{MINIMAL}")).unwrap();
    assert_eq!(set.server.idempotency_ttl, Duration::from_secs(3600));
    let error = error_of(&format!("[server]\nidempotency_ttl = \"0s\"\n{MINIMAL}"));
    assert!(
        error.contains("gateway.toml:2:19: [server] idempotency_ttl must be above zero"),
        "{error}"
    );
    // Within abandon_after (5m by default), a key could lapse while its request still waits.
    let error = error_of(&format!("[server]\nidempotency_ttl = \"5m\"\n{MINIMAL}"));
    assert!(
        error.contains(
            "gateway.toml:2:19: [server] idempotency_ttl (5m) must be longer than [reconciler] \
             abandon_after (5m)"
        ),
        "{error}"
    );
}

#[test]
fn http_workers_default_to_one_per_core_and_are_bounded() {
    let cores = std::thread::available_parallelism().unwrap();
    assert_eq!(parse(MINIMAL).unwrap().server.workers, cores);
    let three = parse(&format!("[server]\nworkers = 3\n{MINIMAL}")).unwrap();
    assert_eq!(three.server.workers.get(), 3);
    for refused in [0, MAX_WORKERS + 1] {
        let error = error_of(&format!("[server]\nworkers = {refused}\n{MINIMAL}"));
        assert!(
            error.contains("gateway.toml:2:11: [server] workers must be between 1 and 256"),
            "{error}"
        );
    }
}

#[test]
fn keys_are_found_by_digest() {
    let config = parse(MINIMAL).unwrap();
    // The digest in MINIMAL is the SHA-256 of "foobar".
    let entry = config.key("foobar").unwrap();
    assert_eq!(
        (entry.team.name.as_str(), &*entry.label),
        ("design", "prod")
    );
    assert!(config.key("foobaz").is_none());
}

#[test]
fn deliveries_per_team_take_a_quarter_of_the_slots_unless_set_and_never_none() {
    let webhooks = parse(MINIMAL).unwrap().webhooks;
    assert_eq!(
        (
            webhooks.max_concurrent_deliveries,
            webhooks.max_concurrent_deliveries_per_team
        ),
        (32, 8)
    );
    let error = error_of(&format!(
        "{MINIMAL}\n[webhooks]\nmax_concurrent_deliveries_per_team = 0\n"
    ));
    assert!(
        error.contains(
            "gateway.toml:14:38: [webhooks] max_concurrent_deliveries_per_team must be above zero"
        ),
        "{error}"
    );
}

#[test]
fn callbacks_may_be_larger_than_requests_but_not_empty() {
    let config = parse(MINIMAL).unwrap();
    assert_eq!(config.webhooks.max_callback_bytes, 32 << 20);
    assert_eq!(config.server.max_body_bytes, 1 << 20);
    let error = error_of(&format!("{MINIMAL}\n[webhooks]\nmax_callback_bytes = 0\n"));
    assert!(
        error.contains("gateway.toml:14:22: [webhooks] max_callback_bytes must be above zero"),
        "{error}"
    );
}

#[test]
fn durations_past_a_century_are_refused_before_any_time_is_computed_from_them() {
    for setting in [
        "[webhooks]\ndelivery_deadline",
        "[webhooks]\nmax_retry_delay",
        "[reconciler]\nmax_task_age",
    ] {
        let error = error_of(&format!("{MINIMAL}\n{setting} = \"1000000y\"\n"));
        assert!(
            error.contains("duration \"1000000y\" is longer than the most allowed, 100 years"),
            "{setting}: {error}"
        );
    }
    let config = parse(&format!(
        "{MINIMAL}\n[webhooks]\ndelivery_deadline = \"99y\"\n"
    ));
    assert!(config.is_ok(), "{:?}", config.err());
}

#[test]
fn finished_deliveries_are_kept_a_week_unless_set_and_not_for_no_time() {
    let config = parse(MINIMAL).unwrap();
    assert_eq!(
        config.webhooks.keep_finished,
        Duration::from_secs(7 * 24 * 3600)
    );
    let config = parse(&format!("{MINIMAL}\n[webhooks]\nkeep_finished = \"36h\"\n")).unwrap();
    assert_eq!(
        config.webhooks.keep_finished,
        Duration::from_secs(36 * 3600)
    );
    let error = error_of(&format!("{MINIMAL}\n[webhooks]\nkeep_finished = \"0s\"\n"));
    assert!(
        error.contains("keep_finished must be above zero"),
        "{error}"
    );
}

#[test]
fn the_ownership_index_is_bounded() {
    assert_eq!(parse(MINIMAL).unwrap().cache.max_owners, 1_000_000);
    let off = parse(&format!("{MINIMAL}\n[cache]\nmax_owners = 0\n")).unwrap();
    assert_eq!(off.cache.max_owners, 0);
    let error = error_of(&format!("{MINIMAL}\n[cache]\nmax_owners = 100000001\n"));
    assert!(
        error.contains("max_owners must be at most 100000000"),
        "{error}"
    );
}

#[test]
fn the_status_cache_is_bounded_in_bytes_too() {
    let config = parse(MINIMAL).unwrap();
    assert_eq!(config.cache.max_bytes, 64 << 20);
    let error = error_of(&format!("{MINIMAL}\n[cache]\nmax_bytes = 0\n"));
    assert!(error.contains("max_bytes must be above zero"), "{error}");
    let off = parse(&format!(
        "{MINIMAL}\n[cache]\nmax_entries = 0\nmax_bytes = 0\n"
    ))
    .unwrap();
    assert_eq!(
        off.cache.max_entries, 0,
        "a cache that is off needs no byte bound"
    );
}

#[test]
fn with_public_url_every_team_needs_a_webhook_secret() {
    let with_public_url = MINIMAL.replace(
        "[upstream]",
        "[server]\npublic_url = \"https://gw.example\"\n\n[upstream]",
    );
    let error = error_of(&with_public_url);
    assert!(error.starts_with("gateway.toml:11:1:"), "{error}");
    assert!(
        error.contains(
            "[[teams]] name = \"design\": needs webhook_secret_env or webhook_secret_file"
        ),
        "{error}"
    );
    assert!(error.contains("--team design --webhook-secret"), "{error}");
    let signed = with_public_url.replace(
        "budget = {",
        "webhook_secret_env = \"KETCHUP_WEBHOOK_SECRET_DESIGN\"\nbudget = {",
    );
    assert!(parse(&signed).is_ok());
    // Without public_url nothing is relayed, so nothing needs signing.
    assert!(parse(MINIMAL).unwrap().teams[0].webhook_secret.is_none());
}

fn error_of(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

#[test]
fn a_typo_names_file_line_and_key() {
    let text = MINIMAL.replace("budget = {", "budjet = {");
    let error = error_of(&text);
    assert!(error.starts_with("gateway.toml:11:1:"), "{error}");
    assert!(
        error.contains("[[teams]] name = \"design\": unknown field `budjet`"),
        "{error}"
    );
}

#[test]
fn bad_values_name_their_line() {
    let cases = [
        (
            MINIMAL.replace("\"0.50\"", "\"0.5x\""),
            "gateway.toml:6:",
            "not a plain decimal",
        ),
        (
            MINIMAL.replace("\"monthly\"", "\"yearly\""),
            "gateway.toml:11:",
            "unknown variant `yearly`",
        ),
        (
            MINIMAL.replace("c3ab8ff1", "zzab8ff1"),
            "gateway.toml:10:",
            "64 hex digits",
        ),
        (
            MINIMAL.replace("name = \"design\"", "name = \"design team\""),
            "gateway.toml:9:",
            "must be 1 to 64 letters",
        ),
        (
            format!("{MINIMAL}\n[server]\nrequest_timeout = \"soon\"\n"),
            "gateway.toml:14:",
            "duration \"soon\" is not valid",
        ),
        (
            format!("{MINIMAL}\n[defaults.limits]\ngenerate = \"60 per minute\"\n"),
            "gateway.toml:14:",
            "must look like",
        ),
    ];
    for (text, at, what) in cases {
        let error = error_of(&text);
        assert!(
            error.starts_with(at) && error.contains(what),
            "{at} {what}: got {error}"
        );
    }
}

#[test]
fn a_tls_redis_store_may_name_its_ca_and_client_certificate() {
    let config = parse(&format!(
        "{MINIMAL}\n[store]\nkind = \"redis\"\nurl = \"rediss://redis.internal:6380/2\"\n\
         ca_file = \"/etc/redis/ca.pem\"\nclient_cert_file = \"/etc/redis/client.pem\"\n\
         client_key_file = \"/run/secrets/redis-client-key\"\n"
    ))
    .unwrap();
    let StoreConfig::Redis { tls, .. } = config.store else {
        panic!("a Redis store");
    };
    assert_eq!(
        tls,
        RedisTls {
            ca_file: Some("/etc/redis/ca.pem".into()),
            client_cert: Some((
                "/etc/redis/client.pem".into(),
                "/run/secrets/redis-client-key".into()
            )),
        }
    );
}

#[test]
fn a_redis_store_takes_its_password_from_outside_the_file() {
    let config = parse(&format!(
        "{MINIMAL}\n[store]\nkind = \"redis\"\nurl = \"rediss://redis.internal:6380/2\"\n\
         password_file = \"/run/secrets/redis\"\n"
    ))
    .unwrap();
    assert_eq!(
        config.store,
        StoreConfig::Redis {
            url: url::Url::parse("rediss://redis.internal:6380/2").unwrap(),
            password: Some(SecretSource::File("/run/secrets/redis".into())),
            key_prefix: "ketchup:".into(),
            command_timeout: Duration::from_millis(250),
            rate_limits_when_unavailable: RateLimitsWhenUnavailable::Refuse,
            tls: RedisTls::default(),
        }
    );
    let redis = |lines: &str| error_of(&format!("{MINIMAL}\n[store]\nkind = \"redis\"\n{lines}\n"));
    assert!(redis("").contains("needs url"));
    assert!(redis("url = \"redis://:hunter2@r:6379\"").contains("must not hold a password"));
    assert!(!redis("url = \"redis://:hunter2@r:6379\"").contains("hunter2"));
    assert!(redis("url = \"http://r:6379\"").contains("redis:// or rediss://"));
    assert!(redis("url = \"redis://r\"\npath = \"x.db\"").contains("path is for kind"));
    assert!(redis("url = \"redis://r\"\ncommand_timeout = \"0s\"").contains("above zero"));
    let unknown = redis("url = \"redis://r\"\nrate_limits_when_unavailable = \"maybe\"");
    assert!(
        unknown.contains(
            "gateway.toml:16:32: [store] rate_limits_when_unavailable: unknown variant `maybe`, \
             expected `refuse` or `allow`"
        ),
        "{unknown}"
    );
    assert!(
        redis("url = \"redis://r\"\nca_file = \"ca.pem\"").contains("must start with rediss://")
    );
    assert!(redis("url = \"rediss://r\"\nclient_cert_file = \"c.pem\"").contains("go together"));
    let sqlite_with_url = error_of(&format!(
        "{MINIMAL}\n[store]\npath = \"x.db\"\nkey_prefix = \"k:\"\n"
    ));
    assert!(
        sqlite_with_url.contains("gateway.toml:15:14: [store] key_prefix is for kind = \"redis\""),
        "{sqlite_with_url}"
    );
}

#[test]
fn cross_field_mistakes_are_refused() {
    let duplicate_team = format!(
        "{MINIMAL}\n[[teams]]\nname = \"design\"\nkeys = [{{ sha256 = \"{}\" }}]\n",
        KeyDigest::of("other").to_hex()
    );
    assert!(error_of(&duplicate_team).contains("[[teams]] name = \"design\": listed twice"));

    let shared_key = format!(
        "{MINIMAL}\n[[teams]]\nname = \"ads\"\nkeys = [{{ sha256 = \"{}\" }}]\n",
        KeyDigest::of("foobar").to_hex()
    );
    assert!(error_of(&shared_key).contains("already used by [[teams]] name = \"design\":"));

    let both_tokens = MINIMAL.replace(
        "token_env = \"KETCHUP_UPSTREAM_TOKEN\"",
        "token_env = \"A\"\ntoken_file = \"/run/secrets/t\"",
    );
    assert!(error_of(&both_tokens).contains("not both"));

    let no_token = MINIMAL.replace("token_env = \"KETCHUP_UPSTREAM_TOKEN\"", "");
    assert!(error_of(&no_token).contains("needs token_env or token_file"));

    let no_keys = MINIMAL.replace(
        "keys = [{ sha256 = \"c3ab8ff13720e8ad9047dd39466b3c8974e592c2fa383d4a3960714caef0c4f2\", label = \"prod\" }]",
        "keys = []",
    );
    assert!(error_of(&no_keys).contains("[[teams]] name = \"design\": keys is empty"));

    let slow_upstream = MINIMAL.replace(
        "token_env = \"KETCHUP_UPSTREAM_TOKEN\"",
        "token_env = \"KETCHUP_UPSTREAM_TOKEN\"\ntimeout = \"10m\"",
    );
    assert!(error_of(&slow_upstream).contains("[reconciler] abandon_after (5m) must be longer"));

    let token_in_file = MINIMAL.replace("token_env", "token");
    assert!(error_of(&token_in_file).contains("unknown field `token`"));
}

#[test]
fn secrets_resolve_from_files_without_the_trailing_newline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, "dk-secret\n").unwrap();
    let secret = SecretSource::File(path).resolve("upstream token").unwrap();
    assert_eq!(secret.expose(), "dk-secret");
    assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
    let missing = SecretSource::Env("KETCHUP_TEST_SURELY_UNSET".into()).resolve("upstream token");
    assert!(
        missing
            .unwrap_err()
            .to_string()
            .contains("KETCHUP_TEST_SURELY_UNSET is not set")
    );
}

#[test]
fn a_store_kind_outside_its_set_names_the_key_its_line_and_the_kinds() {
    let error = error_of(&format!("{MINIMAL}\n[store]\nkind = \"postgres\"\n"));
    assert_eq!(
        error,
        "gateway.toml:14:8: [store] kind: unknown variant `postgres`, expected `sqlite` or `redis`"
    );
}

#[test]
fn rate_limits_refuse_without_redis_unless_told_to_allow() {
    let store = |lines: &str| {
        let text = format!("{MINIMAL}\n[store]\nkind = \"redis\"\nurl = \"redis://r\"\n{lines}\n");
        match parse(&text).unwrap().store {
            StoreConfig::Redis {
                rate_limits_when_unavailable,
                ..
            } => rate_limits_when_unavailable,
            StoreConfig::Sqlite { .. } => panic!("a Redis store"),
        }
    };
    assert_eq!(store(""), RateLimitsWhenUnavailable::Refuse);
    assert_eq!(
        store("rate_limits_when_unavailable = \"refuse\""),
        RateLimitsWhenUnavailable::Refuse
    );
    assert_eq!(
        store("rate_limits_when_unavailable = \"allow\""),
        RateLimitsWhenUnavailable::Allow
    );
    let error = error_of(&format!(
        "{MINIMAL}\n[store]\nrate_limits_when_unavailable = \"allow\"\n"
    ));
    assert_eq!(
        error,
        "gateway.toml:14:32: [store] rate_limits_when_unavailable is for kind = \"redis\"; \
         sqlite uses path"
    );
}

#[test]
fn a_value_inside_a_team_names_the_team_and_the_key() {
    let ads = |lines: &str| {
        format!(
            "{MINIMAL}\n[[teams]]\nname = \"ads\"\nkeys = [{{ sha256 = \"{}\" }}]\n{lines}\n",
            KeyDigest::of("ads").to_hex()
        )
    };
    let cases = [
        (
            ads("budget = { credits = \"1\", period = \"yearly\" }"),
            "gateway.toml:16:36: [[teams]] name = \"ads\": budget.period: unknown variant \
             `yearly`, expected one of `daily`, `weekly`, `monthly`, `lifetime`",
        ),
        (
            ads("limits.generate = \"1/y\""),
            "gateway.toml:16:19: [[teams]] name = \"ads\": limits.generate: rate \"1/y\" must \
             look like \"20/s\", \"60/min\" or \"1000/h\"",
        ),
        (
            ads("webhook_secret_env = \"A\"\nwebhook_secret_file = \"/run/secrets/a\""),
            "gateway.toml:17:23: [[teams]] name = \"ads\": webhook_secret_env and \
             webhook_secret_file are both set: set one, not both",
        ),
        (
            ads("budget = { credits = \"1\", period = \"daily\", max_in_flight = 0 }"),
            "gateway.toml:16:61: [[teams]] name = \"ads\": budget.max_in_flight must be at \
             least 1",
        ),
        (
            ads("budjet = {}"),
            "gateway.toml:16:1: [[teams]] name = \"ads\": unknown field `budjet`, expected one \
             of `name`, `keys`, `budget`, `limits`, `webhook_secret_env`, \
             `webhook_secret_file`, `callback_hosts`, `models`, `notify_url`",
        ),
        (
            format!("{MINIMAL}\n[[teams]]\nkeys = []\n"),
            "gateway.toml:13:1: [[teams]]: missing field `name`",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(error_of(&text), expected);
    }
}

#[test]
fn a_secret_is_named_by_the_keys_its_table_has() {
    let cases = [
        (
            MINIMAL.replace(
                "token_env = \"KETCHUP_UPSTREAM_TOKEN\"",
                "token_env = \"A\"\ntoken_file = \"/run/secrets/t\"",
            ),
            "gateway.toml:4:14: [upstream] token_env and token_file are both set: set one, not \
             both",
        ),
        (
            format!(
                "{MINIMAL}\n[store]\nkind = \"redis\"\nurl = \"redis://r\"\n\
                 password_env = \"A\"\npassword_file = \"/run/secrets/redis\"\n"
            ),
            "gateway.toml:17:17: [store] password_env and password_file are both set: set one, \
             not both",
        ),
        (
            format!("{MINIMAL}\n[admin]\ntoken_env = \"\"\n"),
            "gateway.toml:14:13: [admin] token_env is empty: it names the environment variable \
             that holds the secret",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(error_of(&text), expected);
    }
}

#[test]
fn a_value_outside_the_teams_names_its_table_and_key() {
    let cases = [
        (
            MINIMAL.replace("\"0.50\"", "0.5"),
            "gateway.toml:6:11: [models.\"google/gempix2\"] reserve: invalid type: floating \
             point `0.5`, expected an amount such as \"0.50\", or a table such as { by = \"duration\", \
             prices = { \"10\" = \"1.00\" } } or { by = \"duration\", per_unit = \"0.10\", max = 25 }",
        ),
        (
            format!("{MINIMAL}\n[defaults.limits]\nquery_burst = 0\n"),
            "gateway.toml:14:15: [defaults.limits] query_burst: invalid value: integer `0`, \
             expected a nonzero u32",
        ),
        (
            format!("{MINIMAL}\n[store]\nkinds = \"redis\"\n"),
            "gateway.toml:14:1: [store]: unknown field `kinds`, expected one of `kind`, `path`, \
             `url`, `password_env`, `password_file`, `key_prefix`, `command_timeout`, \
             `rate_limits_when_unavailable`, `ca_file`, `client_cert_file`, `client_key_file`",
        ),
        (
            format!("{MINIMAL}\n[cache]\nmax_entries = 10\nmax_bytes = 0\n"),
            "gateway.toml:15:13: [cache] max_bytes must be above zero (turn the cache off with \
             max_entries = 0)",
        ),
        (
            format!("{MINIMAL}\n[reconciler]\nsettle_after = \"500ms\"\n"),
            "gateway.toml:14:16: [reconciler] settle_after must be at least 1s (the upstream \
             asks for at most one status read per task per second)",
        ),
        (
            format!("{MINIMAL}\n[webhooks]\nfirst_retry = \"2h\"\n"),
            "gateway.toml:14:15: [webhooks] first_retry must be at most max_retry_delay (1h \
             unless set)",
        ),
        (
            format!("{MINIMAL}\n[webhooks]\nalways_intercept = true\n"),
            "gateway.toml:14:20: [webhooks] always_intercept needs [server] public_url: the \
             address at which the upstream can reach this gateway",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(error_of(&text), expected);
    }
}

#[test]
fn the_balance_check_runs_every_five_minutes_unless_set_or_off() {
    let every = |line: &str| {
        let text = MINIMAL.replace(
            "token_env = \"KETCHUP_UPSTREAM_TOKEN\"",
            &format!("token_env = \"KETCHUP_UPSTREAM_TOKEN\"\n{line}"),
        );
        parse(&text).map(|config| config.upstream.balance_check)
    };
    assert_eq!(every("").unwrap(), Some(Duration::from_secs(300)));
    assert_eq!(
        every("balance_check = \"30s\"").unwrap(),
        Some(Duration::from_secs(30))
    );
    assert_eq!(every("balance_check = \"0s\"").unwrap(), None);
    assert_eq!(
        every("balance_check = \"500ms\"").unwrap_err().to_string(),
        "gateway.toml:4:17: [upstream] balance_check must be \"0s\" (off) or at least \"1s\""
    );
}

#[test]
fn upstream_accounts_are_the_one_token_or_named_tables_never_both() {
    let config = parse(MINIMAL).unwrap();
    assert_eq!(
        config.upstream.accounts,
        [UpstreamAccount {
            name: "default".into(),
            token: SecretSource::Env("KETCHUP_UPSTREAM_TOKEN".into()),
        }]
    );
    assert_eq!(config.upstream.balance_floor, Credits::ZERO);
    let tables = |accounts: &str| {
        MINIMAL.replace(
            "token_env = \"KETCHUP_UPSTREAM_TOKEN\"\n",
            &format!("balance_floor = \"5.00\"\n{accounts}"),
        )
    };
    let two = tables(
        "[[upstream.accounts]]\nname = \"main\"\ntoken_env = \"MAIN\"\n\
         [[upstream.accounts]]\nname = \"spare-2\"\ntoken_file = \"/run/secrets/spare\"\n",
    );
    let config = parse(&two).unwrap();
    assert_eq!(config.upstream.balance_floor, "5.00".parse().unwrap());
    assert_eq!(
        config.upstream.accounts,
        [
            UpstreamAccount {
                name: "main".into(),
                token: SecretSource::Env("MAIN".into()),
            },
            UpstreamAccount {
                name: "spare-2".into(),
                token: SecretSource::File("/run/secrets/spare".into()),
            },
        ]
    );
    let cases = [
        (
            MINIMAL.replace(
                "token_env = \"KETCHUP_UPSTREAM_TOKEN\"\n",
                "token_env = \"KETCHUP_UPSTREAM_TOKEN\"\naccounts = [{ name = \"a\", token_env = \"A\" }]\n",
            ),
            "gateway.toml:4:12: [upstream] accounts and [upstream] token_env/token_file are both \
             set: name every account in [[upstream.accounts]], or keep the one token",
        ),
        (
            MINIMAL.replace("token_env = \"KETCHUP_UPSTREAM_TOKEN\"\n", ""),
            "gateway.toml:2:1: [upstream] needs token_env or token_file, or \
             [[upstream.accounts]]: the upstream token is never written in this file",
        ),
        (
            tables("[[upstream.accounts]]\nname = \"Main\"\ntoken_env = \"A\"\n"),
            "gateway.toml:5:8: [[upstream.accounts]] name \"Main\" must be 1 to 32 lowercase \
             letters, digits, '-' or '_'",
        ),
        (
            tables(
                "[[upstream.accounts]]\nname = \"a\"\ntoken_env = \"A\"\n\
                 [[upstream.accounts]]\nname = \"a\"\ntoken_env = \"B\"\n",
            ),
            "gateway.toml:8:8: [[upstream.accounts]] name \"a\" is used twice",
        ),
        (
            tables("[[upstream.accounts]]\nname = \"a\"\n"),
            "gateway.toml:4:1: [[upstream.accounts]] name = \"a\": needs token_env or token_file",
        ),
        (
            tables(
                "[[upstream.accounts]]\nname = \"a\"\ntoken_env = \"A\"\ntoken_file = \"/a\"\n",
            ),
            "gateway.toml:7:14: [[upstream.accounts]] name = \"a\": token_env and token_file are \
             both set: set one, not both",
        ),
        (
            MINIMAL.replace(
                "token_env = \"KETCHUP_UPSTREAM_TOKEN\"\n",
                "token_env = \"KETCHUP_UPSTREAM_TOKEN\"\nbalance_floor = \"-1\"\n",
            ),
            "gateway.toml:4:17: [upstream] balance_floor: credit amount \"-1\" is not a plain \
             decimal number such as \"0.50\"",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(error_of(&text), expected, "{text}");
    }
    let many: String = (0..=MAX_ACCOUNTS)
        .map(|i| format!("[[upstream.accounts]]\nname = \"a{i}\"\ntoken_env = \"A\"\n"))
        .collect();
    assert!(error_of(&tables(&many)).contains("must list 1 to 16 accounts"));
}

#[test]
fn a_repeated_key_or_a_key_without_a_value_is_named() {
    let cases = [
        (
            format!("{MINIMAL}\n[store]\nkind = \"sqlite\"\nkind = \"sqlite\"\n"),
            "gateway.toml:15:1: [store]: duplicate key `kind`",
        ),
        (
            MINIMAL.replace("name = \"design\"", "name = \"design\"\nname = \"ads\""),
            "gateway.toml:10:1: [[teams]] name = \"design\": duplicate key `name`",
        ),
        (
            format!(
                "{MINIMAL}\n[routes.\"/api/x\"]\nfamily = \"v\"\nreferences = {{ a = 1, a = 2 }}\n"
            ),
            "gateway.toml:15:23: [routes.\"/api/x\".references]: duplicate key `a`",
        ),
        (
            MINIMAL.replace("token_env = \"KETCHUP_UPSTREAM_TOKEN\"", "token_env ="),
            "gateway.toml:3:12: [upstream] token_env: string values must be quoted, expected \
             literal string",
        ),
        (
            format!("{MINIMAL}\n[cache]\nmax_owners = ^{{\n"),
            "gateway.toml:14:15: [cache] max_owners: unexpected key or value, expected newline, \
             `#`",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(error_of(&text), expected);
    }
}
