//! The `ketchup-gateway` command line, run as an admin runs it: `keygen`, `check-config`,
//! `serve` (secret resolution) and `healthcheck`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ketchup_domain::config::KeyDigest;
use ketchup_testkit::gateway::binary;
use ketchup_testkit::{
    ADS_KEY, DESIGN_KEY, Env, GatewayConfig, GatewayProcess, Launch, UPSTREAM_TOKEN, fake_config,
    free_port, start_fake,
};
use serde_json::Value;

/// Runs the binary to completion with a clean environment for the variables it reads.
fn run(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .env_remove("KETCHUP_UPSTREAM_TOKEN")
        .env_remove("KETCHUP_LOG_FORMAT")
        .stdin(Stdio::null())
        .output()
        .expect("binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("UTF-8 output")
}

/// Writes `text` as `name` in `dir` and returns its path.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("file written");
    path
}

/// The base config, for an upstream that is never called.
fn base_config() -> GatewayConfig {
    GatewayConfig::new().upstream_url(&format!("http://127.0.0.1:{}", free_port()))
}

/// The 1-based line of `text` that contains `needle` (which must occur exactly once).
fn line_of(text: &str, needle: &str) -> usize {
    let lines: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, line)| line.contains(needle))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(lines.len(), 1, "{needle:?} must occur on exactly one line");
    lines[0]
}

struct Keygen {
    key: String,
    line: String,
}

fn keygen(team: &str, label: &str) -> Keygen {
    let output = run(&["keygen", "--team", team, "--label", label]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(text(&output.stderr), "");
    let stdout = text(&output.stdout);
    let keys: Vec<&str> = stdout.lines().filter(|l| l.starts_with("kgw_")).collect();
    assert_eq!(keys.len(), 1, "exactly one key line in:\n{stdout}");
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("{ sha256 = "))
        .collect();
    assert_eq!(lines.len(), 1, "exactly one config line in:\n{stdout}");
    Keygen {
        key: keys[0].to_owned(),
        line: lines[0].to_owned(),
    }
}

#[test]
fn keygen_prints_a_fresh_key_and_the_line_that_admits_it() {
    let first = keygen("design", "design-prod");
    let second = keygen("design", "design-prod");

    // 256 random bits, hex-encoded, behind the prefix.
    let hex = first.key.strip_prefix("kgw_").unwrap();
    assert_eq!(hex.len(), 64, "{}", first.key);
    assert!(
        hex.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_ne!(first.key, second.key);

    let key_digest = KeyDigest::of(&first.key).to_hex();
    assert_eq!(key_digest.len(), 64);
    assert_eq!(
        first.line,
        format!("{{ sha256 = \"{key_digest}\", label = \"design-prod\" }}")
    );
    // The line never carries the key itself.
    assert!(!first.line.contains(hex));
    assert_ne!(first.line, second.line);

    // The printed line, pasted into a team's keys, validates...
    let dir = tempfile::tempdir().unwrap();
    let config = base_config()
        .key_entry("design", &first.line)
        .render(dir.path());
    assert!(config.contains(&first.line));
    let path = write(dir.path(), "gateway.toml", &config);
    let output = run(&["check-config", path.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        text(&output.stdout),
        format!("{}: ok (2 teams, 2 models)\n", path.display())
    );
}

#[test]
fn keygen_expires_writes_when_the_key_stops_working() {
    let before = chrono::Utc::now();
    let output = run(&[
        "keygen",
        "--team",
        "design",
        "--label",
        "contractor",
        "--expires",
        "30d",
    ]);
    assert!(output.status.success(), "{output:?}");
    let stdout = text(&output.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("{ sha256 = "))
        .unwrap_or_else(|| panic!("no config line in:\n{stdout}"));
    let expires_at = line
        .split("expires_at = \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no expires_at in {line}"));
    let expires_at = chrono::DateTime::parse_from_rfc3339(expires_at).unwrap();
    let valid_for = expires_at.signed_duration_since(before);
    assert!(
        (valid_for - chrono::Duration::days(30)).num_seconds().abs() < 60,
        "{line}"
    );
    // The line validates as it is.
    let dir = tempfile::tempdir().unwrap();
    let config = base_config().key_entry("design", line).render(dir.path());
    let path = write(dir.path(), "gateway.toml", &config);
    let output = run(&["check-config", path.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");

    let output = run(&["keygen", "--team", "design", "--expires", "soon"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(text(&output.stderr).contains("--expires"), "{output:?}");
}

#[tokio::test]
async fn a_keygen_line_pasted_into_the_config_admits_its_key() {
    // ...and the gateway then accepts the key for that team.
    let generated = keygen("design", "design-new");
    let mut env = Env::start().await;
    let config = env
        .gateway
        .config()
        .clone()
        .key_entry("design", &generated.line);
    env.gateway.set_config(config);
    env.gateway.restart_after_kill();

    let task = env.api().start_task(&generated.key).await;
    let reply = env.api().query(DESIGN_KEY, &task).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["data"]["task_id"], task.as_str());
    let reply = env.api().query(ADS_KEY, &task).await;
    assert_eq!(reply.status, 404, "{}", reply.text);
}

#[test]
fn the_shipped_example_config_validates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.example.toml");
    let output = run(&["check-config", path.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        text(&output.stdout),
        format!("{}: ok (2 teams, 21 models)\n", path.display())
    );
}

/// Runs check-config on `config` and returns its stderr, asserting it failed with nothing on
/// stdout.
fn check_config_fails(path: &Path) -> String {
    let output = run(&["check-config", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(text(&output.stdout), "");
    text(&output.stderr)
}

#[test]
fn check_config_names_file_line_and_column_of_a_typo() {
    let dir = tempfile::tempdir().unwrap();
    let config = base_config()
        .team_lines(
            "ads",
            "budjet = { credits = \"10.00\", period = \"monthly\" }",
        )
        .render(dir.path());
    let line = line_of(&config, "budjet");
    let path = write(dir.path(), "typo.toml", &config);
    let stderr = check_config_fails(&path);
    let at = format!("ketchup-gateway: {}:{line}:1: ", path.display());
    assert!(stderr.starts_with(&at), "expected {at:?} in {stderr:?}");
    assert!(stderr.contains("unknown field `budjet`"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn check_config_refuses_a_team_that_could_get_unsigned_webhooks() {
    let dir = tempfile::tempdir().unwrap();
    let config = base_config()
        .server("public_url = \"https://gateway.example\"")
        .signed_webhooks("design");
    let text = config.render(dir.path());
    // The error points at the `[[teams]]` line of the team without a secret.
    let line = line_of(&text, "name = \"ads\"") - 1;
    let path = write(dir.path(), "unsigned.toml", &text);
    let stderr = check_config_fails(&path);
    let at = format!("ketchup-gateway: {}:{line}:1: ", path.display());
    assert!(stderr.starts_with(&at), "expected {at:?} in {stderr:?}");
    assert!(
        stderr
            .contains("[[teams]] name = \"ads\": needs webhook_secret_env or webhook_secret_file"),
        "{stderr}"
    );

    // Given one too, the file is fine.
    let signed = config.signed_webhooks("ads").render(dir.path());
    let path = write(dir.path(), "signed.toml", &signed);
    let output = run(&["check-config", path.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn check_config_names_the_line_of_a_bad_value() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_config();
    let with_budget = base
        .clone()
        .budget("ads", r#"{ credits = "10.00", period = "monthly" }"#);
    let cases = [
        (
            "period",
            base.clone()
                .budget("ads", r#"{ credits = "10.00", period = "yearly" }"#),
            "period = \"yearly\"",
            "unknown variant `yearly`",
        ),
        (
            "reserve",
            base.clone().model("google/gempix2", "0.5x"),
            "reserve = \"0.5x\"",
            "not a plain decimal",
        ),
        (
            "listen",
            base.clone().server("listen = 8080"),
            "listen = 8080",
            "invalid type",
        ),
    ];
    for (name, config, needle, what) in cases {
        let config = config.render(dir.path());
        let line = line_of(&config, needle);
        let path = write(dir.path(), &format!("{name}.toml"), &config);
        let stderr = check_config_fails(&path);
        let at = format!("ketchup-gateway: {}:{line}:", path.display());
        assert!(
            stderr.starts_with(&at),
            "{name}: expected {at:?} in {stderr:?}"
        );
        assert!(
            stderr.contains(what),
            "{name}: expected {what:?} in {stderr:?}"
        );
    }
    // The unmodified config is valid, so each failure above is the one change's.
    let path = with_budget.write(dir.path());
    assert!(
        run(&["check-config", path.to_str().unwrap()])
            .status
            .success()
    );
}

#[test]
fn check_config_reports_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nowhere.toml");
    let stderr = check_config_fails(&path);
    let expected = format!("ketchup-gateway: {}: cannot read: ", path.display());
    assert!(stderr.starts_with(&expected), "{stderr}");
    assert!(stderr.contains("No such file or directory"), "{stderr}");
}

/// `serve` on `config`, without `KETCHUP_UPSTREAM_TOKEN` in its environment.
fn serve_without_token_env(config: &Path) -> GatewayProcess {
    GatewayProcess::spawn(
        config,
        Launch {
            without_upstream_token: true,
            ..Launch::default()
        },
    )
}

#[test]
fn serve_refuses_to_start_without_the_upstream_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = base_config().write(dir.path());
    let mut served = serve_without_token_env(&path);
    assert_eq!(served.wait_exit().code(), Some(1));
    assert_eq!(
        served.logs(),
        "ketchup-gateway: upstream token: environment variable KETCHUP_UPSTREAM_TOKEN is not set"
    );
    // Nothing was opened: the ledger is created only after the token resolved.
    assert!(!dir.path().join("ledger.db").exists());
}

#[test]
fn serve_names_the_account_whose_token_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = base_config()
        .upstream_accounts(&[("main", "dk-main"), ("spare", "\n")])
        .write(dir.path());
    let output = run(&["serve", "--config", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(
        text(&output.stderr),
        "ketchup-gateway: upstream account spare token: the secret is empty\n"
    );
}

#[test]
fn serve_refuses_an_empty_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let token = write(dir.path(), "token", "\n");
    let path = base_config().upstream_token_file(&token).write(dir.path());
    let output = run(&["serve", "--config", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(
        text(&output.stderr),
        "ketchup-gateway: upstream token: the secret is empty\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reads_the_upstream_token_from_a_file() {
    let fake = start_fake(fake_config()).await;
    let dir = tempfile::tempdir().unwrap();
    // As a Docker secret is written: with a trailing newline, which is not part of the token.
    let token = write(dir.path(), "upstream_token", &format!("{UPSTREAM_TOKEN}\n"));
    let path = GatewayConfig::new()
        .upstream_url(&fake.base_url())
        .upstream_token_file(&token)
        .write(dir.path());
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .contains("token_file")
    );
    // A token in the environment too would hide a bug: it is removed.
    let mut served = serve_without_token_env(&path);
    let addr = tokio::task::block_in_place(|| served.wait_listening());

    let http = reqwest::Client::new();
    let health = http
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap(), r#"{"status":"ok"}"#);

    // The token from the file is the one sent upstream: the fake accepts the generation.
    let response = http
        .post(format!("http://{addr}/api/image/gen"))
        .bearer_auth(DESIGN_KEY)
        .header("content-type", "application/json")
        .body(r#"{"model":"google/gempix2","prompt":"a tomato"}"#)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body["data"]["task_id"].is_string(), "{body}");
    let stats = fake.stats();
    assert_eq!(stats.generate_accepted, 1);
    assert_eq!(
        stats.authorization_headers,
        vec![format!("Bearer {UPSTREAM_TOKEN}")]
    );
    assert_eq!(stats.unauthorized, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_passes_against_a_running_gateway_and_fails_otherwise() {
    let env = Env::start().await;
    let url = env.gateway.url("/healthz");
    let output = tokio::task::spawn_blocking(move || run(&["healthcheck", "--url", &url]))
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(text(&output.stdout), "");
    assert_eq!(text(&output.stderr), "");

    // A URL that answers, but not 200 (every path but the probes needs a key), fails the check.
    let url = env.gateway.url("/api/task/query");
    let output = tokio::task::spawn_blocking({
        let url = url.clone();
        move || run(&["healthcheck", "--url", &url])
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(
        text(&output.stderr),
        format!("ketchup-gateway: {url} answered 401 Unauthorized\n")
    );

    let url = format!("http://127.0.0.1:{}/healthz", free_port());
    let output = tokio::task::spawn_blocking({
        let url = url.clone();
        move || run(&["healthcheck", "--url", &url])
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with(&format!("ketchup-gateway: {url}: ")),
        "{stderr}"
    );
}
