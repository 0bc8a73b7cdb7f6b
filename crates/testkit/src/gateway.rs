//! The real `ketchup-gateway` binary, run as an admin runs it.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Api, DEADLINE, GatewayConfig, UPSTREAM_TOKEN};

/// The path of the `ketchup-gateway` binary Cargo built for the tests: Cargo names it in
/// `CARGO_BIN_EXE_ketchup-gateway` while it runs an integration test, and puts it beside the
/// `deps` folder that holds the test binaries when the test binary is run by hand.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CARGO_BIN_EXE_ketchup-gateway") {
        return path.into();
    }
    let beside_deps = std::env::current_exe()
        .ok()
        .and_then(|test| Some(test.parent()?.parent()?.join("ketchup-gateway")))
        .filter(|path| path.is_file());
    beside_deps.expect(
        "no ketchup-gateway binary: run the tests with cargo, which builds it and names it in \
         CARGO_BIN_EXE_ketchup-gateway",
    )
}

/// How [`GatewayProcess::spawn`] starts `ketchup-gateway serve`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Launch<'a> {
    /// Leaves `KETCHUP_UPSTREAM_TOKEN` unset, for a config that reads the token from a file or
    /// a start that must fail without it.
    pub without_upstream_token: bool,
    /// A signal (`"TERM"`, `"HUP"`) sent the moment the process logs that it listens, by a
    /// shell started beforehand and waiting for the line: a `kill` command started only then
    /// takes milliseconds, which would mostly hide a race right after startup.
    pub signal_when_listening: Option<&'a str>,
}

/// A `ketchup-gateway serve` process that may or may not get as far as listening, with its
/// JSON log lines (its stderr) collected. Killed when dropped.
pub struct GatewayProcess {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    /// While set, nobody reads the process's stderr: its pipe fills, as when a log shipper
    /// stalls.
    log_reading_paused: Arc<AtomicBool>,
    listening: mpsc::Receiver<SocketAddr>,
    reader: Option<JoinHandle<()>>,
}

impl GatewayProcess {
    /// Starts `ketchup-gateway --log-format json serve --config config` with `RUST_LOG=info`
    /// and, unless `launch` says otherwise, the upstream token in `KETCHUP_UPSTREAM_TOKEN`. With
    /// [`Launch::signal_when_listening`], returns once the signal was sent.
    pub fn spawn(config: &Path, launch: Launch<'_>) -> GatewayProcess {
        let mut command = Command::new(binary());
        command
            .args(["--log-format", "json", "serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if launch.without_upstream_token {
            command.env_remove("KETCHUP_UPSTREAM_TOKEN");
        } else {
            command.env("KETCHUP_UPSTREAM_TOKEN", UPSTREAM_TOKEN);
        }
        let mut child = command.spawn().expect("gateway binary starts");
        let mut trigger = launch.signal_when_listening.map(|signal| {
            Command::new("sh")
                .args(["-c", &format!("read _ && kill -{signal} {}", child.id())])
                .stdin(Stdio::piped())
                .spawn()
                .expect("sh starts")
        });
        let mut trigger_input = trigger.as_mut().and_then(|sh| sh.stdin.take());

        let logs = Arc::new(Mutex::new(Vec::new()));
        let log_reading_paused = Arc::new(AtomicBool::new(false));
        let (address_tx, listening) = mpsc::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        let (sink, paused) = (logs.clone(), log_reading_paused.clone());
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                while paused.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if let Ok(event) = serde_json::from_str::<Value>(&line)
                    && event["message"] == "ketchup-gateway listening"
                {
                    if let Some(mut input) = trigger_input.take() {
                        let _ = input.write_all(b"go\n");
                    }
                    if let Some(address) = event["address"].as_str() {
                        let _ = address_tx.send(address.parse().expect("socket address"));
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let process = GatewayProcess {
            child,
            logs,
            log_reading_paused,
            listening,
            reader: Some(reader),
        };
        if let Some(mut trigger) = trigger {
            let sent = trigger.wait().expect("sh runs");
            assert!(
                sent.success(),
                "the signal was not sent; log:\n{}",
                process.logs()
            );
        }
        process
    }

    /// Everything the process has logged so far, one line each.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits until the process says it listens; its address.
    pub fn wait_listening(&mut self) -> SocketAddr {
        self.try_wait_listening()
            .unwrap_or_else(|log| panic!("gateway did not start; its log:\n{log}"))
    }

    /// Waits until the process says it listens, or exits, or [`DEADLINE`] passes: its address,
    /// or else its log (the process killed).
    pub fn try_wait_listening(&mut self) -> Result<SocketAddr, String> {
        self.listening.recv_timeout(DEADLINE).map_err(|_| {
            let _ = self.child.kill();
            self.logs()
        })
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for the process to exit by itself, and for its last log line to be read.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = self.exited() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway did not exit; log:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(reader) = self.reader.take() {
            reader.join().expect("log reader");
        }
        status
    }

    fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill command");
        assert!(sent.success(), "SIG{name} to the gateway");
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway serving a [`GatewayConfig`] from a directory of its own (the config file, its
/// ledger, its secret files), started as [`GatewayProcess::spawn`] does and listening. Its
/// [`Api`] is a client for it.
pub struct Gateway {
    process: GatewayProcess,
    pub addr: SocketAddr,
    pub api: Api,
    config: GatewayConfig,
    config_path: PathBuf,
    dir: tempfile::TempDir,
}

impl Gateway {
    /// Writes `config` into a new directory and starts the gateway on it.
    pub fn start(config: &GatewayConfig) -> Gateway {
        Self::try_start(config)
            .unwrap_or_else(|log| panic!("gateway did not start; its log:\n{log}"))
    }

    /// Like [`Gateway::start`], but a start that ends before it listens (its store not
    /// answering yet, say) is an `Err` with its log, as a supervisor would see it.
    pub fn try_start(config: &GatewayConfig) -> Result<Gateway, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = config.write(dir.path());
        let (process, addr) = Self::try_serve(&config_path)?;
        Ok(Gateway {
            process,
            addr,
            api: Api::new(format!("http://{addr}")),
            config: config.clone(),
            config_path,
            dir,
        })
    }

    fn try_serve(config_path: &Path) -> Result<(GatewayProcess, SocketAddr), String> {
        let mut process = GatewayProcess::spawn(config_path, Launch::default());
        let addr = process.try_wait_listening()?;
        Ok((process, addr))
    }

    /// The process id of the running binary (a new one after each restart), to read what
    /// `/proc` says of it.
    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// `http://{addr}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The config the file holds now.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Rewrites the config file with `config`, for the next reload or restart.
    pub fn set_config(&mut self, config: GatewayConfig) {
        config.write(self.dir.path());
        self.config = config;
    }

    /// Rewrites the config file with `config` and has the gateway reload it (SIGHUP); returns
    /// once it logged that it did.
    pub async fn reload(&mut self, config: GatewayConfig) {
        let reloads = self.logs().matches("configuration reloaded").count();
        self.set_config(config);
        self.hangup();
        self.wait_for_log_count("configuration reloaded", reloads + 1)
            .await;
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill(&mut self) {
        self.process.child.kill().expect("kill");
        self.process.child.wait().expect("reap");
    }

    /// SIGTERM, then waits for the process to exit; whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        self.process.signal("TERM");
        self.process.wait_exit().success()
    }

    /// SIGHUP: reload the config file.
    pub fn hangup(&self) {
        self.process.signal("HUP");
    }

    /// Starts the binary again on the same config and ledger, once the process has ended
    /// ([`Gateway::kill`], [`Gateway::terminate`]); it listens on a new port.
    pub fn restart(&mut self) {
        self.try_restart()
            .unwrap_or_else(|log| panic!("gateway did not start; its log:\n{log}"));
    }

    /// Like [`Gateway::restart`], but a start that ends before it listens (its store not
    /// answering yet, say) is an `Err` with its log, as a supervisor would see it, instead of a
    /// panic.
    pub fn try_restart(&mut self) -> Result<(), String> {
        let (process, addr) = Self::try_serve(&self.config_path)?;
        self.process = process;
        self.addr = addr;
        self.api = Api::new(format!("http://{addr}"));
        Ok(())
    }

    /// [`Gateway::kill`], then [`Gateway::restart`].
    pub fn restart_after_kill(&mut self) {
        self.kill();
        self.restart();
    }

    /// Everything the process has logged so far, one JSON line each.
    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// The JSON log events whose line contains `needle`.
    pub fn log_events(&self, needle: &str) -> Vec<Value> {
        self.logs()
            .lines()
            .filter(|line| line.contains(needle))
            .map(|line| serde_json::from_str(line).expect("JSON log line"))
            .collect()
    }

    /// Waits until a log line contains `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        self.wait_for_log_count(needle, 1).await;
    }

    /// Waits until the gateway has logged `needle` at least `count` times.
    pub async fn wait_for_log_count(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + DEADLINE;
        while self.logs().matches(needle).count() < count {
            assert!(
                Instant::now() < deadline,
                "fewer than {count} log lines with {needle:?}; log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops reading the process's stderr after the line being read (or the next one).
    pub fn pause_log_reading(&self) {
        self.process
            .log_reading_paused
            .store(true, Ordering::Relaxed);
    }

    pub fn resume_log_reading(&self) {
        self.process
            .log_reading_paused
            .store(false, Ordering::Relaxed);
    }
}
