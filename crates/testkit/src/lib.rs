//! The harness of the gateway's integration tests. They run the real `ketchup-gateway` binary,
//! as an admin would, on a free port with a config and ledger of their own, in front of the fake
//! upstream running in the test process, and talk to it over real sockets:
//!
//! - [`GatewayConfig`]: the config file a test needs, built from parts (teams, budgets, limits,
//!   cache, store, webhooks, admin API);
//! - [`Gateway`]: the binary serving a config (start, logs, signals, kill, restart), and
//!   [`GatewayProcess`] for a start that may not get as far as listening;
//! - [`Env`]: a fake upstream and a gateway in front of it; [`InProcess`]: the gateway run in
//!   the test process, on a clock the test moves;
//! - [`Api`] and [`Reply`]: a client speaking the gateway's API with team keys and the admin
//!   token;
//! - [`webhooks::Receiver`]: a team's webhook receiver; [`pki::TestPki`]: a private CA;
//!   [`prometheus::Scrape`]: a parsed metrics page.
//!
//! Redis comes from `ketchup-test-redis`, which the domain's unit tests share.

pub mod api;
pub mod config;
pub mod env;
pub mod gateway;
pub mod pki;
pub mod prometheus;
pub mod upstream;
pub mod webhooks;

pub use api::{Api, Reply};
pub use config::GatewayConfig;
pub use env::{Env, InProcess};
pub use gateway::{Gateway, GatewayProcess, Launch};
pub use upstream::{
    fake_config, rendering_at, start_fake, until_a_generation_reached, upstream_reads,
    wait_until_final,
};

use std::time::{Duration, Instant};

/// The upstream account's token: the fake upstream's, and the gateway's through
/// `KETCHUP_UPSTREAM_TOKEN`.
pub const UPSTREAM_TOKEN: &str = "dk-upstream-secret-0123456789abcdef";
/// The key of team `design`.
pub const DESIGN_KEY: &str = "kgw_design_test_key_0123456789";
/// The key of team `ads`.
pub const ADS_KEY: &str = "kgw_ads_test_key_9876543210";
/// The admin API's token, when the config has `[admin]`.
pub const ADMIN_TOKEN: &str = "kgw-admin-test-token-0123456789";
/// The secret teams sign their webhooks with, when the config says they do.
pub const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The body of a generation of one `google/gempix2` image.
pub const GEMPIX: &str = r#"{"model":"google/gempix2","prompt":"a tomato"}"#;
/// How long any eventual condition is waited for.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The digest of `key`, as a config's `keys` name it.
pub fn digest(key: &str) -> String {
    ketchup_domain::config::KeyDigest::of(key).to_hex()
}

/// A port on 127.0.0.1 on which nothing listens (it was free a moment ago).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").port()
}

/// Polls `condition` every 20 ms until it holds, panicking with `what` after [`DEADLINE`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
