//! The `ketchup-gateway` command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ketchup_domain::{clock, config::Config};
use ketchup_gateway::{
    check_config::{self, Verdict},
    demo, keygen,
    logging::{self, LogFormat},
    server::Server,
};

/// glibc's malloc takes an arena lock that the runtime's worker threads contend for on every
/// request; mimalloc's thread-local free lists do not (measured in `bench/run`). It is built
/// with its `no_thp` feature: without it each thread's pages sit in transparent huge pages of
/// their own (the workspace's Cargo.toml says what that cost).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "A gateway in front of the Ketchup image API for internal teams"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "KETCHUP_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, short, default_value = "config/gateway.toml")]
        config: PathBuf,
    },
    /// Validate a configuration file and exit; with --against, also print its reservations
    /// against the costs a running gateway settled (admin token in KETCHUP_ADMIN_TOKEN). Exits
    /// 1 if the file is invalid or the gateway cannot be read, 2 if a reservation is below the
    /// largest cost settled for it.
    CheckConfig {
        path: PathBuf,
        /// A running gateway's base URL, e.g. http://127.0.0.1:8080.
        #[arg(long, value_name = "URL")]
        against: Option<String>,
    },
    /// Print a new team key (once) and the line to paste into the team's `keys`.
    Keygen {
        #[arg(long)]
        team: String,
        /// A label for the key (defaults to the team name and today's date).
        #[arg(long)]
        label: Option<String>,
        /// Make the key stop working this long from now, e.g. "30d" or "12h" (written into the
        /// printed line as expires_at).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<std::time::Duration>,
        /// Print a new webhook signing secret for the team instead of a key.
        #[arg(long, conflicts_with_all = ["label", "expires"])]
        webhook_secret: bool,
    },
    /// Run the gateway with a demo team in front of the built-in fake upstream.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Run only the fake upstream (for benchmarks and experiments).
    FakeUpstream {
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: SocketAddr,
        /// The bearer token the fake accepts.
        #[arg(long, env = "KETCHUP_UPSTREAM_TOKEN")]
        token: String,
        /// How long each task stays in each non-final status, e.g. "1s" or "0s".
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        phase: std::time::Duration,
    },
    /// Exit 0 if the URL answers 200 (for container health checks; the image has no curl).
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<(), String> = match cli.command {
        Command::CheckConfig { path, against } => {
            match runtime(Some(1), "check-config")
                .block_on(check_config::run(&path, against.as_deref()))
            {
                Ok(Verdict::Fits) => Ok(()),
                Ok(Verdict::BelowSettled) => return ExitCode::from(2),
                Err(e) => Err(e),
            }
        }
        Command::Keygen {
            team,
            webhook_secret: true,
            ..
        } => {
            println!(
                "# New webhook signing secret for team '{team}'. Store it where the gateway reads \
                 webhook_secret_env or webhook_secret_file, and give it to the team to verify \
                 deliveries (Standard Webhooks)."
            );
            println!("{}", ketchup_gateway::webhooks::signing::new_secret());
            Ok(())
        }
        Command::Keygen {
            team,
            label,
            expires,
            ..
        } => new_team_key(&team, label, expires),
        Command::Serve { config } => {
            logging::init(cli.log_format);
            control_runtime().block_on(serve(config))
        }
        Command::Demo { listen } => {
            logging::init(cli.log_format);
            control_runtime().block_on(demo::run(listen))
        }
        Command::FakeUpstream {
            listen,
            token,
            phase,
        } => {
            logging::init(cli.log_format);
            let mut fake = ketchup_fake_upstream::FakeConfig::new(token);
            fake.pending_for = phase;
            fake.submitted_for = phase;
            fake.in_progress_for = phase;
            runtime(None, "fake-upstream")
                .block_on(ketchup_fake_upstream::run_standalone(listen, fake))
                .map_err(|e| e.to_string())
        }
        Command::Healthcheck { url } => runtime(Some(1), "healthcheck").block_on(healthcheck(&url)),
    };
    // What the HTTP workers handed to the log writer and it has not written yet.
    logging::flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ketchup-gateway: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a new key for `team` and the config line that admits it.
fn new_team_key(
    team: &str,
    label: Option<String>,
    expires: Option<std::time::Duration>,
) -> Result<(), String> {
    let now = chrono::Utc::now();
    let label = label.unwrap_or_else(|| format!("{team}-{}", now.format("%Y-%m-%d")));
    let expires_at = match expires {
        None => None,
        Some(valid_for) => Some(
            chrono::Duration::from_std(valid_for)
                .ok()
                .and_then(|valid_for| now.checked_add_signed(valid_for))
                .ok_or("--expires is too far in the future")?,
        ),
    };
    let key = keygen::new_key();
    println!(
        "# New key for team '{team}'. It is shown only now: hand it to the team's secret store."
    );
    println!("{key}");
    println!("# Add this to the `keys` list of team '{team}' in the config, then reload (SIGHUP):");
    println!("{}", keygen::config_line(&key, &label, expires_at));
    Ok(())
}

/// A runtime of `worker_threads` threads (one per core if `None`) named `name`.
fn runtime(worker_threads: Option<usize>, name: &str) -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = worker_threads {
        builder.worker_threads(threads);
    }
    builder
        .thread_name(name)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The gateway serves HTTP on worker threads of its own (`workers`); this runtime has
/// signals, the acceptor and the background jobs, which one thread keeps up with.
fn control_runtime() -> tokio::runtime::Runtime {
    runtime(Some(1), "control")
}

async fn serve(path: PathBuf) -> Result<(), String> {
    let config = Config::load(&path).map_err(|e| e.to_string())?;
    let tokens = config
        .upstream
        .resolve_tokens()
        .map_err(|e| e.to_string())?;
    let server = Server::bind(config, &tokens, clock::system()).await?;
    server.run(Some(path)).await
}

async fn healthcheck(url: &str) -> Result<(), String> {
    use http_body_util::Empty;
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    let response = tokio::time::timeout(std::time::Duration::from_secs(5), client.get(uri))
        .await
        .map_err(|_| format!("{url} did not answer within 5 s"))?
        .map_err(|e| format!("{url}: {e}"))?;
    if response.status() == http::StatusCode::OK {
        Ok(())
    } else {
        Err(format!("{url} answered {}", response.status()))
    }
}
