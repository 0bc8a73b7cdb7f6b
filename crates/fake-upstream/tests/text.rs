//! The fake's text dialects through real sockets: whole answers and streams with usage, timed
//! chunks, and the failures a stream can meet.

use std::time::{Duration, Instant};

use http::StatusCode;
use ketchup_fake_upstream::{self, FakeConfig, FakeHandle, TextFault};
use serde_json::{Value, json};

const TOKEN: &str = "dk-1234567890abcdef";

async fn fake(adjust: impl FnOnce(&mut FakeConfig)) -> FakeHandle {
    let mut config = FakeConfig::new(TOKEN);
    config.text.chunk_interval = Duration::from_millis(5);
    config.text.answer_words = 6;
    adjust(&mut config);
    ketchup_fake_upstream::start(config)
        .await
        .expect("fake starts")
}

/// The three dialects' paths and a body each, streamed or not.
fn request(dialect: &str, stream: bool) -> (String, Value) {
    match dialect {
        "openai" => (
            "/api/v1/chat/completions".into(),
            json!({"model": "openai/gpt-5.2", "messages": [{"role": "user", "content": "hello there"}],
                   "stream": stream, "stream_options": {"include_usage": true}}),
        ),
        "anthropic" => (
            "/api/v1/messages".into(),
            json!({"model": "anthropic/claude-sonnet-4.6", "max_tokens": 100, "stream": stream,
                   "messages": [{"role": "user", "content": "hello there"}]}),
        ),
        _ => (
            format!(
                "/api/v1beta/models/gemini-3.1-pro-preview:{}",
                if stream {
                    "streamGenerateContent?alt=sse"
                } else {
                    "generateContent"
                }
            ),
            json!({"contents": [{"role": "user", "parts": [{"text": "hello there"}]}]}),
        ),
    }
}

/// Sends a request and reads its body chunk by chunk, with when each chunk came.
async fn exchange(
    fake: &FakeHandle,
    path: &str,
    body: &Value,
) -> (StatusCode, Vec<(Instant, String)>, bool) {
    let mut response = reqwest::Client::new()
        .post(format!("{}{path}", fake.base_url()))
        .bearer_auth(TOKEN)
        .json(body)
        .send()
        .await
        .expect("fake answers");
    let status = response.status();
    let mut chunks = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                chunks.push((Instant::now(), String::from_utf8(chunk.to_vec()).unwrap()))
            }
            Ok(None) => return (status, chunks, true),
            Err(_) => return (status, chunks, false),
        }
    }
}

fn text_of(chunks: &[(Instant, String)]) -> String {
    chunks.iter().map(|(_, text)| text.as_str()).collect()
}

#[tokio::test]
async fn each_dialect_answers_whole_with_its_usage() {
    let fake = fake(|_| {}).await;
    for (dialect, usage) in [
        (
            "openai",
            r#""usage":{"completion_tokens":6,"prompt_tokens":7,"total_tokens":13}"#,
        ),
        (
            "anthropic",
            r#""usage":{"input_tokens":7,"output_tokens":6}"#,
        ),
        (
            "gemini",
            r#""usageMetadata":{"candidatesTokenCount":6,"promptTokenCount":7,"totalTokenCount":13}"#,
        ),
    ] {
        let (path, body) = request(dialect, false);
        let (status, chunks, whole) = exchange(&fake, &path, &body).await;
        let text = text_of(&chunks);
        assert_eq!((status, whole), (StatusCode::OK, true), "{dialect}: {text}");
        assert!(text.contains(usage), "{dialect}: {text}");
        assert!(
            text.contains("Tomatoes ripen best in warm sun,"),
            "{dialect}: {text}"
        );
    }
    let exchanges = fake.text_exchanges();
    assert_eq!(exchanges.len(), 3);
    assert!(
        exchanges
            .iter()
            .all(|e| e.outcome == "complete" && e.output_tokens == 6 && e.input_tokens == 7)
    );
    assert_eq!(fake.stats().text_requests, 3);
}

#[tokio::test]
async fn each_dialect_streams_a_word_per_event_and_ends_with_its_usage() {
    let fake = fake(|config| config.text.chunk_interval = Duration::from_millis(40)).await;
    for (dialect, ending) in [
        ("openai", "data: [DONE]\n\n"),
        (
            "anthropic",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ),
        (
            "gemini",
            "\"usageMetadata\":{\"candidatesTokenCount\":6,\"promptTokenCount\":7,\"totalTokenCount\":13}}\r\n\r\n",
        ),
    ] {
        let (path, body) = request(dialect, true);
        let (status, chunks, whole) = exchange(&fake, &path, &body).await;
        let text = text_of(&chunks);
        assert_eq!((status, whole), (StatusCode::OK, true), "{dialect}: {text}");
        assert!(text.contains(ending), "{dialect}: {text}");
        // Timed chunks: the stream takes at least five intervals, its first part long before.
        let (first, last) = (chunks[0].0, chunks[chunks.len() - 1].0);
        assert!(
            last - first >= Duration::from_millis(180),
            "{dialect}: {:?}",
            last - first
        );
        assert!(chunks.len() >= 6, "{dialect}: {} chunks", chunks.len());
    }
    let openai = text_of(
        &exchange(
            &fake,
            &request("openai", true).0,
            &request("openai", true).1,
        )
        .await
        .1,
    );
    assert!(openai.contains(r#""choices":[],"#) && openai.contains(r#""prompt_tokens":7"#));
    let mut without = request("openai", true).1;
    without.as_object_mut().unwrap().remove("stream_options");
    let text = text_of(
        &exchange(&fake, "/api/v1/chat/completions", &without)
            .await
            .1,
    );
    assert!(!text.contains("usage"), "{text}");
    assert_eq!(fake.text_first_chunks_sent().len(), 5);
}

#[tokio::test]
async fn a_stream_can_fail_midway_break_or_stall() {
    let fake = fake(|_| {}).await;
    fake.text_faults().inject(TextFault::ErrorAfter(2), 3);
    for (dialect, error) in [
        ("openai", "data: {\"error\":{\"code\":null,\"message\":"),
        (
            "anthropic",
            "event: error\ndata: {\"error\":{\"message\":\"Overloaded\",\"type\":\"overloaded_error\"},\"type\":\"error\"}\n\n",
        ),
        (
            "gemini",
            "data: {\"error\":{\"code\":500,\"message\":\"An internal error has occurred.\",\"status\":\"INTERNAL\"}}\r\n\r\n",
        ),
    ] {
        let (path, body) = request(dialect, true);
        let (_, chunks, whole) = exchange(&fake, &path, &body).await;
        let text = text_of(&chunks);
        assert!(
            whole && text.ends_with(error) || text.contains(error),
            "{dialect}: {text}"
        );
        assert!(
            !text.contains("usage\":{\"output") && !text.contains("[DONE]"),
            "{dialect}: {text}"
        );
    }
    fake.text_faults().inject(TextFault::CutAfter(3), 1);
    let (path, body) = request("anthropic", true);
    let (_, chunks, whole) = exchange(&fake, &path, &body).await;
    assert!(!whole, "a cut stream does not end cleanly");
    assert!(!text_of(&chunks).contains("message_stop"));

    fake.text_faults()
        .inject(TextFault::StallAfter(1, Duration::from_millis(400)), 1);
    let (path, body) = request("gemini", true);
    let (_, chunks, whole) = exchange(&fake, &path, &body).await;
    assert!(whole);
    let gap = chunks.windows(2).map(|w| w[1].0 - w[0].0).max().unwrap();
    assert!(gap >= Duration::from_millis(350), "{gap:?}");

    fake.text_faults().inject(TextFault::NoUsage, 1);
    let (path, body) = request("openai", false);
    let text = text_of(&exchange(&fake, &path, &body).await.1);
    assert!(!text.contains("usage"), "{text}");
    let outcomes: Vec<String> = fake
        .text_exchanges()
        .into_iter()
        .map(|e| e.outcome)
        .collect();
    assert_eq!(
        outcomes,
        ["error", "error", "error", "cut", "complete", "complete"]
    );
}

#[tokio::test]
async fn consumed_unknown_models_and_keys_are_answered_as_the_upstream_does() {
    let fake = fake(|config| config.text.report_consumed = true).await;
    let (path, body) = request("openai", false);
    let text = text_of(&exchange(&fake, &path, &body).await.1);
    // 7 × 2.00 / 1e6 + 6 × 10.00 / 1e6 = 0.000074
    assert!(text.contains(r#""consumed":"0.00007400""#), "{text}");
    let (status, chunks, _) = exchange(
        &fake,
        "/api/v1/chat/completions",
        &json!({"model": "openai/gpt-9", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        text_of(&chunks),
        r#"{"code":1,"message":"failed","detail":"unsupported model: openai/gpt-9"}"#
    );
    let unauthorized = reqwest::Client::new()
        .post(format!("{}/api/v1/messages", fake.base_url()))
        .bearer_auth("dk-wrong")
        .json(&request("anthropic", false).1)
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), StatusCode::UNAUTHORIZED);
    let (status, _, _) = exchange(
        &fake,
        "/api/v1beta/models/gemini-3.1-pro-preview:countTokens",
        &json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
