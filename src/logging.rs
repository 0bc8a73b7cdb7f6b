//! What log lines look like: human-readable for a terminal, or one JSON object per line for a
//! log pipeline. Both go to stderr.
//!
//! An HTTP worker gathers its lines and writes them when it runs out of work (its runtime's park
//! hook calls [`write_gathered`]) or when the next line would not fit in [`PIPE_BUF`] bytes: a
//! worker under load writes a dozen lines at a time instead of one, and an idle one at once.
//! Every write is whole lines and at most `PIPE_BUF` bytes, which a pipe never interleaves with
//! another writer's. Other threads write each line as it comes.
//!
//! A writer thread with a buffer (tracing-appender's non-blocking writer) was tried for the JSON
//! lines and measured worse: waking it for each line cost more CPU per request (22-25 against
//! 17 µs per cached read at 10,000 req/s) and a higher p99 than the worker's own `write`.

use std::cell::RefCell;
use std::fmt;
use std::io::{self, Write};

use tracing::field::{Field, Visit};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Set once the JSON format is installed: see [`write_json_line`].
static JSON_LINES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether lines are JSON, so that a caller may write its own with [`write_json_line`].
pub fn json_lines() -> bool {
    JSON_LINES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Writes one JSON line made by the caller, where the log layers' lines go. For the one line
/// every request has: serialized from a struct it costs a fraction of a generic event's
/// formatting, which visits each field through `dyn Visit` and writes it piece by piece.
pub fn write_json_line(
    level: tracing::Level,
    target: &str,
    message: &str,
    fields: &impl serde::Serialize,
) {
    if let Some(line) = json_line(level, target, message, fields) {
        let _ = LogWriter.write_all(&line);
    }
}

/// The line [`write_json_line`] writes: the members the JSON layer starts an event's line with
/// (level, target, timestamp, message), then those of `fields`, then a newline.
pub fn json_line(
    level: tracing::Level,
    target: &str,
    message: &str,
    fields: &impl serde::Serialize,
) -> Option<Vec<u8>> {
    let line = CallersLine {
        level: level.as_str(),
        target,
        timestamp: Now,
        message,
        fields,
    };
    let mut text = Vec::with_capacity(512);
    serde_json::to_writer(&mut text, &line).ok()?;
    text.push(b'\n');
    Some(text)
}

#[derive(serde::Serialize)]
struct CallersLine<'a, F> {
    level: &'a str,
    target: &'a str,
    timestamp: Now,
    message: &'a str,
    #[serde(flatten)]
    fields: &'a F,
}

/// The timestamp of a line, as the log layers write it: RFC 3339 in UTC, to the microsecond.
struct Now;

impl serde::Serialize for Now {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ"))
    }
}

/// Installs the global subscriber. The level comes from `RUST_LOG` (default `info`).
pub fn init(format: LogFormat) {
    JSON_LINES.store(
        format == LogFormat::Json,
        std::sync::atomic::Ordering::Relaxed,
    );
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match format {
        LogFormat::Human => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(|| LogWriter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(json_layer(|| LogWriter))
            .init(),
    }
}

/// The most bytes one `write` to a pipe puts in as one piece (POSIX guarantees at least 512;
/// Linux's is 4096).
pub const PIPE_BUF: usize = 4096;

thread_local! {
    /// Lines not yet written; `None` on threads that write each line as it comes.
    static GATHERED: RefCell<Option<Gathered>> = const { RefCell::new(None) };
}

/// From now on, this thread's lines wait for [`write_gathered`] (or for a full buffer).
pub fn gather_lines_on_this_thread() {
    GATHERED.set(Some(Gathered::default()));
}

/// Writes the lines this thread has gathered.
pub fn write_gathered() {
    GATHERED.with_borrow_mut(|gathered| {
        if let Some(gathered) = gathered {
            gathered.write_out(&mut io::stderr());
        }
    });
}

/// Lines waiting to be written together.
#[derive(Default)]
struct Gathered(Vec<u8>);

impl Gathered {
    /// Takes what a layer wrote (a line, or in principle part of one), first writing out what
    /// would no longer fit in one `PIPE_BUF` write with it.
    fn push(&mut self, bytes: &[u8], out: &mut impl Write) -> io::Result<()> {
        if self.0.len() + bytes.len() > PIPE_BUF {
            self.write_out(out);
        }
        if self.0.is_empty() && bytes.len() >= PIPE_BUF {
            // Too long to gather: written by itself, as every line once was.
            return out.write_all(bytes);
        }
        self.0.extend_from_slice(bytes);
        Ok(())
    }

    /// Writes out the whole lines and keeps the rest. A write error loses the lines: there is
    /// nowhere left to report it.
    fn write_out(&mut self, out: &mut impl Write) {
        let Some(end) = self.0.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let _ = out.write_all(&self.0[..=end]);
        self.0.drain(..=end);
    }
}

/// What the log layers write to: stderr, through this thread's gathered lines if it has them.
struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        GATHERED.with_borrow_mut(|gathered| match gathered {
            Some(gathered) => gathered
                .push(bytes, &mut io::stderr())
                .map(|()| bytes.len()),
            None => io::stderr().write(bytes),
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The line format of `json_subscriber::fmt().flatten_event(true)`: level, target, timestamp,
/// the event's fields at the top level, and the current span's fields under `span`. The
/// event's fields are written straight into the line; the built-in flattening first collects
/// them into a `serde_json` map, which cost about 7,500 of the 90,000 instructions of a cached
/// status read (callgrind).
fn json_layer<S, W>(writer: W) -> json_subscriber::JsonLayer<S, W>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    W: for<'writer> tracing_subscriber::fmt::MakeWriter<'writer> + 'static,
{
    let mut layer = json_subscriber::JsonLayer::new(writer);
    layer
        .with_level("level")
        .with_target("target")
        .with_timer("timestamp", tracing_subscriber::fmt::time::SystemTime)
        .with_current_span("span");
    layer.add_multiple_dynamic_fields(|event, _, line| event.record(&mut TopLevel(line)));
    layer
}

/// Writes each field of an event as a member of the line's object.
struct TopLevel<'a, 'line>(&'a mut json_subscriber::FieldWriter<'line>);

impl TopLevel<'_, '_> {
    fn write(&mut self, field: &Field, value: impl serde::Serialize) {
        // Fails only for values that serialize to a map with non-string keys, which no field
        // type here does; the writer has then already rolled the member back.
        let _ = self.0.write_field(field.name(), value);
    }
}

impl Visit for TopLevel<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.write(field, value);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.write(field, value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.write(field, value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.write(field, value);
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.write(field, value);
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, format_args!("{value:?}"));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::{Value, json};
    use tracing_subscriber::layer::SubscriberExt;

    use super::{Gathered, PIPE_BUF, json_layer};

    /// Collects what the layer writes.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The JSON lines `emit` logs, parsed.
    pub(crate) fn logged(emit: impl FnOnce()) -> Vec<Value> {
        let lines = Lines::default();
        let sink = lines.clone();
        let subscriber = tracing_subscriber::registry().with(json_layer(move || sink.clone()));
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| serde_json::from_str(line).expect(line))
            .collect()
    }

    /// Records each `write` call on its own.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl std::io::Write for Writes {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.push(bytes.to_vec());
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn gathered_lines_go_out_whole_and_at_most_pipe_buf_bytes_at_a_time() {
        let line = |n: usize| format!("{{\"n\":{n},\"pad\":\"{}\"}}\n", "x".repeat(300));
        let mut gathered = Gathered::default();
        let mut out = Writes::default();
        let mut sent = String::new();
        for n in 0..40 {
            gathered.push(line(n).as_bytes(), &mut out).unwrap();
            sent.push_str(&line(n));
        }
        // A line in two pieces, then one longer than a pipe takes at once.
        gathered.push(b"{\"half\":", &mut out).unwrap();
        gathered.push(b"1}\n", &mut out).unwrap();
        sent.push_str("{\"half\":1}\n");
        let long = format!("{{\"long\":\"{}\"}}\n", "y".repeat(PIPE_BUF));
        gathered.push(long.as_bytes(), &mut out).unwrap();
        sent.push_str(&long);
        assert!(out.0.len() > 1, "some lines went out before the end");
        gathered.write_out(&mut out);

        assert_eq!(String::from_utf8(out.0.concat()).unwrap(), sent);
        for write in &out.0 {
            assert!(write.ends_with(b"\n"), "a write ends mid-line");
            assert!(
                write.len() <= PIPE_BUF || write == long.as_bytes(),
                "{}",
                write.len()
            );
        }
        // About thirteen 300-byte lines fit in one write.
        assert!(out.0.len() <= 6, "{} writes", out.0.len());
    }

    #[test]
    fn a_partial_line_waits_for_its_end() {
        let mut gathered = Gathered::default();
        let mut out = Writes::default();
        gathered.push(b"{\"a\":1}\n{\"b\"", &mut out).unwrap();
        gathered.write_out(&mut out);
        assert_eq!(out.0, [b"{\"a\":1}\n".to_vec()]);
        gathered.push(b":2}\n", &mut out).unwrap();
        gathered.write_out(&mut out);
        assert_eq!(out.0[1], b"{\"b\":2}\n");
    }

    #[test]
    fn fields_are_top_level_members_with_their_json_types() {
        let lines = logged(|| {
            let error = std::io::Error::other("upstream said \"no\"\n");
            tracing::warn!(
                status = 502u16,
                latency_ms = 1.25,
                retried = false,
                offset = -3i64,
                team = "design",
                error = %error,
                detail = ?Some("x"),
                "request finished"
            );
        });
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["target"], module_path!());
        assert!(line["timestamp"].as_str().unwrap().ends_with('Z'), "{line}");
        assert_eq!(line["message"], "request finished");
        assert_eq!(line["status"], 502);
        assert_eq!(line["latency_ms"], 1.25);
        assert_eq!(line["retried"], false);
        assert_eq!(line["offset"], -3);
        assert_eq!(line["team"], "design");
        assert_eq!(line["error"], "upstream said \"no\"\n");
        assert_eq!(line["detail"], "Some(\"x\")");
        assert!(line.get("span").is_none(), "{line}");
    }

    #[test]
    fn a_line_inside_a_span_carries_the_span_but_a_root_line_does_not() {
        let lines = logged(|| {
            let span = tracing::info_span!("request", request_id = "r-1", route = "/api/user");
            let _entered = span.enter();
            tracing::info!(n = 1u64, "inside");
            tracing::info!(parent: None, n = 2u64, "root");
        });
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0]["span"],
            json!({"name": "request", "request_id": "r-1", "route": "/api/user"})
        );
        assert_eq!(lines[0]["n"], 1);
        assert!(lines[1].get("span").is_none(), "{}", lines[1]);
        assert_eq!(lines[1]["message"], "root");
    }
}
