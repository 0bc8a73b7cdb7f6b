//! The client for the real upstream (or the fake one).
//!
//! hyper with rustls: HTTPS to api.defapi.org, plain HTTP to the fake; pooled keep-alive
//! connections; a connect timeout and an overall timeout per exchange. Status reads are retried
//! on connect errors and 5xx with exponential backoff and jitter. A generation is retried only
//! when the connection could not be made, because once its bytes may have reached the upstream a
//! retry could start (and charge) a second render. Text answers are handed over at their head,
//! their bodies read as they stream.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Incoming};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::accounts::AccountId;
use crate::metrics::{
    Metrics,
    upstream_route::{BALANCE, GENERATE, QUERY, TEXT},
};
use crate::rate_limiter::RateLimits;
use crate::{headers, workers};
use ketchup_domain::config::{FIRST_RETRY_DELAY, MAX_RETRY_DELAY, Secret, UpstreamConfig};

/// Largest upstream answer read; results may carry base64 images.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
    /// Time spent waiting on the upstream, retries included.
    pub elapsed: Duration,
}

/// An upstream answer whose body is still arriving (a text answer, perhaps streamed): read it
/// chunk by chunk, each within [`UpstreamClient::idle_timeout`].
#[derive(Debug)]
pub struct StreamingResponse {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Incoming,
    /// Time until the answer's head came, retries included.
    pub elapsed: Duration,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made: the request was certainly not received.
    #[error("cannot connect to the upstream: {0}")]
    Connect(String),
    /// No complete answer in time: the upstream may have received the request.
    #[error("no answer from the upstream within {0:?}")]
    Timeout(Duration),
    /// The connection broke after the request was sent: the upstream may have received it.
    #[error("the upstream connection failed: {0}")]
    Broken(String),
}

pub struct UpstreamClient {
    /// One pool for each HTTP worker, then one for the control runtime (the reconciler): a
    /// connection is driven by the runtime that opened it, so sharing one pool would have a
    /// worker's request wait on another thread's event loop.
    pools: Box<[Client<HttpsConnector<HttpConnector>, Full<Bytes>>]>,
    metrics: Arc<Metrics>,
    /// The upstream account's limit. Callers check it for a request's first attempt (and refuse
    /// the client when it is exhausted); retries wait for it here.
    limits: Arc<RateLimits>,
    base_url: String,
    /// `Bearer <token>` of each account, in the config's order ([`AccountId`]).
    authorizations: Box<[HeaderValue]>,
    timeout: Duration,
    retries: usize,
}

impl UpstreamClient {
    /// A client sending `tokens`, one per account of `config`, in its order.
    pub fn new(
        config: &UpstreamConfig,
        workers: NonZeroUsize,
        tokens: &[Secret],
        metrics: Arc<Metrics>,
        limits: Arc<RateLimits>,
    ) -> Result<Self, String> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let pools = (0..=workers.get())
            .map(|_| {
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(90))
                    .pool_max_idle_per_host(256)
                    .build(https.clone())
            })
            .collect();
        if tokens.len() != config.accounts.len() {
            return Err("one upstream token is needed for each account".to_owned());
        }
        let authorizations = tokens
            .iter()
            .zip(&config.accounts)
            .map(|(token, account)| {
                let mut authorization = HeaderValue::try_from(format!("Bearer {}", token.expose()))
                    .map_err(|_| {
                        format!(
                            "the token of upstream account {} contains characters not allowed \
                             in a header",
                            account.name
                        )
                    })?;
                // Marks the value so hyper's HPACK never indexes it and debug output hides it.
                authorization.set_sensitive(true);
                Ok(authorization)
            })
            .collect::<Result<_, String>>()?;
        Ok(UpstreamClient {
            pools,
            metrics,
            limits,
            base_url: config.base_url.as_str().trim_end_matches('/').to_owned(),
            authorizations,
            timeout: config.timeout,
            retries: config.query_retries,
        })
    }

    fn pool(&self) -> &Client<HttpsConnector<HttpConnector>, Full<Bytes>> {
        let control = self.pools.len() - 1;
        &self.pools[workers::current().map_or(control, |worker| worker.min(control))]
    }

    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(FIRST_RETRY_DELAY)
            .with_max_delay(MAX_RETRY_DELAY)
            .with_max_times(self.retries)
            .with_jitter()
    }

    /// A generation (`POST` to the route's path, the same as upstream) with the client's body,
    /// sent with `account`'s token.
    pub async fn generate(
        &self,
        account: AccountId,
        path: &str,
        body: Bytes,
        request_id: &str,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let started = Instant::now();
        let url = format!("{}{path}", self.base_url);
        let attempts = AtomicU32::new(0);
        let attempt = || async {
            self.pace_retry(&attempts).await;
            let request = self.request(account, Method::POST, &url, body.clone(), request_id)?;
            self.send(GENERATE, request).await
        };
        let mut response = attempt
            .retry(self.backoff())
            .when(|e| matches!(e, UpstreamError::Connect(_)))
            .notify(|_, _| self.count_retry(GENERATE))
            .await?;
        response.elapsed = started.elapsed();
        Ok(response)
    }

    /// A text request (`POST` to the same path and query as the client's), answered as soon as
    /// the upstream's head arrives, its body left to stream. Like a generation, retried only
    /// when the connection could not be made: a text answer is charged once it starts.
    pub async fn open_text(
        &self,
        account: AccountId,
        path_and_query: &str,
        body: Bytes,
        request_id: &str,
    ) -> Result<StreamingResponse, UpstreamError> {
        let started = Instant::now();
        let url = format!("{}{path_and_query}", self.base_url);
        let attempts = AtomicU32::new(0);
        let attempt = || async {
            self.pace_retry(&attempts).await;
            let attempt_started = Instant::now();
            let result = self.open(account, &url, body.clone(), request_id).await;
            self.count_attempt(
                TEXT,
                attempt_started,
                result.as_ref().map(|response| response.status),
            );
            result
        };
        let mut response = attempt
            .retry(self.backoff())
            .when(|e| matches!(e, UpstreamError::Connect(_)))
            .notify(|_, _| self.count_retry(TEXT))
            .await?;
        response.elapsed = started.elapsed();
        Ok(response)
    }

    /// How long a streamed answer may go without a chunk: `upstream.timeout`, which bounds each
    /// wait on the upstream, not the whole of a long answer.
    pub fn idle_timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends a text request and waits for the answer's head only.
    async fn open(
        &self,
        account: AccountId,
        url: &str,
        body: Bytes,
        request_id: &str,
    ) -> Result<StreamingResponse, UpstreamError> {
        let mut request = self.request(account, Method::POST, url, body, request_id)?;
        request
            .headers_mut()
            .insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        let exchange = async {
            let response = self.pool().request(request).await.map_err(|e| {
                if e.is_connect() {
                    UpstreamError::Connect(error_chain(&e))
                } else {
                    UpstreamError::Broken(error_chain(&e))
                }
            })?;
            let (parts, body) = response.into_parts();
            Ok(StreamingResponse {
                status: parts.status,
                content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
                body,
                elapsed: Duration::ZERO,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout(self.timeout))?
    }

    /// `GET /api/task/query?task_id=…` with `account`'s token: the one that started the task.
    pub async fn query_task(
        &self,
        account: AccountId,
        task_id: &str,
        request_id: &str,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let started = Instant::now();
        let mut url = format!("{}/api/task/query?task_id=", self.base_url);
        url.extend(url::form_urlencoded::byte_serialize(task_id.as_bytes()));
        let attempts = AtomicU32::new(0);
        let attempt = || async {
            self.pace_retry(&attempts).await;
            let request = self.request(account, Method::GET, &url, Bytes::new(), request_id)?;
            let response = self.send(QUERY, request).await?;
            if response.status.is_server_error() {
                return Err(Attempt::ServerError(response));
            }
            Ok(response)
        };
        let outcome = attempt
            .retry(self.backoff())
            .when(|e: &Attempt| match e {
                Attempt::ServerError(_) => true,
                Attempt::Failed(e) => matches!(e, UpstreamError::Connect(_)),
            })
            .notify(|_, _| self.count_retry(QUERY))
            .await;
        let mut response = match outcome {
            Ok(response) | Err(Attempt::ServerError(response)) => response,
            Err(Attempt::Failed(e)) => return Err(e),
        };
        response.elapsed = started.elapsed();
        Ok(response)
    }

    /// `GET /api/user`: `account`'s own balance. Not retried: the next check is the retry.
    pub async fn account_balance(
        &self,
        account: AccountId,
        request_id: &str,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let url = format!("{}/api/user", self.base_url);
        let request = self.request(account, Method::GET, &url, Bytes::new(), request_id)?;
        self.send(BALANCE, request).await
    }

    /// A retry is one more request to the upstream account: it waits for the account's limit.
    async fn pace_retry(&self, attempts: &AtomicU32) {
        if attempts.fetch_add(1, Ordering::Relaxed) > 0 {
            self.limits.wait_global().await;
        }
    }

    fn count_retry(&self, route: &str) {
        self.metrics
            .upstream_retries
            .with_label_values(&[route])
            .inc();
    }

    /// One attempt, counted and timed by route (`generate` or `query`).
    async fn send(
        &self,
        route: &'static str,
        request: Request<Full<Bytes>>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let started = Instant::now();
        let result = self.attempt(request).await;
        self.count_attempt(
            route,
            started,
            result.as_ref().map(|response| response.status),
        );
        result
    }

    /// Counts and times one attempt by route, with the status it got or why it got none.
    fn count_attempt(
        &self,
        route: &'static str,
        started: Instant,
        result: Result<StatusCode, &UpstreamError>,
    ) {
        let metrics = &self.metrics;
        let (status, error_kind) = match &result {
            Ok(status) if status.is_server_error() => (status.as_str(), Some("5xx")),
            Ok(status) => (status.as_str(), None),
            Err(UpstreamError::Connect(_)) => ("error", Some("connect")),
            Err(UpstreamError::Timeout(_)) => ("error", Some("timeout")),
            Err(UpstreamError::Broken(_)) => ("error", Some("broken")),
        };
        metrics.upstream_requests.with(&[route, status], |series| {
            series.total.inc();
            series.duration.observe(started.elapsed().as_secs_f64());
        });
        if let Some(kind) = error_kind {
            metrics
                .upstream_errors
                .with_label_values(&[route, kind])
                .inc();
        }
    }

    async fn attempt(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let exchange = async {
            let response = self.pool().request(request).await.map_err(|e| {
                if e.is_connect() {
                    UpstreamError::Connect(error_chain(&e))
                } else {
                    UpstreamError::Broken(error_chain(&e))
                }
            })?;
            let (parts, body) = response.into_parts();
            let body = read_answer(body, MAX_RESPONSE_BYTES)
                .await
                .map_err(|e| UpstreamError::Broken(format!("reading the answer: {e}")))?;
            Ok(UpstreamResponse {
                status: parts.status,
                content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
                body,
                elapsed: Duration::ZERO,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout(self.timeout))?
    }
}

impl UpstreamClient {
    /// A request with `account`'s token, the request id and, with a body, its JSON type.
    fn request(
        &self,
        account: AccountId,
        method: Method,
        url: &str,
        body: Bytes,
        request_id: &str,
    ) -> Result<Request<Full<Bytes>>, UpstreamError> {
        let mut request = Request::builder()
            .method(method)
            .uri(url)
            .header(
                header::AUTHORIZATION,
                self.authorizations[account.0].clone(),
            )
            .header(header::ACCEPT, "application/json");
        if !body.is_empty() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        if let Ok(value) = HeaderValue::from_str(request_id) {
            request = request.header(headers::REQUEST_ID, value);
        }
        request
            .body(Full::new(body))
            .map_err(|e| UpstreamError::Connect(format!("cannot build the request: {e}")))
    }
}

/// An answer's body whole, refused once it passes `limit` bytes. A body in one piece is taken
/// as it came; one in many is gathered into a single buffer of its declared length as it
/// arrives, so a big answer (a result of base64 images) is held once, not in pieces and then
/// again joined.
async fn read_answer<B>(mut body: B, limit: usize) -> Result<Bytes, String>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    const TOO_LONG: &str = "length limit exceeded";
    let declared = usize::try_from(body.size_hint().lower()).unwrap_or(usize::MAX);
    if declared > limit {
        return Err(TOO_LONG.into());
    }
    let mut whole = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(chunk) = frame.map_err(|e| e.to_string())?.into_data() else {
            continue;
        };
        if whole.len() + chunk.len() > limit {
            return Err(TOO_LONG.into());
        }
        if whole.is_empty() && body.is_end_stream() {
            return Ok(chunk);
        }
        if whole.is_empty() {
            whole.reserve(declared.max(chunk.len()));
        }
        whole.extend_from_slice(&chunk);
    }
    Ok(whole.freeze())
}

enum Attempt {
    ServerError(UpstreamResponse),
    Failed(UpstreamError),
}

impl From<UpstreamError> for Attempt {
    fn from(e: UpstreamError) -> Self {
        Attempt::Failed(e)
    }
}

/// hyper's top-level errors say little ("client error (Connect)"); the causes say what happened.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use hyper::body::{Frame, SizeHint};

    use super::*;

    /// A body of the given chunks, declaring `declared` bytes.
    struct Chunked {
        chunks: VecDeque<Bytes>,
        declared: u64,
    }

    impl HttpBody for Chunked {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.chunks.pop_front().map(|chunk| Ok(Frame::data(chunk))))
        }

        fn is_end_stream(&self) -> bool {
            self.chunks.is_empty()
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.declared)
        }
    }

    fn body(chunks: &[&'static [u8]]) -> Chunked {
        Chunked {
            chunks: chunks.iter().map(|c| Bytes::from_static(c)).collect(),
            declared: chunks.iter().map(|c| c.len() as u64).sum(),
        }
    }

    #[tokio::test]
    async fn answers_are_read_whole_once_and_refused_past_the_limit() {
        // One piece: the very bytes that came, no copy.
        let piece: &'static [u8] = b"{\"code\":0}";
        let read = read_answer(body(&[piece]), 64).await.unwrap();
        assert_eq!(read.as_ptr(), piece.as_ptr());
        // Many: joined into one buffer of the declared length.
        let read = read_answer(body(&[b"{\"co", b"de\"", b":0}"]), 64)
            .await
            .unwrap();
        assert_eq!(read, &b"{\"code\":0}"[..]);
        assert_eq!(read_answer(body(&[]), 64).await.unwrap(), Bytes::new());
        // Too long, as declared or as it turns out.
        let declared = read_answer(body(&[b"0123456789"]), 9).await.unwrap_err();
        assert_eq!(declared, "length limit exceeded");
        let mut understated = body(&[b"01234", b"56789"]);
        understated.declared = 0;
        let found = read_answer(understated, 9).await.unwrap_err();
        assert_eq!(found, "length limit exceeded");
    }
}
