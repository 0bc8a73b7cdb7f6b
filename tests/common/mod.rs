//! Test harness: runs the real `ketchup-gateway` binary, as an admin would, on a free port with a
//! temporary config and ledger, in front of the fake upstream running in the test process.
#![allow(dead_code)] // each test binary uses its own part of the harness

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ketchup_fake_upstream::{FakeConfig, FakeHandle};

pub mod tls;
pub mod webhook_receiver;
use serde_json::Value;

pub const UPSTREAM_TOKEN: &str = "dk-upstream-secret-0123456789abcdef";
pub const DESIGN_KEY: &str = "kgw_design_test_key_0123456789";
pub const ADS_KEY: &str = "kgw_ads_test_key_9876543210";

/// A `[cache]` table that turns the status cache off, for tests that count every upstream read.
pub const CACHE_OFF: &str = "\n[cache]\nmax_entries = 0\n";

pub fn digest(key: &str) -> String {
    ketchup_domain::config::KeyDigest::of(key).to_hex()
}

/// A config with two teams (`design`, `ads`) in front of `upstream`, plus `extra` TOML appended
/// (which may add tables or override nothing already set).
pub fn config_text(
    upstream: &str,
    ledger: &std::path::Path,
    server_extra: &str,
    upstream_extra: &str,
) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
{server_extra}

[upstream]
base_url = "{upstream}"
token_env = "KETCHUP_UPSTREAM_TOKEN"
query_retries = 1
max_requests_per_second = 10000
{upstream_extra}

[store]
path = "{ledger}"

[models."google/gempix2"]
reserve = "0.50"

[models."google/gemini-2.5-flash-image"]
reserve = "0.25"

[defaults.limits]
generate = "1000/s"
generate_burst = 1000
query = "1000/s"
query_burst = 1000

[[teams]]
name = "design"
keys = [{{ sha256 = "{design}", label = "design-test" }}]

[[teams]]
name = "ads"
keys = [{{ sha256 = "{ads}", label = "ads-test" }}]
"#,
        ledger = ledger.display(),
        design = digest(DESIGN_KEY),
        ads = digest(ADS_KEY),
    )
}

/// A running gateway process.
pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    /// While set, nobody reads the process's stderr: its pipe fills, as when a log shipper
    /// stalls.
    log_reading_paused: Arc<std::sync::atomic::AtomicBool>,
    pub config_path: PathBuf,
}

impl Gateway {
    /// Starts `ketchup-gateway serve` on `config_path` and waits until it listens.
    pub fn start(config_path: PathBuf) -> Gateway {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ketchup-gateway"))
            .args(["--log-format", "json", "serve", "--config"])
            .arg(&config_path)
            .env("KETCHUP_UPSTREAM_TOKEN", UPSTREAM_TOKEN)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("gateway binary starts");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = logs.clone();
        let log_reading_paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let paused = log_reading_paused.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                while paused.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if let Ok(event) = serde_json::from_str::<Value>(&line)
                    && event["message"] == "ketchup-gateway listening"
                    && let Some(addr) = event["address"].as_str()
                {
                    let _ = addr_tx.send(addr.parse::<SocketAddr>().expect("address"));
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match addr_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "gateway did not start; its log:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        Gateway {
            child,
            addr,
            logs,
            log_reading_paused,
            config_path,
        }
    }

    /// Stops reading the process's stderr after the line being read (or the next one).
    pub fn pause_log_reading(&self) {
        self.log_reading_paused
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn resume_log_reading(&self) {
        self.log_reading_paused
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Everything the process has logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("reap");
    }

    /// SIGTERM, then waits for the process to exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        signal(&self.child, "TERM");
        self.child.wait().expect("reap").success()
    }

    pub fn hangup(&self) {
        signal(&self.child, "HUP");
    }

    /// Waits until a log line contains `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        for _ in 0..200 {
            if self.logs().contains(needle) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no log line with {needle:?}; log:\n{}", self.logs());
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("kill command");
    assert!(status.success());
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fake upstream, a gateway in front of it, and HTTP clients.
pub struct Env {
    pub fake: FakeHandle,
    pub gateway: Gateway,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

/// Waits (at most `within`) until `fake` has received a generation: the gateway holds its
/// reservation and is now waiting on the upstream.
pub async fn until_a_generation_reached(fake: &FakeHandle, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    while fake.stats().generate_requests == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the generation never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub fn fake_config() -> FakeConfig {
    let mut fake = FakeConfig::new(UPSTREAM_TOKEN);
    fake.pending_for = Duration::from_millis(100);
    fake.submitted_for = Duration::from_millis(100);
    fake.in_progress_for = Duration::from_millis(100);
    fake
}

impl Env {
    pub async fn start() -> Env {
        Env::start_with(fake_config(), "", "").await
    }

    /// `server_extra` and `upstream_extra` are lines added to the `[server]` and `[upstream]`
    /// tables; `server_extra` may also open tables of its own, such as [`CACHE_OFF`].
    pub async fn start_with(fake: FakeConfig, server_extra: &str, upstream_extra: &str) -> Env {
        let fake = ketchup_fake_upstream::start(fake)
            .await
            .expect("fake upstream starts");
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("gateway.toml");
        let text = config_text(
            &fake.base_url(),
            &dir.path().join("ledger.db"),
            server_extra,
            upstream_extra,
        );
        std::fs::write(&config_path, text).expect("config written");
        let gateway = Gateway::start(config_path);
        Env {
            fake,
            gateway,
            dir,
            http: reqwest::Client::new(),
        }
    }

    /// Stops the gateway with SIGKILL and starts it again on the same config and ledger.
    pub fn restart_after_kill(&mut self) {
        self.gateway.kill();
        self.gateway = Gateway::start(self.gateway.config_path.clone());
    }

    pub async fn generate(&self, key: &str, body: &str) -> (u16, Value) {
        let response = self
            .http
            .post(self.gateway.url("/api/image/gen"))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("gateway answers");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    }

    /// Starts a render and returns its task id.
    pub async fn start_task(&self, key: &str) -> String {
        let (status, body) = self
            .generate(key, r#"{"model":"google/gempix2","prompt":"a tomato"}"#)
            .await;
        assert_eq!(status, 200, "{body}");
        body["data"]["task_id"]
            .as_str()
            .expect("task id")
            .to_owned()
    }

    pub async fn query(&self, key: &str, task_id: &str) -> (u16, Value) {
        let response = self
            .http
            .get(self.gateway.url("/api/task/query"))
            .query(&[("task_id", task_id)])
            .bearer_auth(key)
            .send()
            .await
            .expect("gateway answers");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON body"))
    }
}

/// The value of one series (`name{labels}`) on the gateway's metrics page; 0 if absent.
#[allow(dead_code)] // not every test binary reads metrics
pub async fn metric(http: &reqwest::Client, gateway: &Gateway, series: &str) -> f64 {
    let page = http
        .get(gateway.url("/metrics"))
        .send()
        .await
        .expect("gateway answers")
        .text()
        .await
        .expect("metrics page");
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A port on which nothing listens.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A response, read in full.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.text))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header").to_owned())
    }

    /// The task id of an accepted generation.
    pub fn task_id(&self) -> String {
        assert_eq!(self.status, 200, "{}", self.text);
        self.json()["data"]["task_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no task id in {}", self.text))
            .to_owned()
    }
}
