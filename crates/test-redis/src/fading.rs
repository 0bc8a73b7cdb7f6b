//! A stand-in for a Redis that stops answering, for the tests of what a Redis client does then.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

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
