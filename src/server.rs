//! Starting, reloading and stopping the gateway.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    accounts::Accounts,
    balance,
    metrics::Metrics,
    middleware::auth::AdminTokens,
    rate_limiter::{RateLimits, shared::SharedLimits},
    reconciler, router,
    state::AppState,
    status_cache::{StatusCache, shared::SharedStatuses},
    upstream::UpstreamClient,
    webhooks,
    workers::{ConnectionCounts, ConnectionLimits, Workers},
};
use ketchup_domain::{
    clock::SharedClock,
    config::{
        AdminConfig, Config, DigestMap, KeyDigest, RateLimitsWhenUnavailable, SINGLE_TOKEN_LABEL,
        Secret, StoreConfig,
    },
    ledger::{Ledger, redis::RedisStore, sqlite::SqliteStore},
    notices::Notifier,
    ownership::OwnershipIndex,
    redis_client::RedisEndpoint,
    settlement::Settler,
};

/// A gateway bound to its address, ready to serve.
pub struct Server {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    state: Arc<AppState>,
    /// The admin tokens' digests and labels; none turns the admin API off.
    admin_tokens: AdminTokens,
}

impl Server {
    /// Opens the ledger, builds the upstream client (with `upstream_tokens`, one per account of
    /// `[upstream]`, in its order) and binds the listener. Every failure here is reported before
    /// anything is served.
    pub async fn bind(
        config: Config,
        upstream_tokens: &[Secret],
        clock: SharedClock,
    ) -> Result<Server, String> {
        let ledger = open_ledger(&config.store).await?;
        webhooks::signing::check_team_secrets(&config)?;
        let metrics = Arc::new(Metrics::new());
        metrics.start_at_zero(&config);
        let rate_limits = Arc::new(RateLimits::new(
            &config,
            metrics.clone(),
            shared_limits(&config.store).await?,
        ));
        let upstream = UpstreamClient::new(
            &config.upstream,
            config.server.workers,
            upstream_tokens,
            metrics.clone(),
            rate_limits.clone(),
        )?;
        let admin_tokens = admin_tokens(&config.admin)?;
        let listener = TcpListener::bind(&config.server.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
        let metrics_listener = match &config.server.metrics_listen {
            Some(address) => Some(
                TcpListener::bind(address)
                    .await
                    .map_err(|e| format!("cannot listen on {address} for metrics: {e}"))?,
            ),
            None => None,
        };
        let owners = Arc::new(OwnershipIndex::new(config.cache.max_owners));
        let account_names: Vec<&str> = config
            .upstream
            .accounts
            .iter()
            .map(|account| account.name.as_str())
            .collect();
        let accounts = Accounts::new(&account_names, &metrics);
        let task_accounts = moka::sync::Cache::builder()
            .max_capacity(config.cache.max_owners)
            .build_with_hasher(Default::default());
        let settler = Settler::new(
            ledger.clone(),
            ledger.clone(),
            owners.clone(),
            clock.clone(),
            metrics.settlement.clone(),
        );
        let state = Arc::new(AppState {
            rate_limits,
            status_cache: StatusCache::new(
                &config.cache,
                metrics.clone(),
                shared_statuses(&config).await?,
            ),
            metrics,
            owners,
            settler,
            recently_observed: moka::sync::Cache::builder()
                .max_capacity(config.cache.max_entries.max(10_000))
                .time_to_live(config.reconciler.settle_after / 2)
                .build_with_hasher(Default::default()),
            config: Arc::new(ArcSwap::from_pointee(config)),
            ledger,
            upstream,
            clock,
            background: TaskTracker::new(),
            webhook_wake: tokio::sync::Notify::new(),
            accounts,
            task_accounts,
            notifier: Notifier::default(),
        });
        Ok(Server {
            listener,
            metrics_listener,
            state,
            admin_tokens,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until SIGTERM or SIGINT, then stops accepting, lets in-flight requests and
    /// background ledger work finish (up to `server.shutdown_timeout`), and returns. With
    /// `reload_from`, SIGHUP re-reads that file and swaps in the new teams, keys, models and limits.
    pub async fn run(self, reload_from: Option<PathBuf>) -> Result<(), String> {
        use tokio::signal::unix::{SignalKind, signal};
        let Server {
            mut listener,
            metrics_listener,
            state,
            admin_tokens,
        } = self;
        // Handlers are installed before the gateway says it is listening: a signal that came
        // earlier would otherwise get the default action and kill the process.
        let listen_for = |kind| signal(kind).map_err(|e| format!("cannot handle signals: {e}"));
        let mut terminate = listen_for(SignalKind::terminate())?;
        let mut interrupt = listen_for(SignalKind::interrupt())?;
        let hangup = listen_for(SignalKind::hangup())?;
        if let Some(path) = reload_from {
            tokio::spawn(reload_on_sighup(state.clone(), path, hangup));
        }
        tokio::spawn(fill_ownership_index(state.clone()));
        let reconciler = tokio::spawn(reconciler::run(state.clone()));
        let webhooks = tokio::spawn(webhooks::delivery::run(state.clone()));
        let retention = tokio::spawn(webhooks::retention::run(state.clone()));
        let notices = tokio::spawn(webhooks::notices::run(state.clone()));
        let balance = tokio::spawn(balance::run(state.clone()));
        let (shutdown_timeout, worker_count, limits) = {
            let server = &state.config.load().server;
            let limits = ConnectionLimits {
                max_connections: server.max_connections.get(),
                header_read_timeout: server.header_read_timeout,
                keep_alive_timeout: server.keep_alive_timeout,
            };
            (server.shutdown_timeout, server.workers, limits)
        };
        let address = listener.local_addr().map_err(|e| e.to_string())?;
        let stop = CancellationToken::new();
        // Also when this future is dropped unfinished (a test's runtime ending): the workers
        // are threads of their own and would otherwise serve on.
        let stop_on_drop = StopOnDrop {
            stop: stop.clone(),
            background: state.background.clone(),
        };
        let accepted = &state.metrics.connections;
        let mut workers = Workers::start(
            "http-worker",
            router::router(state.clone(), admin_tokens),
            limits,
            stop.clone(),
            state.background.clone(),
            ConnectionCounts {
                accepted: (0..worker_count.get())
                    .map(|index| accepted.with_label_values(&[&index.to_string()]))
                    .collect(),
                open: state.metrics.open_connections.clone(),
                refused: state.metrics.refused_connections.clone(),
            },
        )
        .map_err(|e| format!("cannot start the HTTP workers: {e}"))?;
        // Scrapes and probes get a worker and connection places of their own, so that they are
        // answered while the API's port is full.
        let mut ops = match metrics_listener {
            Some(listener) => {
                let ops_limits = ConnectionLimits {
                    max_connections: OPS_MAX_CONNECTIONS,
                    ..limits
                };
                let ops_workers = Workers::start(
                    "ops-worker",
                    router::ops_router(state.clone()),
                    ops_limits,
                    stop.clone(),
                    state.background.clone(),
                    ConnectionCounts {
                        accepted: vec![accepted.with_label_values(&["ops"])],
                        open: state.metrics.ops_open_connections.clone(),
                        refused: state.metrics.ops_refused_connections.clone(),
                    },
                )
                .map_err(|e| format!("cannot start the operations worker: {e}"))?;
                if let Ok(address) = listener.local_addr() {
                    tracing::info!(%address, "metrics listening, and health checks");
                }
                Some((listener, ops_workers))
            }
            None => None,
        };
        tracing::info!(
            %address,
            upstream = %state.config.load().upstream.base_url,
            workers = worker_count,
            "ketchup-gateway listening"
        );
        loop {
            tokio::select! {
                (stream, remote) = axum::serve::Listener::accept(&mut listener) => {
                    workers.hand(stream, remote);
                }
                (stream, remote) = accept_ops(&mut ops) => {
                    if let Some((_, ops_workers)) = &mut ops {
                        ops_workers.hand(stream, remote);
                    }
                }
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
            }
        }
        tracing::info!("shutting down: finishing in-flight requests");
        // Closed now, so that new connections are refused rather than left waiting.
        drop(listener);
        let ops_workers = ops.map(|(_listener, ops_workers)| ops_workers);
        stop_on_drop.stop();
        let finished = async {
            workers.finished().await;
            if let Some(ops_workers) = ops_workers {
                ops_workers.finished().await;
            }
        };
        if tokio::time::timeout(shutdown_timeout, finished)
            .await
            .is_err()
        {
            tracing::warn!(
                ?shutdown_timeout,
                "shutdown timeout passed with requests still in flight"
            );
        }
        reconciler.abort();
        balance.abort();
        webhooks.abort();
        retention.abort();
        notices.abort();
        tracing::info!("stopped");
        Ok(())
    }
}

/// Most open connections on `server.metrics_listen`: a few scrapers and probes need no more,
/// and a cap keeps a flood there from taking the descriptors the API's port needs.
const OPS_MAX_CONNECTIONS: usize = 32;

/// The next connection to the operations listener; never, without one.
async fn accept_ops(
    ops: &mut Option<(TcpListener, Workers)>,
) -> (tokio::net::TcpStream, SocketAddr) {
    match ops {
        Some((listener, _)) => axum::serve::Listener::accept(listener).await,
        None => std::future::pending().await,
    }
}

/// Stops the workers and closes the background tracker: at shutdown, or when dropped.
struct StopOnDrop {
    stop: CancellationToken,
    background: TaskTracker,
}

impl StopOnDrop {
    fn stop(&self) {
        self.stop.cancel();
        self.background.close();
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The admin tokens by digest, each with its label: the one of `token_env` or `token_file` (read
/// now) labelled `admin`, and the labelled `tokens`.
fn admin_tokens(admin: &AdminConfig) -> Result<AdminTokens, String> {
    let mut tokens: DigestMap<Arc<str>> = admin
        .tokens
        .iter()
        .map(|token| (token.digest, Arc::from(token.label.as_str())))
        .collect();
    if let Some(source) = &admin.token {
        let token = source.resolve("admin token").map_err(|e| e.to_string())?;
        let digest = KeyDigest::of(token.expose());
        if let Some(label) = tokens.insert(digest, SINGLE_TOKEN_LABEL.into()) {
            return Err(format!(
                "[admin] the token of token_env or token_file is also in tokens, labelled \
                 {label:?}: give each admin one token, so the audit trail names one label"
            ));
        }
    }
    Ok(Arc::new(tokens))
}

/// The Redis to connect to: the URL with its password (from the environment or a file) put in,
/// a `Secret` so that it is never printed, and the store's TLS certificates.
fn redis_endpoint(store: &StoreConfig) -> Result<RedisEndpoint, String> {
    let StoreConfig::Redis {
        url, password, tls, ..
    } = store
    else {
        return Err("the store is not Redis".into());
    };
    let mut url = url.clone();
    if let Some(source) = password {
        let password = source
            .resolve("Redis password")
            .map_err(|e| e.to_string())?;
        url.set_password(Some(password.expose()))
            .map_err(|()| "[store] url cannot carry a password".to_owned())?;
    }
    Ok(RedisEndpoint {
        url: Secret::new(String::from(url)),
        tls: tls.clone(),
    })
}

/// The rate limits shared by the replicas on one Redis.
async fn shared_limits(store: &StoreConfig) -> Result<Option<SharedLimits>, String> {
    let StoreConfig::Redis {
        key_prefix,
        command_timeout,
        rate_limits_when_unavailable,
        ..
    } = store
    else {
        return Ok(None);
    };
    let endpoint = redis_endpoint(store)?;
    let shared = SharedLimits::connect(
        &endpoint,
        key_prefix,
        *command_timeout,
        *rate_limits_when_unavailable == RateLimitsWhenUnavailable::Allow,
    )
    .await?;
    Ok(Some(shared))
}

/// The cluster-wide layer of the status cache, when replicas share a Redis.
async fn shared_statuses(config: &Config) -> Result<Option<SharedStatuses>, String> {
    let StoreConfig::Redis {
        key_prefix,
        command_timeout,
        ..
    } = &config.store
    else {
        return Ok(None);
    };
    let endpoint = redis_endpoint(&config.store)?;
    let shared = SharedStatuses::connect(
        &endpoint,
        key_prefix,
        *command_timeout,
        config.cache.status_ttl,
    )
    .await?;
    Ok(Some(shared))
}

async fn open_ledger(store: &StoreConfig) -> Result<Arc<dyn Ledger>, String> {
    Ok(match store {
        StoreConfig::Sqlite { path } => {
            Arc::new(SqliteStore::open(path).map_err(|e| e.to_string())?)
        }
        StoreConfig::Redis {
            key_prefix,
            command_timeout,
            ..
        } => {
            let endpoint = redis_endpoint(store)?;
            let redis = RedisStore::connect(&endpoint, key_prefix, *command_timeout)
                .await
                .map_err(|e| e.to_string())?;
            // Over the network, an outage must cost clients fast errors, not a timeout each: the
            // store has its own circuit breaker.
            Arc::new(redis)
        }
    })
}

/// Until it is filled, reads of tasks it does not hold yet ask the ledger, as they would anyway.
async fn fill_ownership_index(state: Arc<AppState>) {
    let started = std::time::Instant::now();
    match state.owners.fill_from(&*state.ledger).await {
        Ok(read) => tracing::info!(
            tasks = read,
            held = state.owners.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "ownership index filled from the ledger"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            "could not fill the ownership index; owners not in it are read from the ledger"
        ),
    }
}

async fn reload_on_sighup(
    state: Arc<AppState>,
    path: PathBuf,
    mut hangup: tokio::signal::unix::Signal,
) {
    while hangup.recv().await.is_some() {
        match Config::load(&path)
            .map_err(|e| e.to_string())
            .and_then(|new| {
                webhooks::signing::check_team_secrets(&new)?;
                Ok(new)
            }) {
            Ok(new) => {
                let old = state.config.load();
                let restart_only = old.restart_only_changes(&new);
                if !restart_only.is_empty() {
                    tracing::warn!(
                        settings = %restart_only.join(", "),
                        "these settings change only on restart; reloading the rest"
                    );
                }
                let teams = new.teams.len();
                let models = new.models.len();
                state.rate_limits.reload(&new);
                state.metrics.start_at_zero(&new);
                state.metrics.forget_budgets(&old, &new);
                state.config.store(Arc::new(new));
                tracing::info!(teams, models, "configuration reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "configuration reload refused; keeping the running one")
            }
        }
    }
}
