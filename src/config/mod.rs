//! Configuration: a TOML file, or the built-in default that works out of the box.
//!
//! Every option and its default is documented in `docs/configuration.md`; keep the two in step.
//! Unknown keys are errors (a typo must not silently fall back to a default), and every error
//! names the file, the line and the key, and says what is expected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::intake_api;

mod file;
mod reading;
mod stdin;
mod syslog;
pub use file::{FileSourceConfig, ReadFrom};
pub use reading::{check_max_event_bytes, resolve_intake_key, IntakeKey, KeyFields, ReadingSource};
pub use stdin::StdinSourceConfig;
pub use syslog::{Listen, SyslogSourceConfig};

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub queue: QueueConfig,
    #[serde(default)]
    pub intake: IntakeConfig,
    #[serde(default = "default_sources", rename = "source")]
    pub sources: Vec<SourceConfig>,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub admin: AdminConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            queue: QueueConfig::default(),
            intake: IntakeConfig::default(),
            sources: default_sources(),
            log: LogConfig::default(),
            admin: AdminConfig::default(),
        }
    }
}

fn default_sources() -> Vec<SourceConfig> {
    vec![SourceConfig::Http(HttpSourceConfig::default())]
}

/// `[queue]`: the durable sled queue.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// sled directory; created with mode 0700 if missing.
    pub path: PathBuf,
    /// Limit on what the queue really holds on disk; at the limit sources get back-pressure.
    pub max_bytes: u64,
    /// sled page cache.
    pub cache_capacity_bytes: u64,
    /// Target payload of one stored chunk of events.
    pub chunk_bytes: usize,
    /// Payload after which the queue starts a new sled database (generation); a delivered
    /// generation is deleted whole, which gives its disk space back.
    pub generation_bytes: u64,
    /// Free space kept on the queue's file system: below it, sources get back-pressure, so
    /// that delivery can still record removals (which need a little space too).
    pub min_free_bytes: u64,
    /// Most intake keys the queue takes. Each key is a lane with its own delivery task, kept
    /// as long as the queue; a request that would bring more is refused (403) before anything
    /// of it is stored.
    pub max_intake_keys: usize,
    /// Compression of stored chunks: `zstd` or `lz4` (each chunk stored compressed when that
    /// makes it at least an eighth smaller) or `none` (less CPU, more bytes written).
    pub chunk_compression: ChunkCompression,
    /// Memory for the uncompressed bodies of chunks just committed, so that delivery reads
    /// them without decompressing what the process compressed a moment ago; 0 turns it off.
    pub delivery_cache_bytes: usize,
}

/// `[queue] chunk_compression`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkCompression {
    #[default]
    Zstd,
    Lz4,
    None,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            path: PathBuf::from("./sekoia-forwarder-data"),
            max_bytes: 4 * 1024 * 1024 * 1024,
            cache_capacity_bytes: 32 * 1024 * 1024,
            chunk_bytes: 16 * 1024,
            generation_bytes: 32 * 1024 * 1024,
            min_free_bytes: 256 * 1024 * 1024,
            max_intake_keys: 1000,
            chunk_compression: ChunkCompression::Zstd,
            delivery_cache_bytes: 4 * 1024 * 1024,
        }
    }
}

/// `[intake]`: where and how events are delivered.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntakeConfig {
    /// Base URL; batches are POSTed to `{url}/jsons`.
    pub url: url::Url,
    /// Time allowed for one request, answer included.
    pub request_timeout_secs: u64,
    /// Most events in one request.
    pub batch_max_events: usize,
    /// Most bytes of JSON body in one request.
    pub batch_max_bytes: usize,
    /// How long a partial batch may wait for more events before it is sent.
    pub linger_ms: u64,
    /// Requests in flight at once, over all intake keys.
    pub max_in_flight: usize,
    /// First retry delay.
    pub backoff_initial_ms: u64,
    /// Longest retry delay.
    pub backoff_max_ms: u64,
    /// Retry delay for an intake key that the intake refuses (401/403).
    pub auth_retry_secs: u64,
    /// Compression of request bodies: `none` or `gzip` (the intake accepts gzip bodies).
    pub compression: Compression,
    /// The date sent with events that have none of their own: the forwarder's reception
    /// time (`reception`) or nothing, so that the intake dates them when they reach it
    /// (`intake`): after an outage, that is when the link came back.
    pub event_time: EventTime,
    /// With `event_time = "reception"`: a batch holds only events received within this many
    /// milliseconds of its first (one request carries one date), and is cut there.
    pub event_time_tolerance_ms: u64,
}

/// `[intake] event_time`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventTime {
    /// Events without a date of their own are sent with the time the forwarder received them.
    #[default]
    Reception,
    /// They are sent without a date: the intake uses the time it receives them.
    Intake,
}

/// Longest `event_time_tolerance_ms`: an hour. Beyond it the date sent says little of when
/// an event happened, and `event_time = "intake"` says so plainly.
pub const MAX_EVENT_TIME_TOLERANCE_MS: u64 = 3_600_000;

/// `[intake] compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
}

impl Default for IntakeConfig {
    fn default() -> Self {
        IntakeConfig {
            url: url::Url::parse("https://intake.sekoia.io").expect("static URL"),
            request_timeout_secs: 30,
            batch_max_events: 10_000,
            batch_max_bytes: 5 * 1024 * 1024,
            linger_ms: 500,
            max_in_flight: 4,
            backoff_initial_ms: 500,
            backoff_max_ms: 60_000,
            auth_retry_secs: 300,
            compression: Compression::None,
            event_time: EventTime::Reception,
            event_time_tolerance_ms: 1000,
        }
    }
}

impl IntakeConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
    pub fn linger(&self) -> Duration {
        Duration::from_millis(self.linger_ms)
    }
    pub fn backoff_initial(&self) -> Duration {
        Duration::from_millis(self.backoff_initial_ms)
    }
    pub fn backoff_max(&self) -> Duration {
        Duration::from_millis(self.backoff_max_ms)
    }
    pub fn auth_retry(&self) -> Duration {
        Duration::from_secs(self.auth_retry_secs)
    }
    /// How far apart the reception times of one batch's undated events may be; `None` when
    /// they are sent undated (`event_time = "intake"`), so that reception times do not cut
    /// batches.
    pub fn reception_tolerance_ms(&self) -> Option<u64> {
        match self.event_time {
            EventTime::Reception => Some(self.event_time_tolerance_ms),
            EventTime::Intake => None,
        }
    }
}

/// One `[[source]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SourceConfig {
    /// The local intake-compatible HTTP API.
    Http(HttpSourceConfig),
    /// Syslog over UDP, TCP or TLS.
    Syslog(SyslogSourceConfig),
    /// Files tailed, with their positions checkpointed in the queue.
    File(FileSourceConfig),
    /// The standard input, one event per line, read to its end.
    Stdin(StdinSourceConfig),
}

/// `[[source]] type = "http"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSourceConfig {
    /// Address to listen on; loopback unless you mean otherwise.
    pub listen: SocketAddr,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Largest event accepted (the intake refuses more than 250,000 bytes).
    pub max_event_bytes: usize,
    /// `Retry-After` given with a 503 when the queue is full or the forwarder stops.
    pub retry_after_secs: u64,
    /// Time a connection is given to send a whole request head (request line and headers),
    /// counted from its acceptance or from the first byte of the request on a kept-alive
    /// connection; a client that takes longer is disconnected ("slowloris").
    pub header_read_timeout_secs: u64,
    /// Time a request is given to send its whole body once its head is in; a later body gets
    /// 408 and nothing of it is stored.
    pub body_read_timeout_secs: u64,
    /// Time a kept-alive connection may stay idle between requests before it is closed.
    pub idle_timeout_secs: u64,
    /// Connections served at once; further connections wait in the kernel's backlog.
    pub max_connections: usize,
}

impl HttpSourceConfig {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_secs)
    }
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_secs(self.body_read_timeout_secs)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
}

impl Default for HttpSourceConfig {
    fn default() -> Self {
        HttpSourceConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 10080)),
            max_body_bytes: intake_api::MAX_BODY_BYTES,
            max_event_bytes: intake_api::MAX_EVENT_BYTES,
            retry_after_secs: 5,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 30,
            idle_timeout_secs: 60,
            max_connections: 1024,
        }
    }
}

/// `[admin]`: health, status and Prometheus metrics over HTTP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve `/health`, `/status` and `/metrics`.
    pub enabled: bool,
    /// Address to listen on; loopback unless you mean otherwise.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 10081)),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `sekoia_forwarder=debug`. `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A configuration that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}, line {line}: `{key}`: {message}")]
    Invalid {
        file: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

impl Config {
    /// Reads and validates `file`.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Config::parse(&text, file)
    }

    /// Parses and validates `text`, naming `file` in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: parse_message(&e, text),
        })?;
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                file: file.to_owned(),
                line: line_of_key(text, &key),
                key,
                message,
            })?;
        Ok(config)
    }

    /// Checks what types alone cannot; the error is `(dotted key, what is expected)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let q = &self.queue;
        let i = &self.intake;
        let check = |ok: bool, key: &str, msg: &str| {
            if ok {
                Ok(())
            } else {
                Err((key.to_owned(), msg.to_owned()))
            }
        };
        check(
            q.max_bytes >= 16 * 1024 * 1024,
            "queue.max_bytes",
            "expected at least 16777216 (16 MiB)",
        )?;
        check(
            q.cache_capacity_bytes >= 1024 * 1024,
            "queue.cache_capacity_bytes",
            "expected at least 1048576 (1 MiB)",
        )?;
        check(
            q.min_free_bytes >= 32 * 1024 * 1024,
            "queue.min_free_bytes",
            "expected at least 33554432 (32 MiB): removing delivered \
             events needs space too",
        )?;
        check(
            (64 * 1024..=1024 * 1024 * 1024).contains(&q.generation_bytes),
            "queue.generation_bytes",
            "expected 65536 (64 KiB) to 1073741824 (1 GiB)",
        )?;
        check(
            (1024..=64 * 1024).contains(&q.chunk_bytes),
            "queue.chunk_bytes",
            "expected 1024 to 65536",
        )?;
        check(
            q.delivery_cache_bytes <= 256 * 1024 * 1024,
            "queue.delivery_cache_bytes",
            "expected 0 (off) to 268435456 (256 MiB)",
        )?;
        check(
            (1..=1_000_000).contains(&q.max_intake_keys),
            "queue.max_intake_keys",
            "expected 1 to 1000000",
        )?;
        check(
            matches!(i.url.scheme(), "http" | "https"),
            "intake.url",
            "expected an http:// or https:// URL",
        )?;
        check(
            i.request_timeout_secs >= 1,
            "intake.request_timeout_secs",
            "expected at least 1",
        )?;
        check(
            i.batch_max_events >= 1,
            "intake.batch_max_events",
            "expected at least 1",
        )?;
        check(
            (1024..=intake_api::MAX_BODY_BYTES).contains(&i.batch_max_bytes),
            "intake.batch_max_bytes",
            "expected 1024 to 10485760 (the intake's request limit)",
        )?;
        check(
            i.max_in_flight >= 1,
            "intake.max_in_flight",
            "expected at least 1",
        )?;
        check(
            i.backoff_initial_ms >= 1 && i.backoff_initial_ms <= i.backoff_max_ms,
            "intake.backoff_initial_ms",
            "expected at least 1 and at most intake.backoff_max_ms",
        )?;
        check(
            i.auth_retry_secs >= 1,
            "intake.auth_retry_secs",
            "expected at least 1",
        )?;
        // The process has one standard input: two sources would share its lines by chance.
        check(
            self.sources
                .iter()
                .filter(|s| matches!(s, SourceConfig::Stdin(_)))
                .count()
                <= 1,
            "source.type",
            "expected at most one source of type \"stdin\"",
        )?;
        check(
            i.event_time_tolerance_ms <= MAX_EVENT_TIME_TOLERANCE_MS,
            "intake.event_time_tolerance_ms",
            "expected 0 to 3600000 (an hour)",
        )?;
        for source in &self.sources {
            match source {
                SourceConfig::Http(h) => {
                    check(
                        (1..=intake_api::MAX_EVENT_BYTES).contains(&h.max_event_bytes),
                        "source.max_event_bytes",
                        "expected 1 to 250000 (the intake refuses larger events)",
                    )?;
                    check(
                        h.max_body_bytes >= h.max_event_bytes,
                        "source.max_body_bytes",
                        "expected at least max_event_bytes",
                    )?;
                    check(
                        h.header_read_timeout_secs >= 1,
                        "source.header_read_timeout_secs",
                        "expected at least 1",
                    )?;
                    check(
                        h.body_read_timeout_secs >= 1,
                        "source.body_read_timeout_secs",
                        "expected at least 1",
                    )?;
                    check(
                        h.idle_timeout_secs >= 1,
                        "source.idle_timeout_secs",
                        "expected at least 1",
                    )?;
                    check(
                        h.max_connections >= 1,
                        "source.max_connections",
                        "expected at least 1",
                    )?;
                }
                SourceConfig::Syslog(s) => s.validate()?,
                SourceConfig::File(f) => f.validate()?,
                SourceConfig::Stdin(s) => s.validate()?,
            }
        }
        Ok(())
    }
}

fn parse_message(e: &toml::de::Error, text: &str) -> String {
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {}", e.message())
        }
        None => e.message().to_owned(),
    }
}

/// The line where the last part of a dotted key is set, or 0 when it is not in the file
/// (a default that does not fit together with a value that is).
fn line_of_key(text: &str, dotted: &str) -> usize {
    let key = dotted.rsplit('.').next().unwrap_or(dotted);
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(0, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_example_parses() {
        let text = r#"
[queue]
path = "/var/lib/sekoia-forwarder"

[intake]
url = "https://intake.sekoia.io"

[[source]]
type = "http"
listen = "127.0.0.1:10080"
"#;
        let c = Config::parse(text, Path::new("f.toml")).unwrap();
        assert_eq!(c.queue.path, PathBuf::from("/var/lib/sekoia-forwarder"));
        assert_eq!(c.sources.len(), 1);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = "[queue]\npath = \"x\"\nmax_bites = 3\n";
        let err = Config::parse(text, Path::new("f.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("f.toml"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("max_bites"), "{err}");
    }

    #[test]
    fn invalid_value_names_line_and_key() {
        let text = "[intake]\nurl = \"https://x\"\nbatch_max_bytes = 99999999\n";
        let err = Config::parse(text, Path::new("f.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("intake.batch_max_bytes"), "{err}");
        assert!(err.contains("10485760"), "{err}");
    }

    #[test]
    fn chunk_compression_is_zstd_lz4_or_none() {
        let parse = |v: &str| {
            Config::parse(
                &format!("[queue]\nchunk_compression = {v}\n"),
                Path::new("f.toml"),
            )
        };
        assert_eq!(
            Config::default().queue.chunk_compression,
            ChunkCompression::Zstd
        );
        assert_eq!(
            parse("\"zstd\"").unwrap().queue.chunk_compression,
            ChunkCompression::Zstd
        );
        assert_eq!(
            parse("\"none\"").unwrap().queue.chunk_compression,
            ChunkCompression::None
        );
        assert_eq!(
            parse("\"lz4\"").unwrap().queue.chunk_compression,
            ChunkCompression::Lz4
        );
        let err = parse("\"brotli\"").unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("`zstd`, `lz4`, `none`"),
            "{err}"
        );
    }

    #[test]
    fn a_stdin_source_needs_one_key_and_there_is_at_most_one() {
        let stdin = "[[source]]\ntype = \"stdin\"\nintake_key_env = \"K\"\n";
        let c = Config::parse(stdin, Path::new("f.toml")).unwrap();
        assert!(matches!(&c.sources[..], [SourceConfig::Stdin(s)] if s.max_event_bytes == 250_000));
        let twice = Config::parse(&format!("{stdin}{stdin}"), Path::new("f.toml"))
            .unwrap_err()
            .to_string();
        assert!(twice.contains("at most one"), "{twice}");
        let keyless = Config::parse("[[source]]\ntype = \"stdin\"\n", Path::new("f.toml"))
            .unwrap_err()
            .to_string();
        assert!(keyless.contains("exactly one of intake_key"), "{keyless}");
        let long = Config::parse(
            &format!("{stdin}max_event_bytes = 300000\noversize = \"split\"\n"),
            Path::new("f.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(long.contains("line 4") && long.contains("250000"), "{long}");
    }

    #[test]
    fn a_syslog_budget_holds_at_least_a_batch_and_a_message() {
        let tcp = "[[source]]\ntype = \"syslog\"\nlisten = \"tcp://127.0.0.1:514\"\n\
                   intake_key_env = \"K\"\n";
        let c = Config::parse(tcp, Path::new("f.toml")).unwrap();
        assert!(
            matches!(&c.sources[..], [SourceConfig::Syslog(s)] if s.max_buffered_bytes == 64 << 20)
        );
        let small = Config::parse(
            &format!("{tcp}max_buffered_bytes = 65536\n"),
            Path::new("f.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            small.contains("max_buffered_bytes") && small.contains("1048576"),
            "{small}"
        );
    }

    #[test]
    fn a_key_that_cannot_travel_in_a_header_is_refused_without_being_said() {
        for bad in ["with space-0123456789", "clé-0123456789", &"k".repeat(257)] {
            let err = resolve_intake_key(Some(&IntakeKey(bad.to_owned())), None, None).unwrap_err();
            assert!(err.contains("visible ASCII"), "{err}");
            assert!(!err.contains(bad), "the key is in the error: {err}");
        }
        let ok = resolve_intake_key(Some(&IntakeKey(" good-key \n".into())), None, None);
        assert_eq!(ok, Ok(IntakeKey("good-key".into())));
    }

    #[test]
    fn event_time_is_reception_or_intake_with_a_bounded_tolerance() {
        let parse = |text: &str| Config::parse(text, Path::new("f.toml"));
        let default = Config::default().intake;
        assert_eq!(default.event_time, EventTime::Reception);
        assert_eq!(default.event_time_tolerance_ms, 1000);
        assert_eq!(default.reception_tolerance_ms(), Some(1000));
        let c = parse("[intake]\nevent_time = \"intake\"\n").unwrap();
        assert_eq!(c.intake.event_time, EventTime::Intake);
        assert_eq!(c.intake.reception_tolerance_ms(), None);
        let c =
            parse("[intake]\nevent_time = \"reception\"\nevent_time_tolerance_ms = 0\n").unwrap();
        assert_eq!(c.intake.reception_tolerance_ms(), Some(0));
        let err = parse("[intake]\nevent_time = \"sender\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2") && err.contains("`reception` or `intake`"),
            "{err}"
        );
        let err = parse("[intake]\nevent_time_tolerance_ms = 3600001\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2") && err.contains("intake.event_time_tolerance_ms"),
            "{err}"
        );
    }

    #[test]
    fn default_is_valid() {
        Config::default().validate().unwrap();
    }
}
