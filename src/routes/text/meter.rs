//! The body of a text answer on its way to the client: passed through chunk by chunk as it
//! arrives, its usage read as it passes, and its cost settled once when it ends, however it ends.
//!
//! A streamed answer (`text/event-stream`) is split into server-sent events by a small splitter
//! that keeps only the event being read (bounded by [`MAX_EVENT_BYTES`]); each chunk is handed on
//! as it came, except for a chat completion whose usage chunk the gateway asked for itself: then
//! events are handed on as each completes, and that one is left out. A whole answer (JSON) is
//! handed on as it arrives too, and a copy of it (up to [`MAX_WHOLE_BYTES`]) read at its end.
//!
//! The upstream may go [`UpstreamClient::idle_timeout`](crate::upstream::UpstreamClient) between
//! chunks, not longer: a long answer is no error, a silent one is. A stream that fails (the
//! upstream breaks it, reports an error, or falls silent) ends with the dialect's error event;
//! a client that leaves drops this body, which drops the upstream request.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use hyper::body::Incoming;
use serde_json::Value;

use super::dialect::{Dialect, Usage, observe};
use super::settle::{Charge, End, Settle};

/// Longest server-sent event read for its usage; a longer one passes unread.
pub const MAX_EVENT_BYTES: usize = 1 << 20;
/// Longest whole answer read for its usage; a longer one passes unread (charged its
/// reservation).
pub const MAX_WHOLE_BYTES: usize = 16 << 20;

/// Splits server-sent events out of bytes as they pass (lines end in LF, CRLF or CR; an empty
/// line ends an event), keeping only the `data:` of the event being read.
#[derive(Debug, Default)]
pub struct EventSplitter {
    line: Vec<u8>,
    data: Vec<u8>,
    /// The event being read passed [`MAX_EVENT_BYTES`]: it is not read.
    oversized: bool,
    /// The last byte was a CR: an LF right after it ends nothing more.
    after_cr: bool,
}

/// One event found in a chunk: where it ends in the chunk, and its data (`None` when too long).
#[derive(Debug, PartialEq, Eq)]
pub struct Split {
    pub end: usize,
    pub data: Option<Vec<u8>>,
}

impl EventSplitter {
    /// The events that end in `chunk`, in order. An LF that completes a CRLF ending an event is
    /// counted in that event.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Split> {
        let mut events = Vec::new();
        for (at, &byte) in chunk.iter().enumerate() {
            let after_cr = std::mem::replace(&mut self.after_cr, byte == b'\r');
            if byte == b'\n' && after_cr {
                if let Some(last) = events.last_mut().filter(|e: &&mut Split| e.end == at) {
                    last.end = at + 1;
                }
                continue;
            }
            if byte != b'\n' && byte != b'\r' {
                if self.line.len() < MAX_EVENT_BYTES {
                    self.line.push(byte);
                } else {
                    self.oversized = true;
                }
                continue;
            }
            if self.line.is_empty() {
                let data = std::mem::take(&mut self.data);
                let oversized = std::mem::take(&mut self.oversized);
                events.push(Split {
                    end: at + 1,
                    data: (!oversized).then_some(data),
                });
                continue;
            }
            if let Some(value) = self.line.strip_prefix(b"data:") {
                let value = value.strip_prefix(b" ").unwrap_or(value);
                if self.data.len() + value.len() + 1 > MAX_EVENT_BYTES {
                    self.oversized = true;
                } else {
                    if !self.data.is_empty() {
                        self.data.push(b'\n');
                    }
                    self.data.extend_from_slice(value);
                }
            }
            self.line.clear();
        }
        events
    }
}

/// How an answer's bytes are read.
#[derive(Debug)]
enum Mode {
    /// Server-sent events; `drop_usage_chunk` when the gateway asked for the usage chunk.
    Events { drop_usage_chunk: bool },
    /// One JSON document, read whole at its end.
    Whole,
}

/// What is learnt of an answer as it passes.
struct Meter {
    dialect: Dialect,
    mode: Mode,
    splitter: EventSplitter,
    /// The bytes of the event being read, while events are handed on whole.
    held: Vec<u8>,
    /// The event being read was too long to hold: the rest of it passes as it comes.
    passing: bool,
    /// A copy of a whole answer, up to [`MAX_WHOLE_BYTES`].
    whole: Vec<u8>,
    whole_too_long: bool,
    usage: Usage,
    consumed: Option<Value>,
    upstream_error: bool,
}

impl Meter {
    /// Takes in one chunk and puts what the client gets of it in `out`.
    fn feed(&mut self, chunk: Bytes, out: &mut VecDeque<Bytes>) {
        match self.mode {
            Mode::Whole => {
                if self.whole.len() + chunk.len() <= MAX_WHOLE_BYTES {
                    self.whole.extend_from_slice(&chunk);
                } else {
                    self.whole_too_long = true;
                    self.whole = Vec::new();
                }
                out.push_back(chunk);
            }
            Mode::Events {
                drop_usage_chunk: false,
            } => {
                for split in self.splitter.push(&chunk) {
                    self.read_event(split.data.as_deref());
                }
                out.push_back(chunk);
            }
            Mode::Events {
                drop_usage_chunk: true,
            } => {
                let mut start = 0;
                for split in self.splitter.push(&chunk) {
                    let rest = chunk.slice(start..split.end);
                    start = split.end;
                    let usage_chunk = self.read_event(split.data.as_deref());
                    if std::mem::take(&mut self.passing) {
                        out.push_back(rest);
                        continue;
                    }
                    let mut event = std::mem::take(&mut self.held);
                    if !usage_chunk {
                        event.extend_from_slice(&rest);
                        out.push_back(event.into());
                    }
                }
                let rest = &chunk[start..];
                if self.passing {
                    out.push_back(chunk.slice(start..));
                } else if self.held.len() + rest.len() > MAX_EVENT_BYTES {
                    // Too long to be the usage chunk: it goes on as it is.
                    let mut held = std::mem::take(&mut self.held);
                    held.extend_from_slice(rest);
                    out.push_back(held.into());
                    self.passing = true;
                } else {
                    self.held.extend_from_slice(rest);
                }
            }
        }
    }

    /// Reads one event's data; `true` for the chat completion usage chunk.
    fn read_event(&mut self, data: Option<&[u8]>) -> bool {
        let Some(document) = data
            .filter(|data| data.first() == Some(&b'{') || data.first() == Some(&b'['))
            .and_then(|data| serde_json::from_slice::<Value>(data).ok())
        else {
            return false;
        };
        let seen = observe(self.dialect, &document, false, &mut self.usage);
        self.upstream_error |= seen.error;
        self.consumed = seen.consumed.or(self.consumed.take());
        seen.usage_chunk
    }

    /// The end of the upstream's bytes: what is still held goes to the client, and a whole
    /// answer is read.
    fn finish(&mut self, out: &mut VecDeque<Bytes>) {
        if !self.held.is_empty() {
            out.push_back(std::mem::take(&mut self.held).into());
        }
        if matches!(self.mode, Mode::Whole) && !self.whole_too_long {
            if let Ok(document) = serde_json::from_slice::<Value>(&self.whole) {
                let seen = observe(self.dialect, &document, true, &mut self.usage);
                self.upstream_error |= seen.error;
                self.consumed = seen.consumed;
            }
            self.whole = Vec::new();
        }
    }

    fn charge(&self, end: End) -> Charge {
        let end = match end {
            End::Complete if self.upstream_error => End::UpstreamError,
            end => end,
        };
        Charge {
            end,
            tokens: self.usage.tokens(),
            consumed: self.consumed.clone(),
        }
    }
}

/// The client's body of a text answer (see the module's documentation).
pub struct MeteredBody {
    upstream: Option<Incoming>,
    idle: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    meter: Meter,
    out: VecDeque<Bytes>,
    /// Settles the answer's cost; taken when it does, so it settles once.
    settle: Option<Settle>,
    /// A whole answer that broke: the client's body breaks too, after what came.
    broken: bool,
}

impl MeteredBody {
    pub fn new(
        upstream: Incoming,
        dialect: Dialect,
        event_stream: bool,
        drop_usage_chunk: bool,
        idle: Duration,
        settle: Settle,
    ) -> Self {
        let mode = if event_stream {
            Mode::Events { drop_usage_chunk }
        } else {
            Mode::Whole
        };
        MeteredBody {
            upstream: Some(upstream),
            idle,
            timer: None,
            meter: Meter {
                dialect,
                mode,
                splitter: EventSplitter::default(),
                held: Vec::new(),
                passing: false,
                whole: Vec::new(),
                whole_too_long: false,
                usage: Usage::default(),
                consumed: None,
                upstream_error: false,
            },
            out: VecDeque::new(),
            settle: Some(settle),
            broken: false,
        }
    }

    /// The upstream's part is over: hand on what is held, close a failed stream the dialect's
    /// way, and settle.
    fn end(&mut self, end: End) {
        self.upstream = None;
        self.timer = None;
        self.meter.finish(&mut self.out);
        if end != End::Complete {
            match self.meter.mode {
                Mode::Events { .. } if !self.meter.upstream_error => {
                    self.out
                        .push_back(self.meter.dialect.stream_error(end.describe()));
                }
                Mode::Events { .. } => {}
                Mode::Whole => self.broken = true,
            }
        }
        if let Some(settle) = self.settle.take() {
            settle.run(self.meter.charge(end));
        }
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(bytes) = this.out.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            let Some(upstream) = this.upstream.as_mut() else {
                return Poll::Ready(
                    std::mem::take(&mut this.broken)
                        .then(|| Err("the upstream's answer broke off".into())),
                );
            };
            match Pin::new(upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    this.timer = None;
                    if let Ok(data) = frame.into_data() {
                        this.meter.feed(data, &mut this.out);
                    }
                }
                Poll::Ready(Some(Err(error))) => {
                    tracing::warn!(%error, "a text answer broke off upstream");
                    this.end(End::UpstreamError);
                }
                Poll::Ready(None) => this.end(End::Complete),
                Poll::Pending => {
                    // Timed from when this body waits, not from the last chunk: a client that
                    // reads slowly does not make the upstream late.
                    let idle = this.idle;
                    let timer = this
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    tracing::warn!(idle = ?this.idle, "a text answer fell silent upstream");
                    this.end(End::UpstreamTimeout);
                }
            }
        }
    }
}

impl Drop for MeteredBody {
    /// A client that leaves before the end: the upstream request goes with this body, and the
    /// answer is charged what it reported, or its reservation.
    fn drop(&mut self) {
        if let Some(settle) = self.settle.take() {
            settle.run(self.meter.charge(End::ClientLeft));
        }
    }
}

/// Whether an answer's content type is a server-sent event stream.
pub fn is_event_stream(content_type: Option<&http::HeaderValue>) -> bool {
    content_type
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim_start().starts_with("text/event-stream"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(chunks: &[&str]) -> Vec<(String, Option<String>)> {
        let mut splitter = EventSplitter::default();
        let mut events = Vec::new();
        for chunk in chunks {
            let mut start = 0;
            for split in splitter.push(chunk.as_bytes()) {
                events.push((
                    chunk[start..split.end].to_owned(),
                    split.data.map(|d| String::from_utf8(d).unwrap()),
                ));
                start = split.end;
            }
        }
        events
    }

    #[test]
    fn splits_events_across_chunks_and_line_endings() {
        let events = split_all(&[
            "data: {\"a\"",
            ":1}\n\nevent: x\ndata: 2\r\n",
            "\r\ndata:3\r\rdata: 4\ndata: 5\n\n",
        ]);
        let data: Vec<Option<String>> = events.iter().map(|(_, d)| d.clone()).collect();
        assert_eq!(
            data,
            [
                Some("{\"a\":1}".into()),
                Some("2".into()),
                Some("3".into()),
                Some("4\n5".into())
            ]
        );
        // The CRLF that ends an event belongs to it, even split across chunks.
        assert_eq!(events[1].0, "\r\n");
        assert_eq!(events[2].0, "data:3\r\r");
    }

    #[test]
    fn an_event_too_long_to_read_is_passed_unread_in_bounded_memory() {
        let mut splitter = EventSplitter::default();
        let long = vec![b'x'; MAX_EVENT_BYTES + 10];
        assert!(splitter.push(b"data: ").is_empty());
        assert!(splitter.push(&long).is_empty());
        assert!(splitter.line.len() <= MAX_EVENT_BYTES);
        assert_eq!(
            splitter.push(b"\n\ndata: ok\n\n"),
            [
                Split { end: 2, data: None },
                Split {
                    end: 12,
                    data: Some(b"ok".to_vec())
                }
            ]
        );
    }
}
