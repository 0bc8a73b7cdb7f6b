//! Redis for the tests that need one: `REDIS_URL` if set, else a private `redis-server` on a free
//! port. Where neither is possible the test is skipped, loudly, unless `KETCHUP_REQUIRE_REDIS=1`
//! (set by `.ci/run`), which turns the skip into a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::tls::TestPki;

/// A `redis-server` this test started and may stop and start again.
pub struct PrivateRedis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    /// What `requirepass` asks of clients, if anything.
    password: Option<String>,
    /// TLS only, with this server certificate, taking clients with a certificate of the same CA.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

impl PrivateRedis {
    /// Starts one with append-only persistence fsynced on every write (what production should
    /// run), keeping its files in `dir`; `None` (after a loud warning) when `redis-server` is
    /// not installed.
    pub fn start(dir: &Path) -> Option<PrivateRedis> {
        Self::start_with(dir, None, None)
    }

    /// Like [`PrivateRedis::start`], for a server that takes only clients with `password`.
    pub fn start_with_password(dir: &Path, password: &str) -> Option<PrivateRedis> {
        Self::start_with(dir, Some(password.to_owned()), None)
    }

    /// Like [`PrivateRedis::start`], speaking only TLS with `pki`'s server certificate, and
    /// taking only clients that present a certificate of `pki`'s CA (Redis's default).
    pub fn start_with_tls(dir: &Path, pki: &TestPki) -> Option<PrivateRedis> {
        let files = (
            pki.server_cert.clone(),
            pki.server_key.clone(),
            pki.ca.clone(),
        );
        Self::start_with(dir, None, Some(files))
    }

    fn start_with(
        dir: &Path,
        password: Option<String>,
        tls: Option<(PathBuf, PathBuf, PathBuf)>,
    ) -> Option<PrivateRedis> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            skip("redis-server is not installed");
            return None;
        }
        let mut redis = PrivateRedis {
            child: None,
            port: super::closed_port(),
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
            Some((cert, key, ca)) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca),
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

/// A Redis URL to use, with a private server kept alive by the returned guard when needed.
pub fn url(dir: &Path) -> Option<(String, Option<PrivateRedis>)> {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return Some((url, None));
    }
    let private = PrivateRedis::start(dir)?;
    Some((private.url(), Some(private)))
}

fn skip(why: &str) {
    if std::env::var("KETCHUP_REQUIRE_REDIS").as_deref() == Ok("1") {
        panic!("{why}, and KETCHUP_REQUIRE_REDIS=1: Redis tests must not be skipped here");
    }
    eprintln!("\n!!! SKIPPING a Redis test: {why} and REDIS_URL is not set !!!\n");
}
