//! A team's webhook receiver: a real HTTP server on loopback that records every delivery the
//! gateway makes to `/hook` and answers from a script, and the check that a delivery is signed
//! with the team's secret.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::HeaderMap,
    routing::post,
};

use crate::{DEADLINE, WEBHOOK_SECRET};

/// Records every request and answers from a script (then 200); or, made with
/// [`Receiver::failing_each_first_attempt`], answers 500 to the first attempt of every delivery
/// (by `webhook-id`) and 200 to the ones after.
#[derive(Clone, Default)]
pub struct Receiver {
    seen: Arc<Mutex<Vec<(HeaderMap, Bytes, u16)>>>,
    script: Arc<Mutex<VecDeque<u16>>>,
    fail_first_attempts: bool,
}

/// A [`Receiver`] listening on a port.
pub struct Listening {
    pub port: u16,
    server: tokio::task::JoinHandle<()>,
}

impl Listening {
    /// Stops accepting: the port refuses connections until a receiver listens on it again.
    pub fn stop(self) -> u16 {
        self.server.abort();
        self.port
    }
}

impl Receiver {
    /// Answers each request with the next status of `script`, then 200.
    pub fn answering(script: &[u16]) -> Receiver {
        let receiver = Receiver::default();
        receiver.script.lock().unwrap().extend(script);
        receiver
    }

    /// Answers 500 to the first attempt of every delivery, 200 to the ones after.
    pub fn failing_each_first_attempt() -> Receiver {
        Receiver {
            fail_first_attempts: true,
            ..Receiver::default()
        }
    }

    /// Serves `POST /hook` on `port` of 127.0.0.1 (a free one for 0).
    pub async fn listen(&self, port: u16) -> Listening {
        async fn record(
            State(receiver): State<Receiver>,
            headers: HeaderMap,
            body: Bytes,
        ) -> axum::http::StatusCode {
            // One lock for the decision and the record, so concurrent attempts of one delivery
            // cannot both count as its first.
            let mut seen = receiver.seen.lock().unwrap();
            let first_attempt = || {
                !seen
                    .iter()
                    .any(|(h, _, _)| h.get("webhook-id") == headers.get("webhook-id"))
            };
            let status = if receiver.fail_first_attempts && first_attempt() {
                500
            } else {
                receiver.script.lock().unwrap().pop_front().unwrap_or(200)
            };
            seen.push((headers, body, status));
            axum::http::StatusCode::from_u16(status).unwrap()
        }
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("receiver port free");
        let port = listener.local_addr().unwrap().port();
        // Payloads may carry base64 images: larger than axum's default limit on bodies.
        let app = Router::new()
            .route("/hook", post(record))
            .layer(DefaultBodyLimit::disable())
            .with_state(self.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Listening { port, server }
    }

    /// Every request so far, with the status it was answered.
    pub fn seen(&self) -> Vec<(HeaderMap, Bytes, u16)> {
        self.seen.lock().unwrap().clone()
    }

    /// The requests answered 200.
    pub fn delivered(&self) -> Vec<(HeaderMap, Bytes)> {
        self.seen()
            .into_iter()
            .filter(|(_, _, status)| *status == 200)
            .map(|(headers, body, _)| (headers, body))
            .collect()
    }

    /// Waits until `done` holds of what the receiver has seen.
    pub async fn wait_for(&self, what: &str, done: impl Fn(&Receiver) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Panics unless the delivery's signature verifies with [`WEBHOOK_SECRET`].
pub fn verify(headers: &HeaderMap, body: &[u8]) {
    standardwebhooks::Webhook::new(WEBHOOK_SECRET)
        .unwrap()
        .verify(body, headers)
        .expect("the delivery's signature verifies with the team's secret");
}
