//! A gateway in front of the fake upstream, as most tests need them.

use std::path::{Path, PathBuf};

use ketchup_domain::clock::SharedClock;
use ketchup_domain::config::{Config, Secret};
use ketchup_fake_upstream::{FakeConfig, FakeHandle};
use ketchup_gateway::server::Server;

use crate::{Api, Gateway, GatewayConfig, UPSTREAM_TOKEN, fake_config, start_fake};

/// A fake upstream, and the real binary in front of it.
pub struct Env {
    pub fake: FakeHandle,
    pub gateway: Gateway,
}

impl Env {
    /// The base config ([`GatewayConfig::new`]) in front of [`fake_config`]'s fake.
    pub async fn start() -> Env {
        Env::start_with(fake_config(), GatewayConfig::new()).await
    }

    /// `config`, its upstream set to a fake configured by `fake`.
    pub async fn start_with(fake: FakeConfig, config: GatewayConfig) -> Env {
        let fake = start_fake(fake).await;
        let gateway = Gateway::start(&config.upstream_url(&fake.base_url()));
        Env { fake, gateway }
    }

    /// The client of the gateway (a new one after each restart).
    pub fn api(&self) -> &Api {
        &self.gateway.api
    }
}

/// The gateway run in the test process instead of as the binary, on `clock`, which the test
/// moves as it likes (the binary runs on the system's).
pub struct InProcess {
    pub api: Api,
    _dir: tempfile::TempDir,
}

impl InProcess {
    pub async fn start(config: &GatewayConfig, clock: SharedClock) -> InProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = config.render(dir.path());
        let config = Config::parse(Path::new("gateway.toml"), &text).expect("config parses");
        let tokens: Vec<Secret> = config
            .upstream
            .accounts
            .iter()
            .map(|_| Secret::new(UPSTREAM_TOKEN))
            .collect();
        let server = Server::bind(config, &tokens, clock)
            .await
            .expect("gateway binds");
        let addr = server.local_addr();
        tokio::spawn(server.run(None::<PathBuf>));
        InProcess {
            api: Api::new(format!("http://{addr}")),
            _dir: dir,
        }
    }
}
