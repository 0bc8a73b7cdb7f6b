//! The Redis shared by every test of a test process.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The test Redis: `REDIS_URL`, else a private `redis-server` started once for the whole
/// test process. `None`, with a loud warning, when there is neither, unless
/// `KETCHUP_REQUIRE_REDIS=1` makes that a failure. Tests put their keys under a fresh random
/// prefix, so tests sharing a server never see each other's keys.
pub fn url() -> Option<String> {
    match server() {
        Ok(server) => Some(server.url.clone()),
        Err(why) => {
            crate::skip(why);
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
            _ => start_private_server().map_err(|why| format!("REDIS_URL is not set and {why}")),
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
    crate::redis_server_installed()?;
    let port = crate::free_port()?;
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
