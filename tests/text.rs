//! Text generation through the real binary, in each dialect, streamed and not: the client gets
//! the upstream's bytes as they come, the team is charged exactly tokens × prices once the
//! answer ends, however it ends.

use std::time::{Duration, Instant};

use ketchup_domain::credits::Credits;
use ketchup_domain::pricing::TextPrices;
use ketchup_fake_upstream::{FakeConfig, TextExchange, TextFault};
use ketchup_testkit::{
    ADS_KEY, DEADLINE, DESIGN_KEY, Env, GatewayConfig, UPSTREAM_TOKEN, fake_config,
};
use serde_json::{Value, json};

const OPENAI: &str = "openai/gpt-5.2";
const ANTHROPIC: &str = "anthropic/claude-sonnet-4.6";
const GEMINI: &str = "gemini-3.1-pro-preview";

/// The gateway's prices, unlike the fake's own (which only its `consumed` would show).
fn prices(model: &str) -> TextPrices {
    let (input, output) = match model {
        OPENAI => ("1.50", "6.00"),
        ANTHROPIC => ("3.00", "15.00"),
        _ => ("0.50", "2.50"),
    };
    TextPrices {
        input_per_million: input.parse().unwrap(),
        output_per_million: output.parse().unwrap(),
        max_output_tokens: 1000,
        max_input_tokens: None,
    }
}

fn config(budget: &str) -> GatewayConfig {
    GatewayConfig::new()
        .admin()
        .text_model(OPENAI, "1.50", "6.00", "max_output_tokens = 1000")
        .text_model(ANTHROPIC, "3.00", "15.00", "max_output_tokens = 1000")
        .text_model(GEMINI, "0.50", "2.50", "max_output_tokens = 1000")
        .budget(
            "design",
            &format!("{{ credits = \"{budget}\", period = \"monthly\" }}"),
        )
}

fn fake(interval: Duration, words: u64) -> FakeConfig {
    let mut fake = fake_config();
    fake.text.chunk_interval = interval;
    fake.text.answer_words = words;
    fake
}

/// A request in each dialect: its path and body.
fn request(dialect: &str, stream: bool, max_tokens: u64) -> (String, Value) {
    match dialect {
        "openai" => (
            "/api/v1/chat/completions".into(),
            json!({"model": OPENAI, "messages": [{"role": "user", "content": "tell me about ketchup"}],
                   "max_tokens": max_tokens, "stream": stream}),
        ),
        "anthropic" => (
            "/api/v1/messages".into(),
            json!({"model": ANTHROPIC, "max_tokens": max_tokens, "stream": stream,
                   "messages": [{"role": "user", "content": "tell me about ketchup"}]}),
        ),
        _ => (
            format!(
                "/api/v1beta/models/{GEMINI}:{}",
                if stream {
                    "streamGenerateContent?alt=sse"
                } else {
                    "generateContent"
                }
            ),
            json!({"contents": [{"role": "user", "parts": [{"text": "tell me about ketchup"}]}],
                   "generationConfig": {"maxOutputTokens": max_tokens}}),
        ),
    }
}

/// A response read chunk by chunk: its status, its chunks with when each came, and whether it
/// ended cleanly.
struct Read {
    status: u16,
    chunks: Vec<(Instant, Vec<u8>)>,
    whole: bool,
}

impl Read {
    fn text(&self) -> String {
        String::from_utf8(self.chunks.iter().flat_map(|(_, c)| c.clone()).collect()).unwrap()
    }
}

async fn send(base: &str, key: Option<&str>, path: &str, body: &Value) -> Read {
    let mut request = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let mut response = request.send().await.expect("answered");
    let status = response.status().as_u16();
    let mut chunks = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => chunks.push((Instant::now(), chunk.to_vec())),
            Ok(None) => {
                return Read {
                    status,
                    chunks,
                    whole: true,
                };
            }
            Err(_) => {
                return Read {
                    status,
                    chunks,
                    whole: false,
                };
            }
        }
    }
}

/// The text with every run of 32 hex digits (the fake's answer ids) replaced by `ID`.
fn without_ids(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let run = bytes[i..]
            .iter()
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        if run == 32 {
            out.push_str("ID");
            i += run;
        } else {
            let step = run.max(1);
            out.push_str(&text[i..i + step]);
            i += step;
        }
    }
    out
}

/// What the exchanges cost at the gateway's prices.
fn cost_of(exchanges: &[TextExchange]) -> Credits {
    exchanges
        .iter()
        .map(|e| {
            prices(&e.model)
                .cost(e.input_tokens, e.output_tokens)
                .unwrap()
        })
        .fold(Credits::ZERO, |a, b| a.checked_add(b).unwrap())
}

fn credits(value: &Value) -> Credits {
    value.as_str().expect("an amount").parse().unwrap()
}

async fn wait_settled(env: &Env, spent: Credits) -> Value {
    env.api()
        .wait_for_budget(DESIGN_KEY, "text settled", |b| {
            credits(&b["spent"]) == spent && credits(&b["reserved"]) == Credits::ZERO
        })
        .await
}

#[tokio::test]
async fn each_dialect_passes_the_upstreams_bytes_and_charges_tokens_times_prices() {
    let env = Env::start_with(fake(Duration::from_millis(5), 6), config("10.00")).await;
    let gateway = env.api().base.clone();
    let fake = env.fake.base_url();
    for dialect in ["openai", "anthropic", "gemini"] {
        for stream in [false, true] {
            let (path, body) = request(dialect, stream, 100);
            let through = send(&gateway, Some(DESIGN_KEY), &path, &body).await;
            let direct = send(&fake, Some(UPSTREAM_TOKEN), &path, &body).await;
            assert_eq!(
                (through.status, through.whole),
                (200, true),
                "{dialect} {stream}: {}",
                through.text()
            );
            // A chat completion stream without include_usage gets no usage chunk, as direct.
            assert_eq!(
                without_ids(&through.text()),
                without_ids(&direct.text()),
                "{dialect} stream={stream}"
            );
        }
    }
    let exchanges = env.fake.text_exchanges();
    assert_eq!(exchanges.len(), 12);
    // The gateway asked the upstream for the usage chunk of the chat completion stream.
    let gateway_sent: Vec<&TextExchange> = exchanges.iter().step_by(2).collect();
    assert_eq!(
        gateway_sent[1].body["stream_options"],
        json!({"include_usage": true})
    );
    assert!(gateway_sent.iter().all(|e| e.outcome == "complete"));
    let charged: Vec<TextExchange> = gateway_sent.into_iter().cloned().collect();
    let spent = cost_of(&charged);
    assert!(spent > Credits::ZERO);
    let budget = wait_settled(&env, spent).await;
    let user = env.api().get("/api/user", Some(DESIGN_KEY)).await.json();
    assert_eq!(user["data"]["credit"], budget["remaining"]);
    assert_eq!(
        credits(&user["data"]["credit"]),
        "10.00"
            .parse::<Credits>()
            .unwrap()
            .checked_sub(spent)
            .unwrap()
    );
    let usage = env.api().admin("/admin/usage").await;
    let text_rows: Vec<&Value> = usage["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["family"] == "text")
        .collect();
    assert_eq!(text_rows.len(), 3, "{usage}");
    assert!(
        text_rows
            .iter()
            .all(|row| row["succeeded"] == 2 && row["unsettled"] == 0)
    );
    let scrape = env.api().scrape().await;
    scrape.assert_eq(
        "ketchup_gateway_text_requests_total",
        &[
            ("dialect", "anthropic"),
            ("model", ANTHROPIC),
            ("stream", "true"),
            ("team", "design"),
        ],
        1.0,
    );
    let output: u64 = charged.iter().map(|e| e.output_tokens).sum();
    scrape.assert_eq(
        "ketchup_gateway_text_tokens_total",
        &[
            ("direction", "output"),
            ("model", OPENAI),
            ("team", "design"),
        ],
        (output / 3) as f64,
    );
}

#[tokio::test]
async fn a_stream_reaches_the_client_chunk_by_chunk_as_the_upstream_sends_it() {
    let env = Env::start_with(fake(Duration::from_millis(200), 6), config("10.00")).await;
    for dialect in ["openai", "anthropic", "gemini"] {
        let (path, body) = request(dialect, true, 100);
        let read = send(&env.api().base, Some(DESIGN_KEY), &path, &body).await;
        assert!(read.whole, "{dialect}");
        let sent = *env.fake.text_first_chunks_sent().last().unwrap();
        let first = read.chunks[0].0;
        let end = read.chunks.last().unwrap().0;
        let lag = first.saturating_duration_since(sent);
        assert!(
            lag < Duration::from_millis(100),
            "{dialect}: first chunk {lag:?} after the fake sent it"
        );
        // Five more words at 200 ms: the first chunk came long before the end.
        assert!(
            end - first >= Duration::from_millis(900),
            "{dialect}: {:?}",
            end - first
        );
    }
}

#[tokio::test]
async fn a_request_whose_worst_case_does_not_fit_is_refused_before_the_upstream() {
    let env = Env::start_with(fake(Duration::from_millis(5), 6), config("0.001")).await;
    // 1000 output tokens at 6.00 per million: 0.006, over the budget of 0.001.
    let (path, body) = request("openai", false, 1000);
    let refused = send(&env.api().base, Some(DESIGN_KEY), &path, &body).await;
    assert_eq!(refused.status, 402, "{}", refused.text());
    assert!(
        refused.text().contains("budget exhausted"),
        "{}",
        refused.text()
    );
    assert_eq!(env.fake.stats().text_requests, 0);
    // A model not priced as a text model: a 400 in the dialect's own shape.
    for (dialect, path, body, shape) in [
        (
            "openai",
            "/api/v1/chat/completions",
            json!({"model": "google/gempix2", "messages": []}),
            "/error/message",
        ),
        (
            "anthropic",
            "/api/v1/messages",
            json!({"model": "x", "max_tokens": 5, "messages": []}),
            "/error/message",
        ),
        (
            "gemini",
            "/api/v1beta/models/gemini-9:generateContent",
            json!({"contents": []}),
            "/error/message",
        ),
    ] {
        let read = send(&env.api().base, Some(DESIGN_KEY), path, &body).await;
        assert_eq!(read.status, 400, "{dialect}");
        let answer: Value = serde_json::from_str(&read.text()).unwrap();
        let message = answer
            .pointer(shape)
            .and_then(Value::as_str)
            .unwrap_or_default();
        assert!(
            message.contains("is not offered as a text model"),
            "{dialect}: {answer}"
        );
    }
    let unauthorized = send(&env.api().base, None, &path, &body).await;
    assert_eq!(unauthorized.status, 401);
    assert_eq!(env.fake.stats().text_requests, 0);
}

#[tokio::test]
async fn concurrent_requests_never_spend_past_the_budget() {
    // Worst case of each: 100 output tokens at 6.00 per million plus its body's bytes at 1.50:
    // about 0.0008. The budget holds ten of them.
    let (path, body) = request("openai", true, 100);
    let worst = prices(OPENAI)
        .worst_case(serde_json::to_vec(&body).unwrap().len(), Some(100))
        .unwrap();
    let budget = worst.checked_mul(10).unwrap();
    let env = Env::start_with(
        fake(Duration::from_millis(30), 6),
        config(&budget.to_string()),
    )
    .await;
    let base = env.api().base.clone();
    let requests: Vec<_> = (0..200)
        .map(|_| {
            let (base, path, body) = (base.clone(), path.clone(), body.clone());
            tokio::spawn(async move { send(&base, Some(DESIGN_KEY), &path, &body).await.status })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::new();
    for request in requests {
        *statuses.entry(request.await.unwrap()).or_insert(0) += 1;
    }
    assert!(
        statuses.get(&200).copied().unwrap_or(0) >= 10,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        [200, 402],
        "{statuses:?}"
    );
    let spent = cost_of(&env.fake.text_exchanges());
    let standing = wait_settled(&env, spent).await;
    assert!(credits(&standing["spent"]) <= budget, "{standing}");
    assert_eq!(env.fake.text_exchanges().len(), statuses[&200]);
}

#[tokio::test]
async fn a_client_that_leaves_stops_the_upstream_and_is_charged_its_reservation() {
    let env = Env::start_with(fake(Duration::from_millis(200), 20), config("10.00")).await;
    let (path, body) = request("openai", true, 100);
    let mut response = reqwest::Client::new()
        .post(format!("{}{path}", env.api().base))
        .bearer_auth(DESIGN_KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    response.chunk().await.unwrap().expect("a first chunk");
    drop(response);
    let deadline = Instant::now() + DEADLINE;
    while env.fake.text_exchanges()[0].outcome != "cancelled" {
        assert!(Instant::now() < deadline, "{:?}", env.fake.text_exchanges());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // No usage came before it left: its reservation is what it costs.
    let reservation = prices(OPENAI)
        .worst_case(serde_json::to_vec(&body).unwrap().len(), Some(100))
        .unwrap();
    wait_settled(&env, reservation).await;
    assert_eq!(
        env.api()
            .metric("ketchup_gateway_text_settled_at_reservation_total{reason=\"client_left\",team=\"design\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn an_upstream_failure_midway_ends_the_stream_the_dialects_way_and_settles() {
    let env = Env::start_with(fake(Duration::from_millis(5), 8), config("10.00")).await;
    let base = env.api().base.clone();
    let mut reservations = Credits::ZERO;
    // The upstream's own error event passes through; a broken connection gets the gateway's.
    env.fake.text_faults().inject(TextFault::ErrorAfter(3), 1);
    env.fake.text_faults().inject(TextFault::CutAfter(3), 2);
    for (dialect, ending) in [
        (
            "anthropic",
            "event: error\ndata: {\"error\":{\"message\":\"Overloaded\",\"type\":\"overloaded_error\"},\"type\":\"error\"}\n\n",
        ),
        (
            "openai",
            "data: {\"error\":{\"code\":null,\"message\":\"the upstream's answer broke off (upstream unavailable)\",\"param\":null,\"type\":\"server_error\"}}\n\n",
        ),
        (
            "gemini",
            "data: {\"error\":{\"code\":502,\"message\":\"the upstream's answer broke off (upstream unavailable)\",\"status\":\"UNAVAILABLE\"}}\r\n\r\n",
        ),
    ] {
        let (path, body) = request(dialect, true, 100);
        let read = send(&base, Some(DESIGN_KEY), &path, &body).await;
        assert!(read.whole, "{dialect}");
        assert!(read.text().ends_with(ending), "{dialect}: {}", read.text());
        let model = match dialect {
            "openai" => OPENAI,
            "anthropic" => ANTHROPIC,
            _ => GEMINI,
        };
        let reservation = prices(model)
            .worst_case(serde_json::to_vec(&body).unwrap().len(), Some(100))
            .unwrap();
        reservations = reservations.checked_add(reservation).unwrap();
    }
    wait_settled(&env, reservations).await;
    assert_eq!(
        env.api()
            .metric("ketchup_gateway_text_settled_at_reservation_total{reason=\"upstream_error\",team=\"design\"}")
            .await,
        3.0
    );
}

#[tokio::test]
async fn a_long_stream_outlives_the_request_timeout_but_a_silent_one_does_not() {
    let config = config("10.00")
        .server("request_timeout = \"1s\"")
        .upstream("timeout = \"1s\"");
    let env = Env::start_with(fake(Duration::from_millis(150), 12), config).await;
    let base = env.api().base.clone();
    let (path, body) = request("anthropic", true, 100);
    let started = Instant::now();
    let read = send(&base, Some(DESIGN_KEY), &path, &body).await;
    assert!(started.elapsed() > Duration::from_millis(1500));
    assert!(
        read.whole
            && read
                .text()
                .ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
        "{}",
        read.text()
    );
    let complete = cost_of(&env.fake.text_exchanges());
    wait_settled(&env, complete).await;

    env.fake
        .text_faults()
        .inject(TextFault::StallAfter(2, Duration::from_secs(3)), 1);
    let (path, body) = request("gemini", true, 100);
    let read = send(&base, Some(DESIGN_KEY), &path, &body).await;
    assert!(
        read.text().ends_with("\"message\":\"the upstream stopped sending the answer (upstream timeout)\",\"status\":\"UNAVAILABLE\"}}\r\n\r\n"),
        "{}",
        read.text()
    );
    let reservation = prices(GEMINI)
        .worst_case(serde_json::to_vec(&body).unwrap().len(), Some(100))
        .unwrap();
    wait_settled(&env, complete.checked_add(reservation).unwrap()).await;
    assert_eq!(
        env.api()
            .metric("ketchup_gateway_text_settled_at_reservation_total{reason=\"upstream_timeout\",team=\"design\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn an_answers_consumed_is_the_charge() {
    let mut fake = fake(Duration::from_millis(5), 6);
    fake.text.report_consumed = true;
    let env = Env::start_with(fake, config("10.00")).await;
    let (path, body) = request("openai", false, 100);
    let read = send(&env.api().base, Some(DESIGN_KEY), &path, &body).await;
    let answer: Value = serde_json::from_str(&read.text()).unwrap();
    let consumed = credits(&answer["consumed"]);
    assert_ne!(consumed, cost_of(&env.fake.text_exchanges()));
    wait_settled(&env, consumed).await;
}

/// The exchanges since `from`, each checked to carry the upstream token and no trace of the
/// team's key: not in a header (an `x-api-key` or `x-goog-api-key` passed on), not in the query.
fn assert_no_team_key_upstream(exchanges: &[TextExchange]) {
    for exchange in exchanges {
        let authorization: Vec<&str> = exchange
            .headers
            .iter()
            .filter(|(name, _)| name == "authorization")
            .map(|(_, value)| value.as_str())
            .collect();
        assert_eq!(
            authorization,
            [format!("Bearer {UPSTREAM_TOKEN}")],
            "{exchange:?}"
        );
        assert!(
            exchange
                .headers
                .iter()
                .all(|(name, value)| !value.contains(DESIGN_KEY)
                    && name != "x-api-key"
                    && name != "x-goog-api-key"),
            "{exchange:?}"
        );
        assert!(
            !exchange.query.as_deref().unwrap_or("").contains("key"),
            "{exchange:?}"
        );
    }
}

#[tokio::test]
async fn each_dialects_clients_authenticate_their_way_on_its_routes_only() {
    let env = Env::start_with(fake(Duration::from_millis(5), 4), config("10.00")).await;
    let api = env.api();
    let client = reqwest::Client::new();
    let post = |path: &str, body: &Value| client.post(api.url(path)).json(body);
    let (messages, anthropic) = request("anthropic", true, 50);
    let (chat, openai) = request("openai", false, 50);
    let (generate, gemini) = request("gemini", false, 50);
    let (stream_generate, gemini_streamed) = request("gemini", true, 50);

    // Each dialect's own way, on its own routes: accepted, and the team's.
    let accepted = [
        post(&messages, &anthropic).header("x-api-key", DESIGN_KEY),
        post(&generate, &gemini).header("x-goog-api-key", DESIGN_KEY),
        post(
            &format!("{stream_generate}&key={DESIGN_KEY}"),
            &gemini_streamed,
        ),
        // The same key in two places is one key.
        post(&messages, &anthropic)
            .header("x-api-key", DESIGN_KEY)
            .bearer_auth(DESIGN_KEY),
        post(&format!("{generate}?key={DESIGN_KEY}"), &gemini).header("x-goog-api-key", DESIGN_KEY),
    ];
    for request in accepted {
        let reply = api.send(request).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    let exchanges = env.fake.text_exchanges();
    assert_eq!(exchanges.len(), 5);
    assert_no_team_key_upstream(&exchanges);
    // Gemini's other query parameters still reach the upstream.
    assert_eq!(exchanges[2].query.as_deref(), Some("alt=sse"));
    let spent = cost_of(&exchanges);
    wait_settled(&env, spent).await;

    // Elsewhere, or a wrong or second key: the 401 of an unknown key, nothing sent upstream.
    let refused = [
        post(&chat, &openai).header("x-api-key", DESIGN_KEY),
        post(&chat, &openai).header("x-goog-api-key", DESIGN_KEY),
        post(&format!("{chat}?key={DESIGN_KEY}"), &openai),
        post(&messages, &anthropic).header("x-goog-api-key", DESIGN_KEY),
        post(&format!("{messages}?key={DESIGN_KEY}"), &anthropic),
        post(&generate, &gemini).header("x-api-key", DESIGN_KEY),
        post(
            "/api/image/gen",
            &json!({"model": "google/gempix2", "prompt": "a tomato"}),
        )
        .header("x-api-key", DESIGN_KEY),
        post(
            "/api/image/gen",
            &json!({"model": "google/gempix2", "prompt": "a tomato"}),
        )
        .header("x-goog-api-key", DESIGN_KEY),
        client
            .get(api.url(&format!("/gateway/v1/budget?key={DESIGN_KEY}")))
            .header("x-goog-api-key", DESIGN_KEY),
        post(&messages, &anthropic).header("x-api-key", "kgw_not_a_key"),
        post(&generate, &gemini).header("x-goog-api-key", ""),
        // Two different keys: which team would pay is a guess.
        post(&messages, &anthropic)
            .header("x-api-key", DESIGN_KEY)
            .bearer_auth(ADS_KEY),
        post(&format!("{generate}?key={ADS_KEY}"), &gemini).header("x-goog-api-key", DESIGN_KEY),
        post(
            &format!("{generate}?key={DESIGN_KEY}&key=kgw_other"),
            &gemini,
        ),
    ];
    for (i, request) in refused.into_iter().enumerate() {
        let reply = api.send(request).await;
        assert_eq!(
            reply.status_json(),
            (401, json!({"code": 1, "message": "Invalid API key"})),
            "refused request {i}"
        );
    }
    assert_eq!(env.fake.text_exchanges().len(), 5);
    assert_eq!(env.fake.stats().generate_requests, 0);
    let budget = api.budget(DESIGN_KEY).await;
    assert_eq!(credits(&budget["spent"]), spent);
}

#[tokio::test]
async fn a_text_answer_carries_the_budget_its_worst_case_left() {
    let env = Env::start_with(fake(Duration::from_millis(5), 6), config("10.00")).await;
    let api = env.api();
    let budget: Credits = "10.00".parse().unwrap();
    let mut spent = Credits::ZERO;
    let reset = api.budget(DESIGN_KEY).await["resets_at"].clone();
    assert!(reset.is_string(), "{reset}");
    for (dialect, stream) in [("openai", false), ("anthropic", true), ("gemini", true)] {
        let (path, body) = request(dialect, stream, 200);
        let model = match dialect {
            "openai" => OPENAI,
            "anthropic" => ANTHROPIC,
            _ => GEMINI,
        };
        let worst = prices(model)
            .worst_case(serde_json::to_vec(&body).unwrap().len(), Some(200))
            .unwrap();
        let reply = api.submit(DESIGN_KEY, &path, &body.to_string()).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        // At the head, before the answer's usage is known: what reserving its worst case left.
        let expected = budget
            .checked_sub(spent)
            .and_then(|left| left.checked_sub(worst))
            .unwrap();
        assert_eq!(
            reply.header("x-budget-remaining").as_deref(),
            Some(expected.format_places(8).as_str()),
            "{dialect}"
        );
        assert_eq!(
            reply.header("x-budget-reset").as_ref(),
            reset.as_str().map(str::to_owned).as_ref()
        );
        spent = cost_of(&env.fake.text_exchanges());
        assert!(
            spent < budget.checked_sub(expected).unwrap(),
            "settled below the worst case"
        );
        wait_settled(&env, spent).await;
    }
    // Refused upstream: nothing was reserved for long, no standing to tell.
    env.fake.text_faults().inject(TextFault::Status500, 1);
    let (path, body) = request("openai", false, 200);
    let reply = api.submit(DESIGN_KEY, &path, &body.to_string()).await;
    assert_eq!(reply.status, 500, "{}", reply.text);
    assert_eq!(reply.header("x-budget-remaining"), None);
    assert_eq!(reply.header("x-budget-reset"), None);
}
