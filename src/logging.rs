//! What log lines look like: human-readable for a terminal, or one JSON object per line for a
//! log pipeline. Both go to stderr.
//!
//! An HTTP worker never writes its lines itself. It gathers them and hands them to the log
//! writer thread when it runs out of work (its runtime's park hook calls
//! [`hand_over_gathered`]) or when it has gathered [`GATHER_LIMIT`] bytes. The writer thread
//! sleeps until lines arrive, lets more gather for [`WRITE_INTERVAL`], then writes them all, in
//! pieces of whole lines of at most [`PIPE_BUF`] bytes, which a pipe never interleaves with
//! another writer's. A request thus costs a copy under an uncontended lock, not a `write` that
//! a slow disk or a full pipe can stall. Other threads write each line as it comes.
//!
//! The writer is woken at most once per interval, not once per line as tracing-appender's
//! non-blocking writer is: a wake-up per line costs more CPU per request than the line itself
//! (`bench/run` compares the request log on and off).

use std::cell::RefCell;
use std::fmt;
use std::io::{self, Write};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

mod request_scope;

pub use request_scope::{InRequest, LoggedRequest, RequestContext};

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

/// Writes one JSON line made by the caller, where the log layers' lines go: on a worker
/// thread, straight into the lines it gathers. For the one line every request has: written
/// member by member it costs a fraction of a generic event's formatting, which visits each
/// field through `dyn Visit` and writes it piece by piece.
pub fn write_json_line(
    level: tracing::Level,
    target: &'static str,
    message: &'static str,
    fields: &impl JsonMembers,
) {
    GATHERED.with_borrow_mut(|gathered| match gathered {
        Some(gathered) => {
            push_json_line(gathered, level, target, message, fields);
            if gathered.len() >= GATHER_LIMIT {
                hand_over_whole_lines(gathered, &HANDED_OVER);
            }
        }
        None => {
            let _ = io::stderr().write_all(&json_line(level, target, message, fields));
        }
    });
}

/// A caller's fields, as members of its line.
pub trait JsonMembers {
    fn write_members(&self, members: &mut Members<'_>);
}

/// The members of a line being written, each as `,"name":value`. Names are the code's own
/// identifiers, written as they are: nothing in them needs escaping.
pub struct Members<'a>(&'a mut Vec<u8>);

impl Members<'_> {
    /// A string member, left out when `None`.
    pub fn str(&mut self, name: &'static str, value: Option<&str>) {
        if let Some(value) = value {
            self.name(name);
            push_json_str(self.0, value);
        }
    }

    /// A number member (or any other value serde_json writes), left out when `None`.
    pub fn value(&mut self, name: &'static str, value: Option<impl serde::Serialize>) {
        if let Some(value) = value {
            self.name(name);
            let _ = serde_json::to_writer(&mut *self.0, &value);
        }
    }

    fn name(&mut self, name: &'static str) {
        self.0.push(b',');
        push_plain_str(self.0, name);
        self.0.push(b':');
    }
}

/// `text` as a JSON string, as serde_json writes it. Text with nothing to escape, as a request's
/// fields almost always are, is copied whole rather than looked at byte by byte on the way.
fn push_json_str(out: &mut Vec<u8>, text: &str) {
    if needs_escape(text.as_bytes()) {
        let _ = serde_json::to_writer(&mut *out, text);
    } else {
        push_plain_str(out, text);
    }
}

/// `text`, which the code itself wrote and knows to need no escaping, as a JSON string.
fn push_plain_str(out: &mut Vec<u8>, text: &str) {
    debug_assert!(!needs_escape(text.as_bytes()), "{text:?} needs escaping");
    out.push(b'"');
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
}

/// Whether `text` holds a byte a JSON string escapes: looked at 16 bytes at a time, with no early
/// exit inside a block, so that the compiler checks each block in a few vector instructions.
fn needs_escape(text: &[u8]) -> bool {
    let escaped = |escape: bool, b: &u8| escape | (*b < 0x20) | (*b == b'"') | (*b == b'\\');
    let (blocks, rest) = text.as_chunks::<16>();
    blocks.iter().any(|block| block.iter().fold(false, escaped)) || rest.iter().fold(false, escaped)
}

/// The line [`write_json_line`] writes: the members the JSON layer starts an event's line with
/// (level, target, timestamp, message), then those of `fields`, then a newline.
pub fn json_line(
    level: tracing::Level,
    target: &'static str,
    message: &'static str,
    fields: &impl JsonMembers,
) -> Vec<u8> {
    let mut line = Vec::with_capacity(512);
    push_json_line(&mut line, level, target, message, fields);
    line
}

/// [`json_line`]'s line, at the end of `text`.
fn push_json_line(
    text: &mut Vec<u8>,
    level: tracing::Level,
    target: &'static str,
    message: &'static str,
    fields: &impl JsonMembers,
) {
    text.extend_from_slice(b"{\"level\":");
    push_plain_str(text, level.as_str());
    let mut members = Members(text);
    members.name("target");
    push_plain_str(members.0, target);
    members.name("timestamp");
    push_timestamp(members.0, std::time::SystemTime::now());
    members.name("message");
    push_plain_str(members.0, message);
    fields.write_members(&mut members);
    text.extend_from_slice(b"}\n");
}

thread_local! {
    /// The second the thread last wrote a timestamp in, and that timestamp to the second.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
}

/// `at` as the log layers write it, as a JSON string: RFC 3339 in UTC, to the microsecond
/// (`"2026-12-02T16:16:52.123456Z"`). The part to the second is formatted once a second per
/// thread, by chrono; the microseconds are six digits written here.
fn push_timestamp(out: &mut Vec<u8>, at: std::time::SystemTime) {
    let since_epoch = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let second = since_epoch.as_secs();
    out.push(b'"');
    SECOND.with_borrow_mut(|(formatted_second, text)| {
        if *formatted_second != second || text.is_empty() {
            let utc = i64::try_from(second)
                .ok()
                .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
                .unwrap_or_default();
            *text = utc.format("%Y-%m-%dT%H:%M:%S").to_string();
            *formatted_second = second;
        }
        out.extend_from_slice(text.as_bytes());
    });
    let mut fraction = *b".000000Z\"";
    let mut micros = since_epoch.subsec_micros();
    for digit in fraction[1..7].iter_mut().rev() {
        *digit = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    out.extend_from_slice(&fraction);
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

/// A busy worker that never parks hands its lines over once it has gathered this many bytes.
pub const GATHER_LIMIT: usize = 16 * 1024;

/// How long the writer thread lets lines gather after the first arrives: long enough to write
/// a batch instead of a line at a time, short enough that a line is never noticeably late.
pub const WRITE_INTERVAL: Duration = Duration::from_millis(10);

/// Most bytes waiting for the writer thread. Past it (stderr is stalled: a full pipe, a hung
/// disk), a worker writes its own lines and waits as the writer does: the log slows the gateway
/// down rather than take unbounded memory or drop lines.
const HAND_OVER_LIMIT: usize = 4 * 1024 * 1024;

thread_local! {
    /// Lines not yet handed over; `None` on threads that write each line as it comes.
    static GATHERED: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

static HANDED_OVER: HandOver = HandOver::new();
/// Held while a batch is written, so that [`flush`] cannot put lines before an earlier batch.
static WRITING: Mutex<()> = Mutex::new(());
/// Whether the log writer thread was started (on the first worker's call).
static WRITER_STARTED: OnceLock<bool> = OnceLock::new();

/// From now on, this thread's lines go to the log writer thread, which this starts if it is
/// not running. If it cannot be started, the thread goes on writing its own lines.
pub fn gather_lines_on_this_thread() {
    let started = WRITER_STARTED.get_or_init(|| {
        // Lines handed over before the thread first runs wait for it.
        let spawned = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(write_handed_over);
        if let Err(e) = &spawned {
            eprintln!("ketchup-gateway: no log writer thread ({e}); workers write their own lines");
        }
        spawned.is_ok()
    });
    if *started {
        GATHERED.set(Some(Vec::with_capacity(GATHER_LIMIT)));
    }
}

/// Hands the lines this thread has gathered to the writer thread.
pub fn hand_over_gathered() {
    GATHERED.with_borrow_mut(|gathered| {
        if let Some(gathered) = gathered {
            hand_over_whole_lines(gathered, &HANDED_OVER);
        }
    });
}

/// Writes every line handed over so far, now: for the end of the process, after the workers
/// have stopped.
pub fn flush() {
    let _writing = WRITING.lock().unwrap_or_else(PoisonError::into_inner);
    let mut lines = Vec::new();
    HANDED_OVER.take(&mut lines);
    write_in_pieces(&lines, &mut io::stderr());
}

/// Hands over what `gathered` holds up to its last newline; a partial line stays for its end.
fn hand_over_whole_lines(gathered: &mut Vec<u8>, to: &HandOver) {
    let Some(end) = gathered.iter().rposition(|&b| b == b'\n') else {
        return;
    };
    if !to.hand_over(&gathered[..=end]) {
        write_in_pieces(&gathered[..=end], &mut io::stderr());
    }
    gathered.drain(..=end);
}

/// The writer thread: forever, waits for lines and writes them.
fn write_handed_over() {
    let mut batch = Vec::new();
    loop {
        HANDED_OVER.wait_for_lines();
        std::thread::sleep(WRITE_INTERVAL);
        let _writing = WRITING.lock().unwrap_or_else(PoisonError::into_inner);
        HANDED_OVER.take(&mut batch);
        write_in_pieces(&batch, &mut io::stderr());
        batch.clear();
    }
}

/// Writes whole lines, at most [`PIPE_BUF`] bytes in one `write` (a longer line by itself). A
/// write error loses the lines: there is nowhere left to report it.
fn write_in_pieces(lines: &[u8], out: &mut impl Write) {
    let mut rest = lines;
    while !rest.is_empty() {
        let end = if rest.len() <= PIPE_BUF {
            rest.len()
        } else {
            match rest[..PIPE_BUF].iter().rposition(|&b| b == b'\n') {
                Some(last) => last + 1,
                None => rest
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(rest.len(), |end| end + 1),
            }
        };
        let _ = out.write_all(&rest[..end]);
        rest = &rest[end..];
    }
}

/// Lines handed over by the workers and not yet taken by the writer thread.
struct HandOver {
    pending: Mutex<Pending>,
    arrived: Condvar,
}

struct Pending {
    lines: Vec<u8>,
    /// The writer thread sleeps on `arrived` and must be woken for new lines.
    writer_waiting: bool,
}

impl HandOver {
    const fn new() -> HandOver {
        HandOver {
            pending: Mutex::new(Pending {
                lines: Vec::new(),
                writer_waiting: false,
            }),
            arrived: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Lines are plain bytes: a panic elsewhere while holding the lock leaves them usable.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes whole lines for the writer; `false` when that would hold more than
    /// [`HAND_OVER_LIMIT`] bytes, and the caller must write them itself.
    fn hand_over(&self, lines: &[u8]) -> bool {
        let mut pending = self.lock();
        if pending.lines.len() + lines.len() > HAND_OVER_LIMIT {
            return false;
        }
        pending.lines.extend_from_slice(lines);
        if std::mem::take(&mut pending.writer_waiting) {
            self.arrived.notify_one();
        }
        true
    }

    /// Returns once there are lines to write.
    fn wait_for_lines(&self) {
        let mut pending = self.lock();
        while pending.lines.is_empty() {
            pending.writer_waiting = true;
            pending = self
                .arrived
                .wait(pending)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Moves every waiting line into `batch` (which must be empty), keeping `batch`'s buffer
    /// for the next lines.
    fn take(&self, batch: &mut Vec<u8>) {
        std::mem::swap(&mut self.lock().lines, batch);
    }
}

/// What the log layers write to: stderr, or this thread's gathered lines if it has them.
struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        GATHERED.with_borrow_mut(|gathered| match gathered {
            Some(gathered) => {
                gathered.extend_from_slice(bytes);
                if gathered.len() >= GATHER_LIMIT {
                    hand_over_whole_lines(gathered, &HANDED_OVER);
                }
                Ok(bytes.len())
            }
            None => io::stderr().write(bytes),
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The line format of `json_subscriber::fmt().flatten_event(true)`: level, target, timestamp,
/// the event's fields at the top level, and the request being served (as the fields of a span
/// named `request`, see [`request_scope`]) under `span`, unless the event is a root. The
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
        .add_dynamic_field("span", |event, _| {
            (!event.is_root())
                .then(request_scope::span_member)
                .flatten()
        });
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

    use super::{
        HAND_OVER_LIMIT, HandOver, InRequest, PIPE_BUF, RequestContext, hand_over_whole_lines,
        json_layer, write_in_pieces,
    };

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
    fn strings_are_written_as_serde_json_writes_them() {
        for text in [
            "",
            "plain",
            "a \"quote\"",
            "back\\slash",
            "tab\t",
            "ünïcödé",
            "\u{7f}",
            "\u{1}",
            "0123456789abcdef0123456789abcdef",
            "0123456789abcdef0123456789abcde\"",
            "0123456789abcdef\n",
            "0123456789abcdef0123456789abcdef0123\\",
        ] {
            let mut written = Vec::new();
            super::push_json_str(&mut written, text);
            assert_eq!(written, serde_json::to_vec(text).unwrap(), "{text:?}");
        }
    }

    #[test]
    fn timestamps_are_rfc_3339_to_the_microsecond_as_chrono_writes_them() {
        use std::time::{Duration, UNIX_EPOCH};
        for micros in [0, 1, 999_999, 1_764_691_012_345_678, 1_764_691_013_000_001] {
            let at = UNIX_EPOCH + Duration::from_micros(micros);
            let mut written = Vec::new();
            super::push_timestamp(&mut written, at);
            let chrono = chrono::DateTime::<chrono::Utc>::from(at)
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            assert_eq!(written, serde_json::to_vec(&chrono).unwrap(), "{chrono}");
        }
    }

    #[test]
    fn lines_go_out_whole_and_at_most_pipe_buf_bytes_at_a_time() {
        let line = |n: usize| format!("{{\"n\":{n},\"pad\":\"{}\"}}\n", "x".repeat(300));
        let mut sent: String = (0..40).map(line).collect();
        let long = format!("{{\"long\":\"{}\"}}\n", "y".repeat(PIPE_BUF));
        sent.push_str(&long);
        sent.push_str(&line(40));
        let mut out = Writes::default();
        write_in_pieces(sent.as_bytes(), &mut out);

        assert_eq!(String::from_utf8(out.0.concat()).unwrap(), sent);
        for write in &out.0 {
            assert!(write.ends_with(b"\n"), "a write ends mid-line");
            assert!(
                write.len() <= PIPE_BUF || write == long.as_bytes(),
                "{}",
                write.len()
            );
        }
        // Thirteen 300-byte lines fit in one write: 40 take four, then the long line by
        // itself, then the last line.
        assert_eq!(
            out.0.len(),
            6,
            "{:?}",
            out.0.iter().map(Vec::len).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_partial_line_waits_for_its_end() {
        let to = HandOver::new();
        let mut gathered = b"{\"a\":1}\n{\"b\"".to_vec();
        hand_over_whole_lines(&mut gathered, &to);
        assert_eq!(gathered, b"{\"b\"");
        gathered.extend_from_slice(b":2}\n");
        hand_over_whole_lines(&mut gathered, &to);
        assert!(gathered.is_empty());
        let mut batch = Vec::new();
        to.take(&mut batch);
        assert_eq!(batch, b"{\"a\":1}\n{\"b\":2}\n");
    }

    #[test]
    fn the_writer_is_woken_by_the_first_lines_and_never_holds_more_than_its_limit() {
        let to = std::sync::Arc::new(HandOver::new());
        let writer = {
            let to = to.clone();
            std::thread::spawn(move || {
                to.wait_for_lines();
                let mut batch = Vec::new();
                to.take(&mut batch);
                batch
            })
        };
        assert!(to.hand_over(b"first\n"));
        assert_eq!(writer.join().unwrap(), b"first\n");

        assert!(to.hand_over(&vec![b'x'; HAND_OVER_LIMIT - 1]));
        assert!(
            !to.hand_over(b"one too many\n"),
            "past the limit the caller writes"
        );
        let mut batch = Vec::new();
        to.take(&mut batch);
        assert_eq!(batch.len(), HAND_OVER_LIMIT - 1);
        assert!(to.hand_over(b"room again\n"));
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
    fn a_line_inside_a_request_carries_the_request_but_a_root_line_does_not() {
        struct Served;
        impl RequestContext for Served {
            fn request_id(&self) -> &str {
                "r-1"
            }
            fn method(&self) -> &str {
                "GET"
            }
            fn route(&self) -> &str {
                "/api/user"
            }
        }
        let lines = logged(|| {
            let serve = InRequest::new(std::sync::Arc::new(Served), async {
                tracing::info!(n = 1u64, "inside");
                tracing::info!(parent: None, n = 2u64, "root");
            });
            futures_util::FutureExt::now_or_never(serve).expect("nothing to wait for");
        });
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0]["span"],
            json!({"name": "request", "request_id": "r-1", "method": "GET", "route": "/api/user"})
        );
        assert_eq!(lines[0]["n"], 1);
        assert!(lines[1].get("span").is_none(), "{}", lines[1]);
        assert_eq!(lines[1]["message"], "root");
    }
}
