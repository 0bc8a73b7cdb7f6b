//! A `redis-server` of one test's own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` a test started and may stop, pause and start again, with append-only
/// persistence fsynced on every write (what production should run) in a directory of the test's.
pub struct PrivateRedis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    /// What `requirepass` asks of clients, if anything.
    password: Option<String>,
    tls: Option<TlsFiles>,
}

/// PEM files for a Redis that speaks only TLS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The server's certificate and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA whose certificates clients must present (Redis's default `tls-auth-clients yes`).
    pub ca: PathBuf,
}

impl PrivateRedis {
    /// Starts one keeping its files in `dir`; `None` (after a loud warning, or a failure under
    /// `KETCHUP_REQUIRE_REDIS=1`) when `redis-server` cannot be run.
    pub fn start(dir: &Path) -> Option<PrivateRedis> {
        Self::start_with(dir, None, None)
    }

    /// Like [`PrivateRedis::start`], for a server that takes only clients with `password`.
    pub fn start_with_password(dir: &Path, password: &str) -> Option<PrivateRedis> {
        Self::start_with(dir, Some(password.to_owned()), None)
    }

    /// Like [`PrivateRedis::start`], speaking only TLS with `tls`'s server certificate, and
    /// taking only clients that present a certificate of `tls`'s CA.
    pub fn start_with_tls(dir: &Path, tls: TlsFiles) -> Option<PrivateRedis> {
        Self::start_with(dir, None, Some(tls))
    }

    fn start_with(
        dir: &Path,
        password: Option<String>,
        tls: Option<TlsFiles>,
    ) -> Option<PrivateRedis> {
        let port = match crate::redis_server_installed().and_then(|()| crate::free_port()) {
            Ok(port) => port,
            Err(why) => {
                crate::skip(&why);
                return None;
            }
        };
        let mut redis = PrivateRedis {
            child: None,
            port,
            dir: dir.to_owned(),
            password,
            tls,
        };
        redis.restart();
        Some(redis)
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// (Re)starts the server on the same port and files.
    pub fn restart(&mut self) {
        let mut command = Command::new("redis-server");
        command.args(["--bind", "127.0.0.1"]);
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some(tls) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(&tls.cert)
                .arg("--tls-key-file")
                .arg(&tls.key)
                .arg("--tls-ca-cert-file")
                .arg(&tls.ca),
        };
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        let child = command
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGSTOP: the server keeps its connections and takes new ones (the kernel does), but
    /// answers nothing, as a hung Redis does; [`PrivateRedis::resume`] lets it go on.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`PrivateRedis::pause`]: it answers what it was sent meanwhile, in order.
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("a running redis-server");
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &child.id().to_string()])
            .status()
            .expect("kill command");
        assert!(sent.success(), "SIG{name} to redis-server");
    }

    /// SIGKILL: what the append-only file holds is all that survives.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
