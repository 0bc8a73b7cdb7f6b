//! Synchronous text generation, in the three dialects of the contract's table: OpenAI chat
//! completions, Anthropic messages and Gemini generateContent, each whole or streamed as
//! server-sent events in timed chunks, with usage (and, if configured, `consumed`), and the
//! failures a stream can meet: an error midway, a cut connection, a stall, no usage at all.
//!
//! Errors before an answer starts keep the upstream's envelope (the contract: "Errors keep the
//! upstream envelope"); an error midway is in the dialect's own stream shape, as only that can
//! reach a client already reading events.

mod dialects;

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::response::Response;
use axum::{Router, routing::post};
use http::{HeaderMap, HeaderValue, Uri, header};
use http_body::Frame;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;

use super::state::{RECORD_CAP, Recorder, Shared};
use super::wire;
use dialects::{Ask, Dialect, Usage};
use ketchup_domain::credits::Credits;

/// Largest text request read.
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// How the fake answers text requests. [`TextConfig::default`] gives working defaults.
#[derive(Debug, Clone)]
pub struct TextConfig {
    /// The text models served, with their prices per million input and output tokens (what
    /// `consumed` reports, when it is reported). Another model is a 400.
    pub prices: BTreeMap<String, (Credits, Credits)>,
    /// A stream's first event goes at once; each word after waits this long.
    pub chunk_interval: Duration,
    /// Words (output tokens) in an answer, fewer when the request's limit is lower.
    pub answer_words: u64,
    /// Whether answers carry a `consumed` beside their usage.
    pub report_consumed: bool,
}

impl Default for TextConfig {
    /// The contract's three example models at made-up prices, a word every 10 ms, 15 words,
    /// no `consumed`.
    fn default() -> Self {
        let price = |text: &str| text.parse::<Credits>().expect("a valid price");
        TextConfig {
            prices: [
                ("openai/gpt-5.2", "2.00", "10.00"),
                ("anthropic/claude-sonnet-4.6", "3.00", "15.00"),
                ("gemini-3.1-pro-preview", "2.00", "12.00"),
            ]
            .into_iter()
            .map(|(model, input, output)| (model.to_owned(), (price(input), price(output))))
            .collect(),
            chunk_interval: Duration::from_millis(10),
            answer_words: 15,
            report_consumed: false,
        }
    }
}

/// A failure of one text request, queued with [`TextFaults::inject`]; counts are of words sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextFault {
    /// `500` in the upstream envelope, before any answer.
    Status500,
    /// After this many words, the dialect's stream error, then the end (not streamed: a 500).
    ErrorAfter(u64),
    /// After this many words, the connection breaks without an end (not streamed: half the
    /// body, then the break).
    CutAfter(u64),
    /// After this many words, nothing for this long; then the rest (not streamed: the answer
    /// comes this late).
    StallAfter(u64, Duration),
    /// The answer reports no usage anywhere.
    NoUsage,
}

/// Queued text faults, one per request, in order.
#[derive(Debug, Default)]
pub struct TextFaults(Mutex<VecDeque<TextFault>>);

impl TextFaults {
    /// The next `times` text requests get `fault`, after any already queued.
    pub fn inject(&self, fault: TextFault, times: usize) {
        let mut queue = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        queue.extend(std::iter::repeat_n(fault, times));
    }

    fn draw(&self) -> Option<TextFault> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }
}

/// One text request as the fake saw and answered it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextExchange {
    /// `openai`, `anthropic` or `gemini`.
    pub dialect: String,
    pub model: String,
    pub stream: bool,
    /// The body as received.
    pub body: Value,
    /// The request's headers as received (names in lower case), and its query string: what a
    /// gateway passed on besides the body.
    pub headers: Vec<(String, String)>,
    pub query: Option<String>,
    /// The tokens the answer used (and reported, unless it was sent without usage).
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// `complete`, `error` (ended by the dialect's error), `cut`, or `cancelled` (the client
    /// went away before the end); `running` while it streams.
    pub outcome: String,
}

/// What the fake records of text requests.
#[derive(Default)]
pub struct TextLog {
    exchanges: Mutex<Vec<TextExchange>>,
    /// When each stream's first event was handed to the connection, in arrival order.
    first_sent: Mutex<Vec<Instant>>,
}

impl TextLog {
    fn record(&self, exchange: TextExchange) -> Option<usize> {
        let mut exchanges = self
            .exchanges
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (exchanges.len() < RECORD_CAP).then(|| {
            exchanges.push(exchange);
            exchanges.len() - 1
        })
    }

    fn finish(&self, index: Option<usize>, output: u64, outcome: &str) {
        let mut exchanges = self
            .exchanges
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(exchange) = index.and_then(|i| exchanges.get_mut(i)) {
            exchange.output_tokens = output;
            exchange.outcome = outcome.to_owned();
        }
    }

    fn first_sent(&self, at: Instant) {
        let mut sent = self
            .first_sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if sent.len() < RECORD_CAP {
            sent.push(at);
        }
    }

    pub fn exchanges(&self) -> Vec<TextExchange> {
        self.exchanges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn first_chunks_sent(&self) -> Vec<Instant> {
        self.first_sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn clear(&self) {
        self.exchanges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.first_sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// What the text routes share: the fake's own state (its token, its counters), and theirs.
pub(crate) struct TextShared {
    shared: Arc<Shared>,
    config: TextConfig,
    pub faults: TextFaults,
    pub log: Arc<TextLog>,
}

impl TextShared {
    pub fn new(shared: Arc<Shared>, config: TextConfig) -> Self {
        TextShared {
            shared,
            config,
            faults: TextFaults::default(),
            log: Arc::default(),
        }
    }
}

pub(crate) fn router(text: Arc<TextShared>) -> Router {
    Router::new()
        .route("/api/v1/chat/completions", post(chat_completions))
        .route("/api/v1/messages", post(messages))
        .route("/api/v1beta/models/{model_action}", post(gemini))
        .with_state(text)
}

type SharedState = State<Arc<TextShared>>;

async fn chat_completions(
    State(shared): SharedState,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request = Received::new(&uri, &headers);
    text(&shared, request, body, Dialect::OpenAi, None).await
}

async fn messages(
    State(shared): SharedState,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request = Received::new(&uri, &headers);
    text(&shared, request, body, Dialect::Anthropic, None).await
}

/// `/api/v1beta/models/{model}:generateContent` and `:streamGenerateContent` (one path segment,
/// split at its last colon).
async fn gemini(
    State(shared): SharedState,
    Path(model_action): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let stream = match model_action.rsplit_once(':') {
        Some((model, "generateContent")) if !model.is_empty() => (model.to_owned(), false),
        Some((model, "streamGenerateContent")) if !model.is_empty() => (model.to_owned(), true),
        _ => return wire::route_not_found(),
    };
    let request = Received::new(&uri, &headers);
    text(&shared, request, body, Dialect::Gemini, Some(stream)).await
}

/// A text request's head, as the fake saw it.
struct Received<'a> {
    headers: &'a HeaderMap,
    query: Option<&'a str>,
}

impl<'a> Received<'a> {
    fn new(uri: &'a Uri, headers: &'a HeaderMap) -> Self {
        Received {
            headers,
            query: uri.query(),
        }
    }

    fn header_pairs(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_owned(), value)
            })
            .collect()
    }
}

async fn text(
    text: &TextShared,
    request: Received<'_>,
    body: Body,
    dialect: Dialect,
    gemini: Option<(String, bool)>,
) -> Response {
    let (shared, config) = (&text.shared, &text.config);
    Recorder::count(&shared.stats.text_requests);
    shared.stats.observe_headers(request.headers);
    let fault = text.faults.draw();
    if fault == Some(TextFault::Status500) {
        return wire::internal_error();
    }
    if !shared.is_authorized(request.headers) {
        Recorder::count(&shared.stats.unauthorized);
        return wire::unauthorized();
    }
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return wire::bad_request("request body is unreadable or larger than 4 MiB");
    };
    let Ok(json) = serde_json::from_slice::<Value>(&bytes) else {
        return wire::bad_request("invalid JSON body");
    };
    let (path_model, streaming_path) = match &gemini {
        Some((model, stream)) => (Some(model.as_str()), *stream),
        None => (None, false),
    };
    let ask = match dialects::ask(dialect, &json, path_model, streaming_path) {
        Ok(ask) => ask,
        Err(detail) => return wire::bad_request(detail),
    };
    let Some(&(input_price, output_price)) = config.prices.get(&ask.model) else {
        return wire::bad_request(format!("unsupported model: {}", ask.model));
    };
    let words = ask
        .max_tokens
        .map_or(config.answer_words, |max| max.min(config.answer_words));
    let cost = |output: u64| {
        let units = (i128::from(ask.input_tokens) * i128::from(input_price.units())
            + i128::from(output) * i128::from(output_price.units()))
        .div_euclid(1_000_000);
        Credits::from_units(i64::try_from(units).unwrap_or(i64::MAX))
    };
    let usage = (fault != Some(TextFault::NoUsage)).then(|| Usage {
        input: ask.input_tokens,
        output: words,
        consumed: config.report_consumed.then(|| cost(words)),
        truncated: words < config.answer_words,
    });
    let index = text.log.record(TextExchange {
        dialect: dialect.as_str().to_owned(),
        model: ask.model.clone(),
        stream: ask.stream,
        body: json,
        headers: request.header_pairs(),
        query: request.query.map(str::to_owned),
        input_tokens: ask.input_tokens,
        output_tokens: 0,
        outcome: "running".to_owned(),
    });
    let script = Script {
        dialect,
        id: uuid::Uuid::new_v4().simple().to_string(),
        ask,
        words,
        usage,
        fault,
        interval: config.chunk_interval,
    };
    if script.ask.stream {
        return stream(text.log.clone(), index, script);
    }
    answer_whole(&text.log, index, &script).await
}

/// A whole answer; faults change when and how it comes.
async fn answer_whole(log: &TextLog, index: Option<usize>, script: &Script) -> Response {
    let Script {
        dialect,
        id,
        ask,
        words,
        usage,
        fault,
        ..
    } = script;
    let text: String = dialects::answer_words(*words)
        .iter()
        .enumerate()
        .map(|(i, word)| dialects::piece(i, word))
        .collect();
    let body = dialects::answer(*dialect, id, &ask.model, &text, *usage).to_string();
    match fault {
        Some(TextFault::ErrorAfter(_)) => {
            log.finish(index, 0, "error");
            return wire::internal_error();
        }
        Some(TextFault::CutAfter(_)) => {
            log.finish(index, *words, "cut");
            let half = Bytes::from(body[..body.len() / 2].to_owned());
            let (sender, receiver) = mpsc::channel(2);
            let _ = sender.try_send(Ok(half));
            let _ = sender.try_send(Err(()));
            return event_stream(receiver, "application/json");
        }
        Some(TextFault::StallAfter(_, stall)) => tokio::time::sleep(*stall).await,
        _ => {}
    }
    log.finish(index, *words, "complete");
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Everything a stream will send, decided before its first event.
struct Script {
    dialect: Dialect,
    id: String,
    ask: Ask,
    words: u64,
    usage: Option<Usage>,
    fault: Option<TextFault>,
    interval: Duration,
}

/// Answers with a stream whose events a task of its own sends on `script`'s schedule.
fn stream(log: Arc<TextLog>, index: Option<usize>, script: Script) -> Response {
    let (sender, receiver) = mpsc::channel::<Result<Bytes, ()>>(16);
    tokio::spawn(async move {
        let (output, outcome) = send_script(&log, &sender, &script).await;
        log.finish(index, output, outcome);
    });
    event_stream(receiver, "text/event-stream")
}

/// Sends a stream's events; returns the words sent and how it ended.
async fn send_script(
    log: &TextLog,
    sender: &mpsc::Sender<Result<Bytes, ()>>,
    script: &Script,
) -> (u64, &'static str) {
    let Script {
        dialect,
        id,
        ask,
        words,
        usage,
        fault,
        interval,
    } = script;
    let (dialect, model) = (*dialect, ask.model.as_str());
    let send = |text: String| sender.send(Ok(Bytes::from(text)));
    let mut opening =
        dialects::stream_start(dialect, id, model, ask.input_tokens, usage.is_some()).concat();
    let answer = dialects::answer_words(*words);
    let mut sent = 0;
    for (i, word) in answer.iter().enumerate() {
        let i_u64 = i as u64;
        match fault {
            Some(TextFault::ErrorAfter(after)) if *after == i_u64 => {
                let _ = send(dialects::stream_error(dialect)).await;
                return (sent, "error");
            }
            Some(TextFault::CutAfter(after)) if *after == i_u64 => {
                let _ = sender.send(Err(())).await;
                return (sent, "cut");
            }
            Some(TextFault::StallAfter(after, stall)) if *after == i_u64 => {
                tokio::time::sleep(*stall).await;
            }
            _ => {}
        }
        if i > 0 {
            tokio::time::sleep(*interval).await;
        }
        let usage_so_far = usage.map(|u| (u.input, i_u64 + 1));
        opening.push_str(&dialects::stream_piece(
            dialect,
            id,
            model,
            i,
            word,
            usage_so_far,
        ));
        if i == 0 {
            log.first_sent(Instant::now());
        }
        if send(std::mem::take(&mut opening)).await.is_err() {
            return (sent, "cancelled");
        }
        sent += 1;
    }
    let end = dialects::stream_end(dialect, id, model, *usage, ask.include_usage).concat();
    if send(end).await.is_err() {
        return (sent, "cancelled");
    }
    (sent, "complete")
}

/// A response whose body is what arrives on `receiver`; an `Err` breaks the connection.
fn event_stream(
    receiver: mpsc::Receiver<Result<Bytes, ()>>,
    content_type: &'static str,
) -> Response {
    let mut response = Response::new(Body::new(ChannelBody(receiver)));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The body of a stream: each message is one frame; an error aborts the connection mid-body.
struct ChannelBody(mpsc::Receiver<Result<Bytes, ()>>);

#[derive(Debug)]
struct Cut;

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the fake cut the stream")
    }
}

impl std::error::Error for Cut {}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Cut;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Cut>>> {
        match self.0.poll_recv(cx) {
            Poll::Ready(Some(Ok(bytes))) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
            Poll::Ready(Some(Err(()))) => Poll::Ready(Some(Err(Cut))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
