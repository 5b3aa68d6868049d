//! Logging: its configuration (`[log]`), the subscriber set-up, and the
//! buffered request log.
//!
//! ## The buffered request log
//! One request log line a request at 50k requests a second is 50k
//! `write(2)`s a second if each goes out alone. Like nginx's
//! `access_log ... buffer=64k flush=1s`, request lines (the events of
//! [`ACCESS_LOG_TARGET`]) can be gathered in memory (`log.buffer =
//! "64KiB"`; the default, `0`, writes each at once, as nginx does without
//! `buffer=`) and written when the buffer is
//! full, every second, at shutdown, and before any other log line (so a
//! warning never overtakes the requests logged before it).
//!
//! Each line stays complete: the formatter hands over a whole line per
//! event, a buffer only ever holds whole lines, and every write to stderr
//! (a buffer's worth of lines, or one line) is serialised, so writes from
//! different threads never interleave inside a line, whatever stderr is (a
//! pipe splits writes over 4 KiB). The buffers are sharded by thread, so
//! request threads do not contend on one lock; the lock serialising the
//! writes is taken once per buffer flush, not per line. `tracing-appender`'s
//! non-blocking writer was the crate to reach for, but it sends every line
//! through a channel to a thread of its own (an allocation and a wake-up a
//! line) and has no flush interval.
//!
//! ## Request lines are formatted here
//! When the subscriber writes plain lines (not colours on a terminal), the
//! request line is formatted by [`request_line`] itself, byte for byte as
//! `tracing-subscriber`'s formatter writes it (human or JSON; a test holds
//! the two equal), and goes straight into the sink. Formatting the same
//! event through `tracing` (the field visitor, `Debug` through `fmt` for
//! each field, the span lookups) cost 3 CPU us of the 20 a cached manifest
//! request costs in all (wrk on one manifest, 3 alternating rounds), which
//! is why this is written by hand. The line still obeys the filter
//! (`tracing::enabled!` on its target and level).

use std::cell::RefCell;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Deserialize;

use crate::error::ConfigError;

/// The target of request log lines (`http::access_log`), the only lines
/// that are buffered.
pub(crate) const ACCESS_LOG_TARGET: &str = "stowage::http::access_log";

/// How often buffered request lines are written out at the latest.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Largest `log.buffer`.
const MAX_BUFFER: u64 = 16 * 1024 * 1024;

fn default_buffer() -> bytesize::ByteSize {
    bytesize::ByteSize::b(0)
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `human` (default) or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `stowage=debug`; `RUST_LOG` wins
    /// when set.
    #[serde(default)]
    pub level: Option<String>,
    /// Request lines gathered before a write (`"64KiB"`, as nginx's
    /// `access_log ... buffer=64k flush=1s`); `0`, the default, writes each
    /// line at once. Buffered lines are written every second at the latest,
    /// before any other log line, and at shutdown.
    #[serde(default = "default_buffer")]
    pub buffer: bytesize::ByteSize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::default(),
            level: None,
            buffer: default_buffer(),
        }
    }
}

/// Output format of log lines.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable single lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

impl LogConfig {
    /// Checks that `level` is a valid filter.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(level) = &self.level
            && let Err(e) = tracing_subscriber::EnvFilter::try_new(level)
        {
            return Err(ConfigError::invalid("log.level", format!("{level:?}: {e}")));
        }
        if self.buffer.as_u64() > MAX_BUFFER {
            return Err(ConfigError::invalid("log.buffer", "must be at most 16MiB"));
        }
        Ok(())
    }
}

/// Writes buffered request lines out when dropped (at shutdown); hold it
/// for as long as the process logs.
#[must_use = "dropping the guard is what flushes the request log at shutdown"]
pub struct LogGuard(Option<Arc<Sink>>);

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some(sink) = &self.0 {
            sink.flush_all();
        }
    }
}

/// Installs the global subscriber: `RUST_LOG` if set, else `level`, else
/// `info`; human or JSON lines on stderr, request lines buffered (see the
/// module docs).
pub fn init(config: &LogConfig) -> LogGuard {
    use tracing_subscriber::EnvFilter;
    // Colours only on a terminal, never in files or the journal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(config.level.as_deref().unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let sink = Sink::new(config.buffer.as_u64() as usize);
    if sink.capacity > 0 {
        sink.spawn_flusher();
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(SinkWriter(sink.clone()))
        .with_ansi(ansi);
    if !ansi {
        let _ = DIRECT.set(Direct {
            sink: sink.clone(),
            format: config.format,
        });
    }
    match config.format {
        // Fields at the top level of each object, next to the span list that
        // carries the request id.
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Human => builder.init(),
    }
    LogGuard(Some(sink))
}

/// One request log line: what [`crate::http`] logs when a response ends.
pub(crate) struct RequestLine<'a> {
    pub(crate) request_id: &'a str,
    pub(crate) method: &'a http::Method,
    pub(crate) path: &'a str,
    pub(crate) status: u16,
    pub(crate) bytes: u64,
    pub(crate) ms: u64,
    /// How the cache answered, `-` for none.
    pub(crate) cache: &'a str,
    pub(crate) peer: SocketAddr,
    pub(crate) complete: bool,
}

/// Logs a request line: formatted here and put straight into the sink when
/// the subscriber writes plain lines, else through `tracing`.
pub(crate) fn request_line(line: &RequestLine<'_>) {
    match DIRECT.get() {
        Some(direct) => {
            if tracing::enabled!(target: ACCESS_LOG_TARGET, tracing::Level::INFO) {
                direct.write(line);
            }
        }
        None => request_line_via_tracing(line),
    }
}

/// The request line as a `tracing` event: the format [`format_request_line`]
/// reproduces.
fn request_line_via_tracing(l: &RequestLine<'_>) {
    tracing::info!(
        target: ACCESS_LOG_TARGET,
        request_id = %l.request_id,
        method = %l.method,
        path = %l.path,
        status = l.status,
        bytes = l.bytes,
        ms = l.ms,
        cache = l.cache,
        peer = %l.peer,
        complete = l.complete,
        "request"
    );
}

/// Set by [`init`] when lines are plain: where request lines go directly.
static DIRECT: OnceLock<Direct> = OnceLock::new();

/// The sink and format of directly written request lines.
struct Direct {
    sink: Arc<Sink>,
    format: LogFormat,
}

thread_local! {
    /// A line, and its timestamp, being formatted (kept: no allocation a line).
    static SCRATCH: RefCell<(Vec<u8>, String)> = const { RefCell::new((Vec::new(), String::new())) };
}

impl Direct {
    fn write(&self, line: &RequestLine<'_>) {
        // A body dropped while its thread exits (the thread-local gone) or
        // a line written while another is being formatted on this thread
        // gets buffers of its own: never a panic.
        let done = SCRATCH
            .try_with(|scratch| match scratch.try_borrow_mut() {
                Ok(mut scratch) => {
                    let (out, time) = &mut *scratch;
                    self.format_and_write(line, out, time);
                    true
                }
                Err(_) => false,
            })
            .unwrap_or(false);
        if !done {
            self.format_and_write(line, &mut Vec::new(), &mut String::new());
        }
    }

    fn format_and_write(&self, line: &RequestLine<'_>, out: &mut Vec<u8>, time: &mut String) {
        use tracing_subscriber::fmt::format::Writer;
        use tracing_subscriber::fmt::time::FormatTime;
        out.clear();
        time.clear();
        // The formatter's own clock and format.
        let _ = tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(time));
        format_request_line(self.format, time, line, out);
        if self.sink.capacity > 0 {
            self.sink.buffer(out);
        } else {
            self.sink.emit(out);
        }
    }
}

/// Writes `l`, stamped `time`, as `tracing-subscriber`'s formatter writes
/// [`request_line_via_tracing`]'s event outside any span: `Full` format
/// without colours, or JSON with the fields flattened.
fn format_request_line(format: LogFormat, time: &str, l: &RequestLine<'_>, out: &mut Vec<u8>) {
    match format {
        LogFormat::Human => {
            // `cache` is a `&str` field: the formatter quotes it (`Debug`).
            let _ = writeln!(
                out,
                "{time}  INFO {ACCESS_LOG_TARGET}: request request_id={} method={} path={} \
                 status={} bytes={} ms={} cache={:?} peer={} complete={}",
                l.request_id,
                l.method,
                l.path,
                l.status,
                l.bytes,
                l.ms,
                l.cache,
                l.peer,
                l.complete
            );
        }
        LogFormat::Json => {
            out.push(b'{');
            for (name, value) in [
                ("timestamp", time),
                ("level", "INFO"),
                ("message", "request"),
                ("request_id", l.request_id),
                ("method", l.method.as_str()),
                ("path", l.path),
            ] {
                let _ = write!(out, "\"{name}\":");
                let _ = serde_json::to_writer(&mut *out, value);
                out.push(b',');
            }
            let _ = write!(
                out,
                "\"status\":{},\"bytes\":{},\"ms\":{},",
                l.status, l.bytes, l.ms
            );
            let _ = write!(out, "\"cache\":");
            let _ = serde_json::to_writer(&mut *out, l.cache);
            // An address needs no escaping: digits, `.`, `:`, `[`, `]`,
            // hex letters and `%` for a scope id.
            let _ = writeln!(
                out,
                ",\"peer\":\"{}\",\"complete\":{},\"target\":\"{ACCESS_LOG_TARGET}\"}}",
                l.peer, l.complete
            );
        }
    }
}

/// Where log lines go: per-thread buffers of request lines, and stderr.
pub(crate) struct Sink {
    /// Bytes a buffer holds before it is written; 0: no buffering.
    capacity: usize,
    /// Buffers of whole request lines, one per thread (modulo their count).
    shards: Vec<Mutex<Vec<u8>>>,
    /// stderr (or a test's output); the lock serialises writes so lines
    /// never interleave.
    out: Mutex<Box<dyn std::io::Write + Send>>,
}

/// Which shard a thread uses.
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
}

impl Sink {
    fn new(capacity: usize) -> Arc<Sink> {
        Sink::with_output(capacity, Box::new(std::io::stderr()))
    }

    fn with_output(capacity: usize, out: Box<dyn std::io::Write + Send>) -> Arc<Sink> {
        let n = std::thread::available_parallelism().map_or(4, |n| n.get() * 2);
        Arc::new(Sink {
            capacity,
            shards: (0..n.max(4)).map(|_| Mutex::new(Vec::new())).collect(),
            out: Mutex::new(out),
        })
    }

    /// Writes `bytes` (whole lines) out in one piece.
    fn emit(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // Nowhere to report a failed write of the log itself.
        let _ = out.write_all(bytes);
    }

    /// Buffers one request line, writing the buffer first when the line
    /// would not fit.
    fn buffer(&self, line: &[u8]) {
        let shard = SHARD.with(|s| *s) % self.shards.len();
        let mut buf = self.shards[shard].lock().unwrap_or_else(|p| p.into_inner());
        if buf.len() + line.len() > self.capacity {
            self.emit(&buf);
            buf.clear();
            if line.len() >= self.capacity {
                self.emit(line);
                return;
            }
        }
        if buf.capacity() == 0 {
            buf.reserve_exact(self.capacity);
        }
        buf.extend_from_slice(line);
    }

    /// Writes every buffered line out.
    pub(crate) fn flush_all(&self) {
        for shard in &self.shards {
            let mut buf = shard.lock().unwrap_or_else(|p| p.into_inner());
            self.emit(&buf);
            buf.clear();
        }
    }

    /// Writes the buffers out every [`FLUSH_EVERY`], from a thread of its
    /// own (the log outlives the runtime).
    fn spawn_flusher(self: &Arc<Self>) {
        let sink = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(FLUSH_EVERY);
                    let Some(sink) = sink.upgrade() else { return };
                    sink.flush_all();
                }
            });
    }
}

/// The `MakeWriter` of the subscriber: request lines into the buffers,
/// anything else straight to stderr after the buffered lines.
#[derive(Clone)]
struct SinkWriter(Arc<Sink>);

/// One event's writer.
struct EventWriter<'a> {
    sink: &'a Sink,
    buffered: bool,
}

impl std::io::Write for EventWriter<'_> {
    /// The formatter writes a whole line with one `write_all`; it arrives
    /// here in one piece, as this never writes less than it is given.
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        if self.buffered {
            self.sink.buffer(line);
        } else {
            if self.sink.capacity > 0 {
                self.sink.flush_all();
            }
            self.sink.emit(line);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SinkWriter {
    type Writer = EventWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        EventWriter {
            sink: &self.0,
            buffered: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        EventWriter {
            sink: &self.0,
            buffered: self.0.capacity > 0 && meta.target() == ACCESS_LOG_TARGET,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// An output that records each write separately.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Writes {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn writer(sink: &Arc<Sink>, buffered: bool) -> EventWriter<'_> {
        EventWriter { sink, buffered }
    }

    #[test]
    fn request_lines_are_buffered_whole_and_flushed() {
        let out = Writes::default();
        let sink = Sink::with_output(100, Box::new(out.clone()));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let line = format!("request t{t} i{i} {}\n", "x".repeat(i % 40));
                        writer(&sink, true).write_all(line.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let before = out.0.lock().unwrap().len();
        assert!(before > 0, "full buffers were written");
        // Another line first writes out everything buffered, then itself.
        writer(&sink, false).write_all(b"warning\n").unwrap();
        let writes = out.0.lock().unwrap().clone();
        assert_eq!(writes.last().unwrap(), b"warning\n");
        let mut lines = 0;
        for w in &writes {
            assert!(w.len() <= 100 || w.iter().filter(|&&b| b == b'\n').count() == 1);
            assert_eq!(w.last(), Some(&b'\n'), "a write ends on a line end");
            for line in w.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let text = std::str::from_utf8(line).unwrap();
                assert!(text == "warning" || text.starts_with("request t"), "{text}");
                lines += 1;
            }
        }
        assert_eq!(lines, 8 * 200 + 1, "every line written once");
    }

    /// What `tracing-subscriber` writes for the request event, in `format`.
    fn via_tracing(format: LogFormat, line: &RequestLine<'_>) -> String {
        let out = Writes::default();
        let w = out.clone();
        let builder = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false);
        let subscriber: Box<dyn tracing::Subscriber + Send + Sync> = match format {
            LogFormat::Json => Box::new(builder.json().flatten_event(true).finish()),
            LogFormat::Human => Box::new(builder.finish()),
        };
        tracing::subscriber::with_default(subscriber, || request_line_via_tracing(line));
        let writes = out.0.lock().unwrap().concat();
        String::from_utf8(writes).unwrap()
    }

    #[test]
    fn request_lines_are_formatted_as_tracing_formats_them() {
        let get = http::Method::GET;
        let odd = http::Method::from_bytes(b"PROPFIND").unwrap();
        let lines = [
            RequestLine {
                request_id: "5f3a9c1e-42",
                method: &get,
                path: "/v2/library/alpine/manifests/3.20",
                status: 200,
                bytes: 1_234,
                ms: 0,
                cache: "hit",
                peer: "127.0.0.1:51234".parse().unwrap(),
                complete: true,
            },
            RequestLine {
                request_id: "lb:trace.id_9-x",
                method: &odd,
                // What a client may put in a path: quotes, a backslash,
                // non-ASCII, a control character.
                path: "/v2/a\"b\\c/\u{e9}t\u{e9}/\u{1}x",
                status: 405,
                bytes: 0,
                ms: 12_345,
                cache: "-",
                peer: "[fe80::1%2]:443".parse().unwrap(),
                complete: false,
            },
        ];
        for format in [LogFormat::Human, LogFormat::Json] {
            for line in &lines {
                let want = via_tracing(format, line);
                // The same timestamp, taken from tracing's line.
                let time = match format {
                    LogFormat::Human => want.split(' ').next().unwrap().to_string(),
                    LogFormat::Json => {
                        let v: serde_json::Value = serde_json::from_str(&want).unwrap();
                        v["timestamp"].as_str().unwrap().to_string()
                    }
                };
                assert_eq!(time.len(), "2026-12-02T13:32:36.309910Z".len(), "{want}");
                let mut got = Vec::new();
                format_request_line(format, &time, line, &mut got);
                assert_eq!(String::from_utf8(got).unwrap(), want, "{format:?}");
            }
        }
    }

    /// A request line for `GET`/`HEAD /v2/`.
    fn base_line<'a>(request_id: &'a str, method: &'a http::Method) -> RequestLine<'a> {
        RequestLine {
            request_id,
            method,
            path: "/v2/",
            status: 200,
            bytes: 2,
            ms: 1,
            cache: "-",
            peer: "127.0.0.1:1".parse().unwrap(),
            complete: true,
        }
    }

    #[test]
    fn a_line_written_while_the_scratch_buffer_is_taken_still_goes_out() {
        let out = Writes::default();
        let direct = Direct {
            sink: Sink::with_output(0, Box::new(out.clone())),
            format: LogFormat::Human,
        };
        let line = base_line("inner-1", &http::Method::GET);
        SCRATCH.with_borrow_mut(|_| direct.write(&line));
        direct.write(&line);
        let writes = out.0.lock().unwrap().clone();
        assert_eq!(writes.len(), 2);
        for w in writes {
            let w = String::from_utf8(w).unwrap();
            assert!(
                w.contains(" request request_id=inner-1 ") && w.ends_with('\n'),
                "{w}"
            );
        }
    }

    #[test]
    fn request_lines_go_through_tracing_without_a_direct_sink() {
        // No `init` in unit tests: the line is an ordinary event.
        assert!(DIRECT.get().is_none());
        let line = base_line("t-1", &http::Method::HEAD);
        let out = Writes::default();
        let w = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || request_line(&line));
        let text = String::from_utf8(out.0.lock().unwrap().concat()).unwrap();
        assert!(
            text.contains(" request request_id=t-1 method=HEAD path=/v2/ "),
            "{text}"
        );
    }

    #[test]
    fn unbuffered_writes_each_line() {
        let out = Writes::default();
        let sink = Sink::with_output(0, Box::new(out.clone()));
        writer(&sink, false).write_all(b"a\n").unwrap();
        assert_eq!(out.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn buffer_size_is_validated() {
        let mut c = LogConfig::default();
        assert_eq!(c.buffer.as_u64(), 0);
        c.buffer = bytesize::ByteSize::kib(64);
        c.validate().unwrap();
        c.buffer = bytesize::ByteSize::mib(17);
        assert!(c.validate().is_err());
    }
}
