//! `[[source]] type = "file"`: which files a file source tails, from where, and how it cuts
//! them into events.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::reading::{self, check, IntakeKey, ReadingSource};
use crate::sources::syslog::framing::Oversize;

/// `[[source]] type = "file"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// Glob patterns of the files to read (`/var/log/app/*.log`), looked for again every
    /// `scan_interval_ms`.
    pub paths: Vec<String>,
    /// Glob patterns of files not to read, even if `paths` matches them (`*.gz`).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Where to start in a file found at the source's very first start, with no checkpoint:
    /// its end (only what is written from now on) or its beginning. Files that appear later
    /// are always read from their beginning.
    #[serde(default)]
    pub read_from: ReadFrom,
    /// The intake key of every event of this source: exactly one of the three is given.
    #[serde(default)]
    pub intake_key: Option<IntakeKey>,
    #[serde(default)]
    pub intake_key_env: Option<String>,
    #[serde(default)]
    pub intake_key_file: Option<PathBuf>,
    /// Largest event; a longer line (or multi-line event) is cut as `oversize` says.
    #[serde(default = "reading::default_max_event_bytes")]
    pub max_event_bytes: usize,
    #[serde(default)]
    pub oversize: Oversize,
    /// A regular expression that matches the first line of an event: lines that do not match
    /// belong to the event before (stack traces). Unset: one event per line.
    #[serde(default)]
    pub multiline_start: Option<String>,
    /// A multi-line event with no new line for that long is sent as it is.
    #[serde(default = "default_multiline_timeout_ms")]
    pub multiline_timeout_ms: u64,
    /// How often `paths` are looked for new, rotated and deleted files.
    #[serde(default = "default_scan_interval_ms")]
    pub scan_interval_ms: u64,
    /// How long to wait before looking at files again once none had anything new.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// A file no longer at any path of `paths` (rotated away, deleted) is read to its end and
    /// let go of once nothing was written to it for that long.
    #[serde(default = "default_rotate_wait_ms")]
    pub rotate_wait_ms: u64,
    /// The most files read at once; more files matched wait (and are counted).
    #[serde(default = "default_max_open_files")]
    pub max_open_files: usize,
}

/// Where a file found at the first start is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReadFrom {
    #[default]
    End,
    Beginning,
}

fn default_multiline_timeout_ms() -> u64 {
    1000
}
fn default_scan_interval_ms() -> u64 {
    1000
}
fn default_poll_interval_ms() -> u64 {
    250
}
fn default_rotate_wait_ms() -> u64 {
    5000
}
fn default_max_open_files() -> usize {
    1024
}

super::reading::reading_source!(FileSourceConfig);

impl FileSourceConfig {
    pub fn scan_interval(&self) -> Duration {
        Duration::from_millis(self.scan_interval_ms)
    }
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
    pub fn rotate_wait(&self) -> Duration {
        Duration::from_millis(self.rotate_wait_ms)
    }
    pub fn multiline_timeout(&self) -> Duration {
        Duration::from_millis(self.multiline_timeout_ms)
    }

    /// The start-of-event pattern, compiled.
    pub fn multiline_regex(&self) -> Result<Option<regex::Regex>, String> {
        self.multiline_start
            .as_deref()
            .map(regex::Regex::new)
            .transpose()
            .map_err(|e| e.to_string())
    }

    /// Checks what types alone cannot; the error is `(key, what is expected)`.
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        self.check_key_and_size()?;
        check(
            !self.paths.is_empty(),
            "paths",
            "expected at least one glob pattern",
        )?;
        for pattern in self.paths.iter().chain(&self.exclude) {
            if let Err(e) = glob::Pattern::new(pattern) {
                return Err((
                    "source.paths".into(),
                    format!("{pattern:?} is not a glob pattern: {e}"),
                ));
            }
        }
        check(
            self.paths.iter().all(|p| p.starts_with('/')),
            "paths",
            "expected absolute paths (the forwarder's working directory is not yours)",
        )?;
        if let Err(e) = self.multiline_regex() {
            return Err((
                "source.multiline_start".into(),
                format!("not a regular expression: {e}"),
            ));
        }
        check(
            (10..=3_600_000).contains(&self.multiline_timeout_ms),
            "multiline_timeout_ms",
            "expected 10 to 3600000",
        )?;
        check(
            (10..=3_600_000).contains(&self.scan_interval_ms),
            "scan_interval_ms",
            "expected 10 to 3600000",
        )?;
        check(
            (1..=60_000).contains(&self.poll_interval_ms),
            "poll_interval_ms",
            "expected 1 to 60000",
        )?;
        check(
            self.rotate_wait_ms <= 86_400_000,
            "rotate_wait_ms",
            "expected at most 86400000 (a day)",
        )?;
        check(
            self.max_open_files >= 1,
            "max_open_files",
            "expected at least 1",
        )?;
        Ok(())
    }
}
