//! Connection hygiene: clients that send too little, stay idle, or come too many at once, end to
//! end through the real binary.

use std::time::Duration;

use ketchup_testkit::{DESIGN_KEY, Env, GatewayConfig, fake_config, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The gateway with `lines` added to its `[server]`.
async fn gateway(lines: &str) -> Env {
    Env::start_with(fake_config(), GatewayConfig::new().server(lines)).await
}

/// Everything the gateway sends on `stream` until it closes it, or `None` if it is still open
/// after `within`.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut received = Vec::new();
    let reading = async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    };
    tokio::time::timeout(within, reading).await.ok()?;
    Some(String::from_utf8_lossy(&received).into_owned())
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_sends_no_request_head_in_time_is_closed() {
    let env = gateway(r#"header_read_timeout = "1s""#).await;
    let mut silent = TcpStream::connect(env.gateway.addr).await.unwrap();
    let mut half = TcpStream::connect(env.gateway.addr).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-padding: ")
        .await
        .unwrap();
    let (silent, half) = tokio::join!(
        read_until_closed(&mut silent, Duration::from_secs(3)),
        read_until_closed(&mut half, Duration::from_secs(3)),
    );
    assert!(
        silent.is_some() && half.is_some(),
        "still open: silent {}, half a head {}",
        silent.is_none(),
        half.is_none()
    );
    let half = half.unwrap();
    // Hyper may answer 408 before closing; it must not have served the request.
    assert!(!half.contains(" 200 "), "{half}");
    // Others are served as before.
    assert_eq!(env.api().get("/healthz", None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_head_over_64_kib_is_refused_so_slow_clients_hold_little() {
    let env = gateway("").await;
    let head = |padding: usize| {
        format!(
            "GET /healthz HTTP/1.1\r\nhost: x\r\nx-padding: {}\r\n\r\n",
            "a".repeat(padding)
        )
    };
    let mut fits = TcpStream::connect(env.gateway.addr).await.unwrap();
    fits.write_all(head(60_000).as_bytes()).await.unwrap();
    let mut buffer = [0u8; 64];
    let n = fits.read(&mut buffer).await.unwrap();
    assert!(buffer[..n].starts_with(b"HTTP/1.1 200"));

    let mut over = TcpStream::connect(env.gateway.addr).await.unwrap();
    let _ = over.write_all(head(70_000).as_bytes()).await;
    let answer = read_until_closed(&mut over, Duration::from_secs(3))
        .await
        .expect("an oversized head's connection is still open");
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_connection_is_closed_after_the_keep_alive_timeout() {
    let env = gateway(r#"keep_alive_timeout = "1s""#).await;
    let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
    stream.write_all(HEALTHZ).await.unwrap();
    let answer = read_until_closed(&mut stream, Duration::from_secs(3))
        .await
        .expect("an idle connection is still open");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_in_use_outlives_the_keep_alive_timeout_and_closes_once_idle() {
    let env = gateway(r#"keep_alive_timeout = "1s""#).await;
    let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
    // Five requests half a timeout apart: open for over twice the timeout, never idle for one.
    for _ in 0..5 {
        stream.write_all(HEALTHZ).await.unwrap();
        let mut buffer = [0u8; 512];
        let n = stream.read(&mut buffer).await.unwrap();
        assert!(
            buffer[..n].starts_with(b"HTTP/1.1 200"),
            "closed while in use"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rest = read_until_closed(&mut stream, Duration::from_secs(3))
        .await
        .expect("still open long after its last request");
    assert!(rest.is_empty(), "{rest}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_in_flight_is_not_cut_by_the_keep_alive_timeout() {
    let env = gateway(r#"keep_alive_timeout = "1s""#).await;
    let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
    let body = r#"{"model":"google/gempix2","prompt":"a tomato"}"#;
    let head = format!(
        "POST /api/image/gen HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {DESIGN_KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The body trickles in over twice the timeout.
    for byte in body.as_bytes().chunks(body.len() / 5 + 1) {
        tokio::time::sleep(Duration::from_millis(400)).await;
        stream.write_all(byte).await.unwrap();
    }
    let answer = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("closed once idle after the answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""code":0"#), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_over_max_connections_is_refused_until_one_closes() {
    let env = gateway("max_connections = 3").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
        stream.write_all(HEALTHZ).await.unwrap();
        let mut buffer = [0u8; 64];
        let n = stream.read(&mut buffer).await.unwrap();
        assert!(buffer[..n].starts_with(b"HTTP/1.1 200"));
        held.push(stream);
    }
    let mut fourth = TcpStream::connect(env.gateway.addr).await.unwrap();
    // Refused unread: the write may already fail, and nothing comes back.
    let _ = fourth.write_all(HEALTHZ).await;
    let answer = read_until_closed(&mut fourth, Duration::from_secs(3))
        .await
        .expect("a fourth connection is held open");
    assert_eq!(answer, "", "a fourth connection was answered");

    drop(held.pop());
    // The gateway sees the close at its next read of that connection.
    let mut served = false;
    for _ in 0..50 {
        let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
        let _ = stream.write_all(HEALTHZ).await;
        let mut buffer = [0u8; 64];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buffer)).await
            && buffer[..n].starts_with(b"HTTP/1.1 200")
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "no connection was served after one of three closed");

    drop(held);
    // The scrape's own connection is refused until the gateway has seen the closes.
    let mut answered = false;
    for _ in 0..100 {
        let scrape = env.api().http.get(env.gateway.url("/metrics"));
        if env.api().try_send(scrape).await.is_ok() {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        answered,
        "the metrics were never answered once the connections closed"
    );
    assert!(
        env.api()
            .metric("ketchup_gateway_connections_refused_total")
            .await
            >= 1.0
    );
    let open = env.api().metric("ketchup_gateway_connections_open").await;
    assert!((1.0..=3.0).contains(&open), "{open}");
}

/// Connections to `addr`, each with `HEALTHZ` answered, opened until one is closed unread:
/// the ones that fill the listener's places (besides any the harness's clients hold).
async fn fill(addr: std::net::SocketAddr) -> Vec<TcpStream> {
    let mut held = Vec::new();
    loop {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let _ = stream.write_all(HEALTHZ).await;
        let answer = read_until_answered(&mut stream).await;
        if answer.is_empty() {
            return held;
        }
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        held.push(stream);
        assert!(held.len() <= 64, "{addr} takes connections without end");
    }
}

/// The first bytes the gateway sends on `stream`; empty if it closes it unanswered.
async fn read_until_answered(stream: &mut TcpStream) -> String {
    let mut buffer = vec![0u8; 1 << 16];
    let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buffer));
    let n = read
        .await
        .expect("neither answered nor closed")
        .unwrap_or(0);
    String::from_utf8_lossy(&buffer[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn probes_and_scrapes_are_answered_on_the_ops_port_while_the_api_port_is_full() {
    let ops_port = free_port();
    let env = gateway(&format!(
        "max_connections = 3\nmetrics_listen = \"127.0.0.1:{ops_port}\""
    ))
    .await;
    env.gateway.wait_for_log("metrics listening").await;
    let full = fill(env.gateway.addr).await;
    assert!(
        full.len() <= 3,
        "{} connections over a cap of 3",
        full.len()
    );

    let ops = format!("http://127.0.0.1:{ops_port}");
    for path in ["/healthz", "/readyz", "/metrics"] {
        let reply = env
            .api()
            .send(env.api().http.get(format!("{ops}{path}")))
            .await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text);
    }
    let refused = env
        .api()
        .send(env.api().http.get(format!("{ops}/metrics")))
        .await;
    assert!(
        refused
            .text
            .contains("ketchup_gateway_connections_refused_total 1"),
        "{}",
        refused.text
    );

    // The ops port has places of its own, and a cap too: a flood there is refused, while the
    // connections it has are served.
    let mut flood = fill(format!("127.0.0.1:{ops_port}").parse().unwrap()).await;
    assert!(
        flood.len() <= 32,
        "{} connections over a cap of 32",
        flood.len()
    );
    let mut kept = flood.pop().unwrap();
    kept.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_answered(&mut kept).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
