//! What the gateway knows of each text dialect: where a request names its model and limits its
//! output, how to ask a chat completion stream for its usage, where each answer reports its
//! usage, and how each dialect ends a stream that failed.

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::error::ErrorShape;
use ketchup_domain::body::{check_case, check_unique_keys};

/// The API a text request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `POST /api/v1/chat/completions`
    OpenAi,
    /// `POST /api/v1/messages`
    Anthropic,
    /// `POST /api/v1beta/models/{model}:generateContent` and `:streamGenerateContent`
    Gemini,
}

impl Dialect {
    /// The `dialect` label of the text metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::OpenAi => "openai",
            Dialect::Anthropic => "anthropic",
            Dialect::Gemini => "gemini",
        }
    }

    pub fn error_shape(self) -> ErrorShape {
        match self {
            Dialect::OpenAi => ErrorShape::OpenAi,
            Dialect::Anthropic => ErrorShape::Anthropic,
            Dialect::Gemini => ErrorShape::Gemini,
        }
    }

    /// The event that ends a stream which failed midway, as the dialect's own servers end one
    /// and its public clients raise it: chat completions a `data:` event holding an `error`
    /// object (the OpenAI clients raise on it), messages an `event: error` (the Anthropic
    /// clients' `error` event), Gemini a chunk holding an `error` object in its API's error
    /// shape (the Google clients raise on it).
    pub fn stream_error(self, what: &str) -> Bytes {
        use serde_json::json;
        let text = match self {
            Dialect::OpenAi => format!(
                "data: {}\n\n",
                json!({"error": {"message": what, "type": "server_error", "param": null, "code": null}})
            ),
            Dialect::Anthropic => format!(
                "event: error\ndata: {}\n\n",
                json!({"type": "error", "error": {"type": "api_error", "message": what}})
            ),
            Dialect::Gemini => format!(
                "data: {}\r\n\r\n",
                json!({"error": {"code": 502, "message": what, "status": "UNAVAILABLE"}})
            ),
        };
        Bytes::from(text)
    }
}

/// What the gateway takes from a text request; the rest goes to the upstream untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextAsk {
    pub model: String,
    pub stream: bool,
    /// The request's own limit on output tokens.
    pub output_limit: Option<u64>,
    /// Chat completions streamed without `stream_options.include_usage`: the gateway asks for
    /// the usage chunk itself and leaves it out of what the client receives.
    pub add_usage_chunk: bool,
}

/// The fields the gateway reads, per dialect: a case variant of one of them (`Model`,
/// `MAX_TOKENS`) is refused, as the upstream might read it instead.
fn fields_read(dialect: Dialect) -> &'static [&'static str] {
    match dialect {
        Dialect::OpenAi => &[
            "model",
            "stream",
            "stream_options",
            "max_tokens",
            "max_completion_tokens",
        ],
        Dialect::Anthropic => &["model", "stream", "max_tokens"],
        Dialect::Gemini => &["generationConfig"],
    }
}

/// Reads a text request. `path` is Gemini's model and whether its path streams; `Err` is a
/// 400's detail.
pub fn read(
    dialect: Dialect,
    body: &[u8],
    path: Option<(&str, bool)>,
) -> Result<(TextAsk, Map<String, Value>), String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("request body is not valid JSON: {e}"))?;
    // The body is forwarded as sent, so it must mean to the upstream what it means here.
    check_unique_keys(body)?;
    let Value::Object(fields) = value else {
        return Err("request body must be a JSON object".into());
    };
    check_case(&fields, fields_read(dialect).iter().copied())?;
    let limit = |value: Option<&Value>, name: &str| -> Result<Option<u64>, String> {
        match value {
            None | Some(Value::Null) => Ok(None),
            Some(value) => value
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("{name} must be a whole number of tokens")),
        }
    };
    let flag = |name: &str| -> Result<bool, String> {
        match fields.get(name) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(flag)) => Ok(*flag),
            Some(_) => Err(format!("{name} must be true or false")),
        }
    };
    let (model, stream) = match path {
        Some((model, stream)) => (model.to_owned(), stream),
        None => match fields.get("model") {
            Some(Value::String(model)) if !model.trim().is_empty() => {
                (model.clone(), flag("stream")?)
            }
            Some(Value::String(_)) | None => return Err("model is required".into()),
            Some(_) => return Err("model must be a string".into()),
        },
    };
    let output_limit = match dialect {
        // The newer name wins where both are sent, as OpenAI documents it.
        Dialect::OpenAi => limit(fields.get("max_completion_tokens"), "max_completion_tokens")?
            .or(limit(fields.get("max_tokens"), "max_tokens")?),
        Dialect::Anthropic => limit(fields.get("max_tokens"), "max_tokens")?,
        Dialect::Gemini => match fields.get("generationConfig") {
            Some(Value::Object(config)) => {
                check_case(config, ["maxOutputTokens"])?;
                limit(
                    config.get("maxOutputTokens"),
                    "generationConfig.maxOutputTokens",
                )?
            }
            None | Some(Value::Null) => None,
            Some(_) => return Err("generationConfig must be an object".into()),
        },
    };
    let add_usage_chunk = dialect == Dialect::OpenAi
        && stream
        && !fields
            .get("stream_options")
            .and_then(|options| options.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
    let ask = TextAsk {
        model,
        stream,
        output_limit,
        add_usage_chunk,
    };
    Ok((ask, fields))
}

/// The body that asks a chat completion stream for its usage chunk: the client's bytes with
/// `"stream_options":{"include_usage":true},` put first in the object, or, when the client sent
/// `stream_options` of its own, the object written out again with `include_usage` set in it.
pub fn with_usage_chunk(body: Bytes, mut fields: Map<String, Value>) -> Bytes {
    if !fields.contains_key("stream_options") {
        let open = body
            .iter()
            .position(|&byte| byte == b'{')
            .expect("the body is a JSON object");
        let mut added = Vec::with_capacity(body.len() + 40);
        added.extend_from_slice(&body[..=open]);
        added.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
        added.extend_from_slice(&body[open + 1..]);
        return added.into();
    }
    if let Some(Value::Object(options)) = fields.get_mut("stream_options") {
        options.insert("include_usage".into(), Value::Bool(true));
    } else {
        fields.insert(
            "stream_options".into(),
            serde_json::json!({"include_usage": true}),
        );
    }
    serde_json::to_vec(&fields)
        .expect("a JSON object serialises")
        .into()
}

/// What an answer has reported of its usage so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: Option<u64>,
    pub output: Option<u64>,
    /// Set when the usage reported is the answer's final count (not a running one, such as the
    /// output of Anthropic's `message_start` or Gemini's chunks before the last).
    pub final_count: bool,
}

impl Usage {
    /// Both counts, once final.
    pub fn tokens(&self) -> Option<(u64, u64)> {
        match (self.final_count, self.input, self.output) {
            (true, Some(input), Some(output)) => Some((input, output)),
            _ => None,
        }
    }
}

/// What one JSON document of an answer (a whole body, or one event's data) says.
#[derive(Debug, Default)]
pub struct Observed {
    /// The chat completion usage chunk (`choices` empty, `usage` set), which the gateway leaves
    /// out when it asked for it.
    pub usage_chunk: bool,
    /// The upstream ended the answer with an error.
    pub error: bool,
    /// `consumed`, as written.
    pub consumed: Option<Value>,
}

fn count(value: Option<&Value>) -> Option<u64> {
    value.and_then(Value::as_u64)
}

/// Reads the usage in one JSON document of a `dialect` answer into `usage`. `whole` is set for
/// a complete answer body (not an event), whose usage is final wherever it is.
pub fn observe(dialect: Dialect, document: &Value, whole: bool, usage: &mut Usage) -> Observed {
    let mut seen = Observed {
        consumed: document.get("consumed").cloned(),
        ..Observed::default()
    };
    match dialect {
        Dialect::OpenAi => {
            seen.error = document.get("error").is_some_and(|e| !e.is_null());
            if let Some(reported) = document.get("usage").filter(|u| u.is_object()) {
                usage.input = count(reported.get("prompt_tokens")).or(usage.input);
                usage.output = count(reported.get("completion_tokens")).or(usage.output);
                usage.final_count = true;
                seen.usage_chunk = document
                    .get("choices")
                    .and_then(Value::as_array)
                    .is_some_and(Vec::is_empty);
            }
        }
        Dialect::Anthropic => {
            let kind = document.get("type").and_then(Value::as_str);
            seen.error = kind == Some("error");
            let reported = match kind {
                Some("message_start") => document.get("message").and_then(|m| m.get("usage")),
                _ => document.get("usage"),
            };
            if let Some(reported) = reported {
                // Cache writes and reads are input tokens too, reported apart from the rest.
                let input = [
                    "input_tokens",
                    "cache_creation_input_tokens",
                    "cache_read_input_tokens",
                ]
                .iter()
                .filter_map(|key| count(reported.get(*key)))
                .reduce(|a, b| a + b);
                usage.input = input.or(usage.input);
                usage.output = count(reported.get("output_tokens")).or(usage.output);
                // `message_start` counts the output so far; `message_delta` (and a whole
                // message) the final one.
                usage.final_count = whole || kind == Some("message_delta");
            }
        }
        Dialect::Gemini => {
            // A whole answer of `:streamGenerateContent` without `alt=sse` is an array of chunks.
            if let Some(chunks) = document.as_array() {
                for chunk in chunks {
                    let inner = observe(dialect, chunk, whole, usage);
                    seen.error |= inner.error;
                    seen.consumed = inner.consumed.or(seen.consumed);
                }
                return seen;
            }
            seen.error = document.get("error").is_some_and(|e| !e.is_null());
            if let Some(reported) = document.get("usageMetadata") {
                usage.input = count(reported.get("promptTokenCount")).or(usage.input);
                // Thinking is billed as output.
                let output = ["candidatesTokenCount", "thoughtsTokenCount"]
                    .iter()
                    .filter_map(|key| count(reported.get(*key)))
                    .reduce(|a, b| a + b);
                usage.output = output.or(usage.output);
                let finished = document
                    .get("candidates")
                    .and_then(Value::as_array)
                    .is_some_and(|c| c.iter().any(|c| c.get("finishReason").is_some()));
                usage.final_count = whole || finished;
            }
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_model_stream_and_output_limit_per_dialect() {
        let (ask, _) = read(
            Dialect::OpenAi,
            br#"{"model":"openai/gpt-5.2","messages":[],"max_tokens":50,"max_completion_tokens":70,"stream":true}"#,
            None,
        )
        .unwrap();
        assert_eq!(
            ask,
            TextAsk {
                model: "openai/gpt-5.2".into(),
                stream: true,
                output_limit: Some(70),
                add_usage_chunk: true,
            }
        );
        let (ask, _) = read(
            Dialect::OpenAi,
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
            None,
        )
        .unwrap();
        assert!(!ask.add_usage_chunk);
        let (ask, _) = read(
            Dialect::Gemini,
            br#"{"contents":[],"generationConfig":{"maxOutputTokens":9}}"#,
            Some(("gemini-3.1-pro-preview", true)),
        )
        .unwrap();
        assert_eq!(
            (ask.model.as_str(), ask.stream, ask.output_limit),
            ("gemini-3.1-pro-preview", true, Some(9))
        );
        for (dialect, body, error) in [
            (Dialect::OpenAi, r#"{"messages":[]}"#, "model is required"),
            (Dialect::OpenAi, r#"{"model":7}"#, "model must be a string"),
            (
                Dialect::Anthropic,
                r#"{"model":"m","max_tokens":-1}"#,
                "max_tokens must be a whole number of tokens",
            ),
            (
                Dialect::Anthropic,
                r#"{"model":"m","stream":"yes"}"#,
                "stream must be true or false",
            ),
            (
                Dialect::Anthropic,
                r#"{"model":"m","Max_Tokens":5}"#,
                r#""Max_Tokens" differs from "max_tokens" only in case"#,
            ),
            (
                Dialect::OpenAi,
                r#"{"model":"m","model":"n"}"#,
                r#"duplicate key "model" in the request body"#,
            ),
            (Dialect::OpenAi, "[]", "request body must be a JSON object"),
        ] {
            let refused = read(dialect, body.as_bytes(), None).unwrap_err();
            assert!(refused.starts_with(error), "{body}: {refused}");
        }
    }

    #[test]
    fn asks_for_the_usage_chunk_keeping_the_clients_bytes() {
        let body = Bytes::from_static(br#" {"model":"m", "stream":true}"#);
        let (_, fields) = read(Dialect::OpenAi, &body, None).unwrap();
        assert_eq!(
            with_usage_chunk(body, fields),
            Bytes::from_static(
                br#" {"stream_options":{"include_usage":true},"model":"m", "stream":true}"#
            )
        );
        let body = Bytes::from_static(
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"x":1}}"#,
        );
        let (_, fields) = read(Dialect::OpenAi, &body, None).unwrap();
        let rewritten: Value = serde_json::from_slice(&with_usage_chunk(body, fields)).unwrap();
        assert_eq!(
            rewritten["stream_options"],
            json!({"include_usage": true, "x": 1})
        );
    }

    #[test]
    fn usage_is_final_only_where_each_dialect_makes_it_so() {
        let mut usage = Usage::default();
        let start = json!({"type":"message_start","message":{"usage":{"input_tokens":10,"cache_read_input_tokens":5,"output_tokens":1}}});
        observe(Dialect::Anthropic, &start, false, &mut usage);
        assert_eq!(usage.tokens(), None);
        observe(
            Dialect::Anthropic,
            &json!({"type":"message_delta","usage":{"output_tokens":7}}),
            false,
            &mut usage,
        );
        assert_eq!(usage.tokens(), Some((15, 7)));
        assert!(
            observe(
                Dialect::Anthropic,
                &json!({"type":"error","error":{}}),
                false,
                &mut usage
            )
            .error
        );

        let mut usage = Usage::default();
        let chunk = |finished: bool| {
            let mut candidate = json!({"content":{"parts":[{"text":"x"}]}});
            if finished {
                candidate["finishReason"] = json!("STOP");
            }
            json!({"candidates":[candidate],"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":2,"thoughtsTokenCount":3}})
        };
        observe(Dialect::Gemini, &chunk(false), false, &mut usage);
        assert_eq!(usage.tokens(), None);
        observe(Dialect::Gemini, &chunk(true), false, &mut usage);
        assert_eq!(usage.tokens(), Some((4, 5)));
        let mut whole = Usage::default();
        observe(
            Dialect::Gemini,
            &json!([chunk(false), chunk(false)]),
            true,
            &mut whole,
        );
        assert_eq!(whole.tokens(), Some((4, 5)));

        let mut usage = Usage::default();
        let seen = observe(
            Dialect::OpenAi,
            &json!({"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2},"consumed":"0.01"}),
            false,
            &mut usage,
        );
        assert!(seen.usage_chunk);
        assert_eq!(seen.consumed, Some(json!("0.01")));
        assert_eq!(usage.tokens(), Some((3, 2)));
        let content = observe(
            Dialect::OpenAi,
            &json!({"choices":[{"delta":{}}],"usage":null}),
            false,
            &mut usage,
        );
        assert!(!content.usage_chunk);
    }
}
