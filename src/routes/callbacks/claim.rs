//! What a callback claims: its task id, status and `consumed`, read as its body streams in.
//!
//! The rest of the payload (the result, whose images may be base64 data URIs of many megabytes)
//! is checked to be JSON and dropped as it passes: the gateway delivers the upstream's confirmed
//! state, never the callback's bytes, so it keeps none of them. The parser runs on a blocking
//! thread reading the chunks hyper hands over through a short queue, so a callback of
//! `max_callback_bytes` costs a few read buffers, and the HTTP worker is not held up by it.

use std::fmt;
use std::io::{self, BufReader, Read};

use axum::body::{Body, HttpBody};
use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use tokio::sync::mpsc;

use crate::error::GatewayError;
use ketchup_domain::settlement::Consumed;

/// Chunks read from the socket but not yet parsed: the backpressure that bounds a callback's
/// memory to a few of hyper's read buffers.
const CHUNKS_QUEUED: usize = 4;
/// What the parser reads at once from the chunks.
const PARSE_BUFFER: usize = 64 * 1024;

/// The fields of a callback payload the gateway reads; every other field is skipped unbuilt.
#[derive(Debug, serde::Deserialize)]
pub struct Claim {
    pub task_id: String,
    pub status: String,
    #[serde(default)]
    pub consumed: Claimed,
}

/// `consumed` as the callback gives it, read without building whatever value it holds.
#[derive(Debug, PartialEq, Eq)]
pub struct Claimed(pub Consumed);

impl Default for Claimed {
    fn default() -> Self {
        Claimed(Consumed::Missing)
    }
}

impl<'de> Deserialize<'de> for Claimed {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Amount;
        impl<'de> Visitor<'de> for Amount {
            type Value = Claimed;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an amount")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Claimed, E> {
                Ok(Claimed(Consumed::from_text(text)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Claimed, E> {
                Ok(Claimed(Consumed::Missing))
            }
            fn visit_bool<E: de::Error>(self, value: bool) -> Result<Claimed, E> {
                Ok(Claimed(Consumed::untrusted(&value.to_string())))
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<Claimed, E> {
                Ok(Claimed(Consumed::untrusted(&value.to_string())))
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Claimed, E> {
                Ok(Claimed(Consumed::untrusted(&value.to_string())))
            }
            fn visit_f64<E: de::Error>(self, value: f64) -> Result<Claimed, E> {
                Ok(Claimed(Consumed::untrusted(&value.to_string())))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Claimed, A::Error> {
                while items.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Claimed(Consumed::untrusted("an array")))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<Claimed, A::Error> {
                while entries.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Claimed(Consumed::untrusted("an object")))
            }
        }
        deserializer.deserialize_any(Amount)
    }
}

/// Reads `body` for its claim, refusing it as soon as it passes `limit` bytes (before reading
/// any of it when its `Content-Length` already does), and refusing anything but one JSON object
/// with a string `task_id` and `status`, each field at most once.
pub async fn read(body: Body, limit: usize) -> Result<Claim, GatewayError> {
    if body.size_hint().lower() > limit as u64 {
        return Err(GatewayError::PayloadTooLarge { limit });
    }
    let (chunks, queued) = mpsc::channel(CHUNKS_QUEUED);
    let parser = tokio::task::spawn_blocking(move || {
        let reader = BufReader::with_capacity(
            PARSE_BUFFER,
            Chunks {
                queued,
                current: Bytes::new(),
            },
        );
        serde_json::from_reader::<_, Claim>(reader)
    });
    let mut body = body;
    let mut received = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            GatewayError::InvalidRequest(format!("could not read the request body: {e}"))
        })?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        received = received.saturating_add(chunk.len());
        if received > limit {
            // Dropping the queue ends the parser's input: it stops at once.
            return Err(GatewayError::PayloadTooLarge { limit });
        }
        if chunks.send(chunk).await.is_err() {
            // The parser has stopped before the end: the body is not what it must be.
            break;
        }
    }
    drop(chunks);
    match parser.await {
        Ok(Ok(claim)) => Ok(claim),
        Ok(Err(e)) => Err(GatewayError::InvalidRequest(format!(
            "a callback must be a JSON object with a task_id and a final status (success or \
             failed): {e}"
        ))),
        Err(e) => Err(GatewayError::Internal(format!(
            "the callback parser stopped: {e}"
        ))),
    }
}

/// The body's chunks as the parser reads them; the end of the queue is the end of the body.
struct Chunks {
    queued: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.queued.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use hyper::body::Frame;

    use super::*;
    use ketchup_domain::credits::Credits;

    /// A body that arrives in the given chunks, with no `Content-Length`.
    struct Chunked(VecDeque<Bytes>);

    impl HttpBody for Chunked {
        type Data = Bytes;
        type Error = io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
            Poll::Ready(self.0.pop_front().map(|chunk| Ok(Frame::data(chunk))))
        }
    }

    async fn claim_of(chunks: &[&[u8]], limit: usize) -> Result<Claim, GatewayError> {
        let chunks = chunks.iter().map(|c| Bytes::copy_from_slice(c)).collect();
        read(Body::new(Chunked(chunks)), limit).await
    }

    async fn claim(body: &str) -> Result<Claim, GatewayError> {
        claim_of(&[body.as_bytes()], 1 << 20).await
    }

    const PAYLOAD: &str = r#"{"result":[{"image":"data:image/png;base64,iVBORw0K\"x"}],"status":"success","task_id":"ta1","consumed":"0.500000","status_reason":{"message":null},"new":{"a":[1,2.5,true]}}"#;

    #[tokio::test]
    async fn reads_the_claim_wherever_the_chunks_split_it() {
        let bytes = PAYLOAD.as_bytes();
        for at in 0..=bytes.len() {
            let claim = claim_of(&[&bytes[..at], &bytes[at..]], 1 << 20)
                .await
                .unwrap_or_else(|e| panic!("split at {at}: {e}"));
            assert_eq!(claim.task_id, "ta1");
            assert_eq!(claim.status, "success");
            assert_eq!(
                claim.consumed,
                Claimed(Consumed::Exact(Credits::from_units(50_000_000)))
            );
        }
        let byte_by_byte: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(
            claim_of(&byte_by_byte, 1 << 20).await.unwrap().task_id,
            "ta1"
        );
    }

    #[tokio::test]
    async fn amounts_of_any_kind_are_read_without_building_them() {
        let consumed = |value: &str| {
            let body = format!(r#"{{"task_id":"t","status":"failed","consumed":{value}}}"#);
            async move { claim(&body).await.unwrap().consumed.0 }
        };
        assert_eq!(consumed("null").await, Consumed::Missing);
        assert_eq!(
            consumed(r#""0.000000""#).await,
            Consumed::Exact(Credits::ZERO)
        );
        assert_eq!(consumed(r#""-1""#).await, Consumed::Malformed("-1".into()));
        assert_eq!(consumed("0.5").await, Consumed::Malformed("0.5".into()));
        assert_eq!(
            consumed("[1,[2]]").await,
            Consumed::Malformed("an array".into())
        );
        assert_eq!(
            consumed(r#"{"a":1}"#).await,
            Consumed::Malformed("an object".into())
        );
        let missing = claim(r#"{"task_id":"t","status":"failed"}"#).await.unwrap();
        assert_eq!(missing.consumed.0, Consumed::Missing);
    }

    #[tokio::test]
    async fn anything_but_one_object_with_each_field_once_is_malformed() {
        for body in [
            "",
            "{\"task_id\": ",
            "[]",
            r#"{"status":"success"}"#,
            r#"{"task_id":"t"}"#,
            r#"{"task_id":1,"status":"success"}"#,
            r#"{"task_id":"t","status":["success"]}"#,
            r#"{"task_id":"t","status":"success","status":"failed"}"#,
            r#"{"task_id":"t","status":"success","consumed":"1","consumed":"0"}"#,
            r#"{"task_id":"t","status":"success"} {}"#,
            r#"{"task_id":"t","status":"success","result":[}"#,
        ] {
            let refused = claim(body).await.unwrap_err();
            assert!(
                matches!(refused, GatewayError::InvalidRequest(_)),
                "{body}: {refused:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_body_past_the_limit_is_refused_even_as_good_json() {
        let limit = PAYLOAD.len() - 1;
        let bytes = PAYLOAD.as_bytes();
        let refused = claim_of(&[&bytes[..10], &bytes[10..]], limit)
            .await
            .unwrap_err();
        assert!(matches!(refused, GatewayError::PayloadTooLarge { limit: l } if l == limit));
        assert!(claim_of(&[bytes], PAYLOAD.len()).await.is_ok());
        // Declared too long: refused unread.
        let declared = read(Body::from(PAYLOAD), limit).await.unwrap_err();
        assert!(matches!(declared, GatewayError::PayloadTooLarge { .. }));
    }

    #[tokio::test]
    async fn a_result_of_many_megabytes_streams_through() {
        let image = "A".repeat(8 << 20);
        let body = format!(
            r#"{{"result":[{{"image":"data:image/png;base64,{image}"}}],"status":"success","task_id":"big","consumed":"0.1"}}"#
        );
        let chunks: Vec<&[u8]> = body.as_bytes().chunks(16 * 1024).collect();
        let claim = claim_of(&chunks, 9 << 20).await.unwrap();
        assert_eq!(claim.task_id, "big");
    }
}
