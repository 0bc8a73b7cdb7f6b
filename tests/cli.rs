//! The `ketchup-gateway` command line, run as an admin runs it: `keygen`, `check-config`,
//! `serve` (secret resolution) and `healthcheck`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ADS_KEY, DESIGN_KEY, Env, UPSTREAM_TOKEN, closed_port, config_text, digest};
use ketchup_domain::config::KeyDigest;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ketchup-gateway");

/// Runs the binary to completion with a clean environment for the variables it reads.
fn run(args: &[&str]) -> Output {
    Command::new(BIN)
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

/// The harness's config text, for a fake upstream that is never called.
fn base_config(dir: &Path) -> String {
    config_text(
        &format!("http://127.0.0.1:{}", closed_port()),
        &dir.join("ledger.db"),
        "",
        "",
    )
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
    let config = base_config(dir.path()).replace(
        &format!(
            "keys = [{{ sha256 = \"{}\", label = \"design-test\" }}]",
            digest(DESIGN_KEY)
        ),
        &format!("keys = [{}]", first.line),
    );
    assert!(config.contains(&first.line));
    let path = write(dir.path(), "gateway.toml", &config);
    let output = run(&["check-config", path.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        text(&output.stdout),
        format!("{}: ok (2 teams, 2 models)\n", path.display())
    );
}

#[tokio::test]
async fn a_keygen_line_pasted_into_the_config_admits_its_key() {
    // ...and the gateway then accepts the key for that team.
    let generated = keygen("design", "design-new");
    let mut env = Env::start().await;
    let config = std::fs::read_to_string(&env.gateway.config_path).unwrap();
    let design_keys = format!(
        "keys = [{{ sha256 = \"{}\", label = \"design-test\" }}]",
        digest(DESIGN_KEY)
    );
    assert!(config.contains(&design_keys));
    let config = config.replace(
        &design_keys,
        &format!(
            "keys = [{{ sha256 = \"{}\", label = \"design-test\" }}, {}]",
            digest(DESIGN_KEY),
            generated.line
        ),
    );
    std::fs::write(&env.gateway.config_path, config).unwrap();
    env.restart_after_kill();

    let task = env.start_task(&generated.key).await;
    let (status, body) = env.query(DESIGN_KEY, &task).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["task_id"], task.as_str());
    let (status, body) = env.query(ADS_KEY, &task).await;
    assert_eq!(status, 404, "{body}");
}

#[test]
fn the_shipped_example_config_validates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.example.toml");
    let output = run(&["check-config", path.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        text(&output.stdout),
        format!("{}: ok (2 teams, 2 models)\n", path.display())
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
    let config = base_config(dir.path()).replace(
        "name = \"ads\"\n",
        "name = \"ads\"\nbudjet = { credits = \"10.00\", period = \"monthly\" }\n",
    );
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
    let secret = write(
        dir.path(),
        "design_webhook_secret",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n",
    );
    let config = base_config(dir.path())
        .replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:0\"\npublic_url = \"https://gateway.example\"",
        )
        .replace(
            "label = \"design-test\" }]",
            &format!(
                "label = \"design-test\" }}]\nwebhook_secret_file = \"{}\"",
                secret.display()
            ),
        );
    // The error points at the `[[teams]]` line of the team without a secret.
    let line = line_of(&config, "name = \"ads\"") - 1;
    let path = write(dir.path(), "unsigned.toml", &config);
    let stderr = check_config_fails(&path);
    let at = format!("ketchup-gateway: {}:{line}:1: ", path.display());
    assert!(stderr.starts_with(&at), "expected {at:?} in {stderr:?}");
    assert!(
        stderr
            .contains("[[teams]] name = \"ads\": needs webhook_secret_env or webhook_secret_file"),
        "{stderr}"
    );

    // Given one too, the file is fine.
    let signed = config.replace(
        "label = \"ads-test\" }]",
        &format!(
            "label = \"ads-test\" }}]\nwebhook_secret_file = \"{}\"",
            secret.display()
        ),
    );
    let path = write(dir.path(), "signed.toml", &signed);
    let output = run(&["check-config", path.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn check_config_names_the_line_of_a_bad_value() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_config(dir.path());
    let with_budget = base.replace(
        "name = \"ads\"\n",
        "name = \"ads\"\nbudget = { credits = \"10.00\", period = \"monthly\" }\n",
    );
    let cases = [
        (
            "period",
            with_budget.replace("\"monthly\"", "\"yearly\""),
            "period = \"yearly\"",
            "unknown variant `yearly`",
        ),
        (
            "reserve",
            base.replacen("reserve = \"0.50\"", "reserve = \"0.5x\"", 1),
            "reserve = \"0.5x\"",
            "not a plain decimal",
        ),
        (
            "listen",
            base.replace("listen = \"127.0.0.1:0\"", "listen = 8080"),
            "listen = 8080",
            "invalid type",
        ),
    ];
    for (name, config, needle, what) in cases {
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
    // The unmodified text is valid, so each failure above is the one change's.
    let path = write(dir.path(), "base.toml", &with_budget);
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

/// A `serve` process whose stderr (JSON log lines) is collected.
struct Served {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    addr: std::sync::mpsc::Receiver<SocketAddr>,
}

impl Served {
    fn start(config: &Path, token_env: Option<&str>) -> Served {
        let mut command = Command::new(BIN);
        command
            .args(["--log-format", "json", "serve", "--config"])
            .arg(config)
            .env_remove("KETCHUP_UPSTREAM_TOKEN")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(token) = token_env {
            command.env("KETCHUP_UPSTREAM_TOKEN", token);
        }
        let mut child = command.spawn().expect("binary starts");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, addr) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str::<Value>(&line)
                    && event["message"] == "ketchup-gateway listening"
                    && let Some(address) = event["address"].as_str()
                {
                    let _ = tx.send(address.parse().expect("socket address"));
                }
                sink.lock().unwrap().push(line);
            }
        });
        Served { child, logs, addr }
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits for the process to exit by itself (up to 30 s) and returns its exit code.
    fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("serve did not exit; log:\n{}", self.logs());
    }

    fn listening(&mut self) -> SocketAddr {
        match self.addr.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = self.child.kill();
                panic!("gateway did not start; log:\n{}", self.logs());
            }
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serve_refuses_to_start_without_the_upstream_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "gateway.toml", &base_config(dir.path()));
    let mut served = Served::start(&path, None);
    assert_eq!(served.wait_exit(), Some(1));
    // The reader thread may still be draining the pipe: wait for the line.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !served.logs().contains("ketchup-gateway:") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        served.logs(),
        "ketchup-gateway: upstream token: environment variable KETCHUP_UPSTREAM_TOKEN is not set"
    );
    // Nothing was opened: the ledger is created only after the token resolved.
    assert!(!dir.path().join("ledger.db").exists());
}

#[test]
fn serve_refuses_an_empty_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let token = write(dir.path(), "token", "\n");
    let config = base_config(dir.path()).replace(
        "token_env = \"KETCHUP_UPSTREAM_TOKEN\"",
        &format!("token_file = \"{}\"", token.display()),
    );
    let path = write(dir.path(), "gateway.toml", &config);
    let output = run(&["serve", "--config", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(
        text(&output.stderr),
        "ketchup-gateway: upstream token: the secret is empty\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reads_the_upstream_token_from_a_file() {
    let fake = ketchup_fake_upstream::start(common::fake_config())
        .await
        .expect("fake starts");
    let dir = tempfile::tempdir().unwrap();
    // As a Docker secret is written: with a trailing newline, which is not part of the token.
    let token = write(dir.path(), "upstream_token", &format!("{UPSTREAM_TOKEN}\n"));
    let config = config_text(&fake.base_url(), &dir.path().join("ledger.db"), "", "").replace(
        "token_env = \"KETCHUP_UPSTREAM_TOKEN\"",
        &format!("token_file = \"{}\"", token.display()),
    );
    assert!(config.contains("token_file"));
    let path = write(dir.path(), "gateway.toml", &config);
    // A token in the environment too would hide a bug: it is removed.
    let mut served = Served::start(&path, None);
    let addr = tokio::task::block_in_place(|| served.listening());

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

    let url = format!("http://127.0.0.1:{}/healthz", closed_port());
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
