//! Redis for the unit tests of every Redis-backed part (ledger, rate limits, status cache), and
//! a stand-in for one that stops answering.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Once, OnceLock};
use std::time::{Duration, Instant};

/// The test Redis: `REDIS_URL`, else a private `redis-server` started once for the whole
/// test process. `None`, with a loud warning, when there is neither, unless
/// `KETCHUP_REQUIRE_REDIS=1` makes that a failure. Tests put their keys under a fresh random
/// prefix, so tests sharing a server never see each other's keys.
pub fn url() -> Option<String> {
    match server() {
        Ok(server) => Some(server.url.clone()),
        Err(why) if std::env::var("KETCHUP_REQUIRE_REDIS").is_ok_and(|v| v == "1") => {
            panic!("KETCHUP_REQUIRE_REDIS=1 but there is no Redis for the tests: {why}")
        }
        Err(why) => {
            eprintln!("WARNING: SKIPPED a Redis test: {why}");
            // Once per run on the real stderr too: the test harness hides what a passing
            // test prints, and a skip must not pass unnoticed.
            static WARNED: Once = Once::new();
            WARNED.call_once(|| {
                let _ = writeln!(
                    std::io::stderr(),
                    "WARNING: the Redis tests are SKIPPED: {why}. Set REDIS_URL or \
                     install redis-server; KETCHUP_REQUIRE_REDIS=1 makes this a failure."
                );
            });
            None
        }
    }
}

struct Server {
    url: String,
    /// Holds the private server's watchdog, if one was started.
    _watchdog: Option<Child>,
}

/// `REDIS_URL`, else a private `redis-server` started once for the whole test process.
fn server() -> Result<&'static Server, &'static str> {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    SERVER
        .get_or_init(|| match std::env::var("REDIS_URL") {
            Ok(url) if !url.is_empty() => Ok(Server {
                url,
                _watchdog: None,
            }),
            _ => start_private_server(),
        })
        .as_ref()
        .map_err(String::as_str)
}

/// Runs the server under a shell that stops it once the test process (`$2`) is gone, so no
/// server outlives the tests.
const WATCHED_SERVER: &str = r#"
    redis-server --port "$1" --bind 127.0.0.1 --save "" --appendonly no &
    server=$!
    while kill -0 "$2" 2>/dev/null && kill -0 "$server" 2>/dev/null; do sleep 1; done
    kill "$server" 2>/dev/null
    wait "$server"
"#;

fn start_private_server() -> Result<Server, String> {
    match Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
    {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err("REDIS_URL is not set and redis-server is not installed".into());
        }
        Err(e) => return Err(format!("redis-server --version failed: {e}")),
        Ok(_) => {}
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_err(|e| format!("no free port for redis-server: {e}"))?
        .port();
    let watchdog = Command::new("sh")
        .arg("-c")
        .arg(WATCHED_SERVER)
        .arg("sh")
        .arg(port.to_string())
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start redis-server: {e}"))?;
    let server = Server {
        url: format!("redis://127.0.0.1:{port}/"),
        _watchdog: Some(watchdog),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if answers_ping(port) {
            return Ok(server);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "the private redis-server on port {port} never answered PING"
    ))
}

fn answers_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let mut reply = [0u8; 7];
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .is_ok()
        && stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// The command timeout of a client of a [`FadingRedis`], and the slack a call may take beyond it.
/// Long enough that a Redis client's reconnection (two connection attempts, each cut off at the
/// timeout) cannot fit under `TIMEOUT + SLACK`, so a test tells a call bounded by the timeout
/// from one the connection manager alone bounds.
pub const TIMEOUT: Duration = Duration::from_secs(1);
pub const SLACK: Duration = Duration::from_millis(900);

/// A stand-in for a Redis that stops answering: `+OK` to every command until told otherwise.
pub struct FadingRedis {
    pub address: SocketAddr,
    mode: Arc<AtomicU8>,
}

const ANSWERING: u8 = 0;
const STOPPED: u8 = 1;
const GONE: u8 = 2;

impl FadingRedis {
    pub async fn start() -> FadingRedis {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(ANSWERING));
        let shared = mode.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(serve(socket, shared.clone()));
            }
        });
        FadingRedis { address, mode }
    }

    /// As a Redis stopped with SIGSTOP: connections stay open, nothing is answered any more.
    pub fn stop(&self) {
        self.mode.store(STOPPED, Ordering::SeqCst);
    }

    /// As a Redis host lost behind a proxy: an open connection is closed at its next command,
    /// so the client reconnects, and a new one is accepted but never answered, so each of the
    /// client's connection attempts lasts its whole timeout.
    pub fn go_away(&self) {
        self.mode.store(GONE, Ordering::SeqCst);
    }
}

async fn serve(mut socket: tokio::net::TcpStream, mode: Arc<AtomicU8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let opened_answering = mode.load(Ordering::SeqCst) == ANSWERING;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(read) = socket.read(&mut chunk).await {
        if read == 0 {
            return;
        }
        buffer.extend_from_slice(&chunk[..read]);
        while let Some(length) = command_length(&buffer) {
            buffer.drain(..length);
            let answering = match mode.load(Ordering::SeqCst) {
                ANSWERING => true,
                GONE if opened_answering => return,
                _ => false,
            };
            if answering && socket.write_all(b"+OK\r\n").await.is_err() {
                return;
            }
        }
    }
}

/// Length of the first whole command (an array of bulk strings) in `buffer`.
fn command_length(buffer: &[u8]) -> Option<usize> {
    fn header(buffer: &[u8], kind: u8) -> Option<(usize, usize)> {
        if *buffer.first()? != kind {
            return None;
        }
        let end = buffer.windows(2).position(|w| w == b"\r\n")?;
        let number = std::str::from_utf8(&buffer[1..end]).ok()?.parse().ok()?;
        Some((number, end + 2))
    }
    let (count, mut length) = header(buffer, b'*')?;
    for _ in 0..count {
        let (size, header_length) = header(buffer.get(length..)?, b'$')?;
        length += header_length + size + 2;
    }
    (length <= buffer.len()).then_some(length)
}
