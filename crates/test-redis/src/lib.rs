//! The Redis that tests run against, for the unit tests of every Redis-backed part (ledger, rate
//! limits, status cache) and for the gateway's integration tests:
//!
//! - [`url`]: one server shared by the whole test process (`REDIS_URL`, else a private
//!   `redis-server`), on which tests keep apart by key prefix;
//! - [`PrivateRedis`]: a `redis-server` of one test's own, for tests that stop, pause or restart
//!   it, or that need a password or TLS;
//! - [`FadingRedis`]: a stand-in that stops answering.
//!
//! Without `redis-server` (and, for [`url`], without `REDIS_URL`) a test that needs one is
//! skipped with a loud warning, unless `KETCHUP_REQUIRE_REDIS=1` (set by `.ci/run`) makes that a
//! failure.
//!
//! This crate depends on no crate of the workspace: the domain's unit tests use it, and a
//! dev-dependency back on the domain would give them two copies of its types.

mod fading;
mod private;
mod shared;

pub use fading::{FadingRedis, SLACK, TIMEOUT};
pub use private::{PrivateRedis, TlsFiles};
pub use shared::url;

use std::io::{ErrorKind, Write};
use std::process::{Command, Stdio};
use std::sync::Once;

/// Whether `redis-server` can be run; why not, if it cannot.
fn redis_server_installed() -> Result<(), String> {
    match Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Err("redis-server is not installed".into()),
        Err(e) => Err(format!("redis-server --version failed: {e}")),
    }
}

/// Skips the calling test, loudly, for `why`; a failure instead under `KETCHUP_REQUIRE_REDIS=1`.
fn skip(why: &str) {
    if std::env::var("KETCHUP_REQUIRE_REDIS").is_ok_and(|v| v == "1") {
        panic!("KETCHUP_REQUIRE_REDIS=1 but there is no Redis for the tests: {why}");
    }
    eprintln!("WARNING: SKIPPED a Redis test: {why}");
    // Once per run on the real stderr too: the test harness hides what a passing test prints,
    // and a skip must not pass unnoticed.
    static WARNED: Once = Once::new();
    WARNED.call_once(|| {
        let _ = writeln!(
            std::io::stderr(),
            "WARNING: Redis tests are SKIPPED: {why}. Set REDIS_URL or install redis-server; \
             KETCHUP_REQUIRE_REDIS=1 makes this a failure."
        );
    });
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .map_err(|e| format!("no free port for redis-server: {e}"))
}
