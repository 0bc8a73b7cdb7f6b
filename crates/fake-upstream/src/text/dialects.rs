//! The three text dialects as the fake speaks them: what it reads from a request, and its
//! answers, whole or as server-sent events, in each dialect's shapes (the contract's
//! "Synchronous text generation" table, in the forms the dialects' public clients parse).

use serde_json::{Value, json};

use ketchup_domain::credits::Credits;

/// Which API a text request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// `POST /api/v1/chat/completions`
    OpenAi,
    /// `POST /api/v1/messages`
    Anthropic,
    /// `POST /api/v1beta/models/{model}:generateContent` / `:streamGenerateContent`
    Gemini,
}

impl Dialect {
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::OpenAi => "openai",
            Dialect::Anthropic => "anthropic",
            Dialect::Gemini => "gemini",
        }
    }
}

/// What the fake takes from a text request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ask {
    pub model: String,
    pub stream: bool,
    /// OpenAI's `stream_options.include_usage`: the usage chunk before `[DONE]`.
    pub include_usage: bool,
    /// The request's own limit on output tokens, if it sets one.
    pub max_tokens: Option<u64>,
    /// The prompt's tokens: one per word of its text, four more per message for roles and turns.
    pub input_tokens: u64,
}

/// Reads a request; `Err` is a 400's detail. `path_model` and `streaming_path` are Gemini's,
/// from its path.
pub(crate) fn ask(
    dialect: Dialect,
    body: &Value,
    path_model: Option<&str>,
    streaming_path: bool,
) -> Result<Ask, String> {
    let body = body
        .as_object()
        .ok_or("request body must be a JSON object")?;
    let model = match path_model {
        Some(model) => model.to_owned(),
        None => body
            .get("model")
            .and_then(Value::as_str)
            .ok_or("model is required")?
            .to_owned(),
    };
    let number = |value: Option<&Value>| value.and_then(Value::as_u64);
    let (messages, max_tokens) = match dialect {
        Dialect::OpenAi => (
            body.get("messages"),
            number(body.get("max_completion_tokens")).or(number(body.get("max_tokens"))),
        ),
        Dialect::Anthropic => (body.get("messages"), number(body.get("max_tokens"))),
        Dialect::Gemini => (
            body.get("contents"),
            number(
                body.get("generationConfig")
                    .and_then(|config| config.get("maxOutputTokens")),
            ),
        ),
    };
    let messages = messages
        .and_then(Value::as_array)
        .filter(|messages| !messages.is_empty())
        .ok_or(match dialect {
            Dialect::Gemini => "contents is required",
            _ => "messages is required",
        })?;
    if dialect == Dialect::Anthropic && max_tokens.is_none() {
        return Err("max_tokens is required".into());
    }
    let system = body.get("system").or(body.get("systemInstruction"));
    let input_tokens = words(system) + messages.iter().map(|m| words(Some(m)) + 4).sum::<u64>();
    let stream = match dialect {
        Dialect::Gemini => streaming_path,
        _ => body.get("stream").and_then(Value::as_bool).unwrap_or(false),
    };
    let include_usage = body
        .get("stream_options")
        .and_then(|options| options.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(Ask {
        model,
        stream,
        include_usage,
        max_tokens,
        input_tokens,
    })
}

/// The words of every string under `value`, roles and part types included.
fn words(value: Option<&Value>) -> u64 {
    match value {
        Some(Value::String(text)) => text.split_whitespace().count() as u64,
        Some(Value::Array(items)) => items.iter().map(|item| words(Some(item))).sum(),
        Some(Value::Object(fields)) => fields.values().map(|field| words(Some(field))).sum(),
        _ => 0,
    }
}

/// The words the fake answers with, in order, one output token each.
const ANSWER: &[&str] = &[
    "Tomatoes", "ripen", "best", "in", "warm", "sun,", "then", "simmer", "slowly", "with",
    "vinegar", "and", "sugar", "until", "thick.",
];

/// The answer's words: `count` of them, cycling through [`ANSWER`].
pub(crate) fn answer_words(count: u64) -> Vec<String> {
    (0..count)
        .map(|i| ANSWER[(i % ANSWER.len() as u64) as usize].to_owned())
        .collect()
}

/// One word as a chunk of text: words after the first start with a space.
pub(crate) fn piece(index: usize, word: &str) -> String {
    if index == 0 {
        word.to_owned()
    } else {
        format!(" {word}")
    }
}

/// What an answer reports it used.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Usage {
    pub input: u64,
    pub output: u64,
    /// `consumed`, when the fake reports one.
    pub consumed: Option<Credits>,
    /// Whether the answer stopped at the request's limit.
    pub truncated: bool,
}

/// The whole answer, not streamed; `usage: None` leaves the usage out.
pub(crate) fn answer(
    dialect: Dialect,
    id: &str,
    model: &str,
    text: &str,
    usage: Option<Usage>,
) -> Value {
    let truncated = usage.is_some_and(|u| u.truncated);
    let mut body = match dialect {
        Dialect::OpenAi => json!({
            "id": format!("chatcmpl-{id}"),
            "object": "chat.completion",
            "created": 1_767_225_600,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": if truncated { "length" } else { "stop" },
            }],
        }),
        Dialect::Anthropic => json!({
            "id": format!("msg_{id}"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": if truncated { "max_tokens" } else { "end_turn" },
            "stop_sequence": null,
        }),
        Dialect::Gemini => json!({
            "candidates": [{
                "content": {"parts": [{"text": text}], "role": "model"},
                "finishReason": if truncated { "MAX_TOKENS" } else { "STOP" },
                "index": 0,
            }],
            "modelVersion": model,
            "responseId": id,
        }),
    };
    if let (Some(usage), Some(fields)) = (usage, body.as_object_mut()) {
        let (key, value) = usage_field(dialect, usage.input, usage.output);
        fields.insert(key.into(), value);
        if let Some(consumed) = usage.consumed {
            fields.insert("consumed".into(), json!(consumed.format_places(8)));
        }
    }
    body
}

/// The usage member of an answer in `dialect`.
fn usage_field(dialect: Dialect, input: u64, output: u64) -> (&'static str, Value) {
    match dialect {
        Dialect::OpenAi => (
            "usage",
            json!({"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output}),
        ),
        Dialect::Anthropic => (
            "usage",
            json!({"input_tokens": input, "output_tokens": output}),
        ),
        Dialect::Gemini => (
            "usageMetadata",
            json!({"promptTokenCount": input, "candidatesTokenCount": output, "totalTokenCount": input + output}),
        ),
    }
}

/// One server-sent event: `event:` (Anthropic names its events) and `data:`. Gemini ends its
/// events with CRLF pairs, as Google's servers do; the others with LF.
pub(crate) fn event(dialect: Dialect, name: Option<&str>, data: &Value) -> String {
    let end = if dialect == Dialect::Gemini {
        "\r\n\r\n"
    } else {
        "\n\n"
    };
    match name {
        Some(name) => format!("event: {name}\ndata: {data}{end}"),
        None => format!("data: {data}{end}"),
    }
}

/// The events a stream opens with, before the first word.
pub(crate) fn stream_start(
    dialect: Dialect,
    id: &str,
    model: &str,
    input: u64,
    usage: bool,
) -> Vec<String> {
    match dialect {
        Dialect::OpenAi => vec![event(
            dialect,
            None,
            &openai_chunk(id, model, json!({"role": "assistant", "content": ""}), None),
        )],
        Dialect::Anthropic => {
            let mut message = json!({
                "id": format!("msg_{id}"), "type": "message", "role": "assistant", "content": [],
                "model": model, "stop_reason": null, "stop_sequence": null,
            });
            if usage {
                message["usage"] = json!({"input_tokens": input, "output_tokens": 1});
            }
            vec![
                event(
                    dialect,
                    Some("message_start"),
                    &json!({"type": "message_start", "message": message}),
                ),
                event(
                    dialect,
                    Some("content_block_start"),
                    &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                ),
                event(dialect, Some("ping"), &json!({"type": "ping"})),
            ]
        }
        Dialect::Gemini => Vec::new(),
    }
}

/// The event carrying word `index`; Gemini's carries the usage so far on every chunk.
pub(crate) fn stream_piece(
    dialect: Dialect,
    id: &str,
    model: &str,
    index: usize,
    word: &str,
    usage: Option<(u64, u64)>,
) -> String {
    let text = piece(index, word);
    match dialect {
        Dialect::OpenAi => event(
            dialect,
            None,
            &openai_chunk(id, model, json!({"content": text}), None),
        ),
        Dialect::Anthropic => event(
            dialect,
            Some("content_block_delta"),
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
        ),
        Dialect::Gemini => {
            let mut chunk = json!({
                "candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}],
                "modelVersion": model,
                "responseId": id,
            });
            if let Some((input, output)) = usage {
                let (key, value) = usage_field(dialect, input, output);
                chunk[key] = value;
            }
            event(dialect, None, &chunk)
        }
    }
}

/// The events that end a complete stream: the stop reason, the usage (when reported and, for
/// chat completions, asked for) and the end marker.
pub(crate) fn stream_end(
    dialect: Dialect,
    id: &str,
    model: &str,
    usage: Option<Usage>,
    include_usage: bool,
) -> Vec<String> {
    let truncated = usage.is_some_and(|u| u.truncated);
    let consumed = |value: &mut Value| {
        if let Some(consumed) = usage.and_then(|u| u.consumed) {
            value["consumed"] = json!(consumed.format_places(8));
        }
    };
    match dialect {
        Dialect::OpenAi => {
            let reason = if truncated { "length" } else { "stop" };
            let mut events = vec![event(
                dialect,
                None,
                &openai_chunk(id, model, json!({}), Some(reason)),
            )];
            if let Some(usage) = usage.filter(|_| include_usage) {
                let mut chunk = openai_chunk(id, model, json!({}), None);
                chunk["choices"] = json!([]);
                chunk["usage"] = usage_field(dialect, usage.input, usage.output).1;
                consumed(&mut chunk);
                events.push(event(dialect, None, &chunk));
            }
            events.push("data: [DONE]\n\n".to_owned());
            events
        }
        Dialect::Anthropic => {
            let mut delta = json!({
                "type": "message_delta",
                "delta": {"stop_reason": if truncated { "max_tokens" } else { "end_turn" }, "stop_sequence": null},
            });
            if let Some(usage) = usage {
                delta["usage"] = json!({"output_tokens": usage.output});
                consumed(&mut delta);
            }
            vec![
                event(
                    dialect,
                    Some("content_block_stop"),
                    &json!({"type": "content_block_stop", "index": 0}),
                ),
                event(dialect, Some("message_delta"), &delta),
                event(
                    dialect,
                    Some("message_stop"),
                    &json!({"type": "message_stop"}),
                ),
            ]
        }
        Dialect::Gemini => {
            let mut chunk = json!({
                "candidates": [{
                    "content": {"parts": [{"text": ""}], "role": "model"},
                    "finishReason": if truncated { "MAX_TOKENS" } else { "STOP" },
                    "index": 0,
                }],
                "modelVersion": model,
                "responseId": id,
            });
            if let Some(usage) = usage {
                let (key, value) = usage_field(dialect, usage.input, usage.output);
                chunk[key] = value;
                consumed(&mut chunk);
            }
            vec![event(dialect, None, &chunk)]
        }
    }
}

/// How each dialect ends a stream that failed midway: chat completions with a `data:` event
/// holding an `error` object (which the OpenAI clients raise), messages with `event: error`,
/// Gemini with a chunk holding an `error` object in its API's error shape.
pub(crate) fn stream_error(dialect: Dialect) -> String {
    match dialect {
        Dialect::OpenAi => event(
            dialect,
            None,
            &json!({"error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": null, "code": null}}),
        ),
        Dialect::Anthropic => event(
            dialect,
            Some("error"),
            &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        ),
        Dialect::Gemini => event(
            dialect,
            None,
            &json!({"error": {"code": 500, "message": "An internal error has occurred.", "status": "INTERNAL"}}),
        ),
    }
}

fn openai_chunk(id: &str, model: &str, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion.chunk",
        "created": 1_767_225_600,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_dialects_model_limit_and_prompt() {
        let openai = json!({"model": "openai/gpt-5.2", "messages": [{"role": "user", "content": "say hi to me"}],
            "max_tokens": 5, "stream": true, "stream_options": {"include_usage": true}});
        let asked = ask(Dialect::OpenAi, &openai, None, false).unwrap();
        // "user" + 4 words + 4 for the message.
        assert_eq!(
            asked,
            Ask {
                model: "openai/gpt-5.2".into(),
                stream: true,
                include_usage: true,
                max_tokens: Some(5),
                input_tokens: 9,
            }
        );
        let anthropic = json!({"model": "m", "system": "be brief", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]});
        assert_eq!(
            ask(Dialect::Anthropic, &anthropic, None, false).unwrap_err(),
            "max_tokens is required"
        );
        let gemini = json!({"contents": [{"role": "user", "parts": [{"text": "hello there"}]}],
            "generationConfig": {"maxOutputTokens": 7}});
        let asked = ask(
            Dialect::Gemini,
            &gemini,
            Some("gemini-3.1-pro-preview"),
            true,
        )
        .unwrap();
        assert_eq!(
            (
                asked.model.as_str(),
                asked.stream,
                asked.max_tokens,
                asked.input_tokens
            ),
            ("gemini-3.1-pro-preview", true, Some(7), 7)
        );
        assert!(ask(Dialect::Gemini, &json!({}), Some("g"), false).is_err());
    }

    #[test]
    fn streams_end_the_way_each_dialect_ends_them() {
        let usage = Usage {
            input: 3,
            output: 2,
            consumed: None,
            truncated: false,
        };
        let end = stream_end(Dialect::OpenAi, "1", "m", Some(usage), true).concat();
        assert!(
            end.contains(r#""usage":{"completion_tokens":2,"prompt_tokens":3,"total_tokens":5}"#),
            "{end}"
        );
        assert!(end.ends_with("data: [DONE]\n\n"));
        let without = stream_end(Dialect::OpenAi, "1", "m", Some(usage), false).concat();
        assert!(!without.contains("usage"));
        let gemini = stream_piece(Dialect::Gemini, "1", "m", 1, "w", Some((3, 2)));
        assert!(gemini.starts_with(r#"data: {"candidates":[{"content":{"parts":[{"text":" w"}]"#));
        assert!(gemini.ends_with("\r\n\r\n"));
        assert!(stream_error(Dialect::Anthropic).starts_with("event: error\ndata: {"));
    }
}
