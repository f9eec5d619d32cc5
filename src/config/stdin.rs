//! `[[source]] type = "stdin"`: whose events the standard input's lines are, and how a long
//! line is cut.

use std::path::PathBuf;

use serde::Deserialize;

use super::reading::{self, IntakeKey, ReadingSource};
use crate::sources::syslog::framing::Oversize;

/// `[[source]] type = "stdin"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdinSourceConfig {
    /// The intake key of every event of this source: exactly one of the three is given.
    #[serde(default)]
    pub intake_key: Option<IntakeKey>,
    #[serde(default)]
    pub intake_key_env: Option<String>,
    #[serde(default)]
    pub intake_key_file: Option<PathBuf>,
    /// Largest event; a longer line is cut as `oversize` says.
    #[serde(default = "reading::default_max_event_bytes")]
    pub max_event_bytes: usize,
    #[serde(default)]
    pub oversize: Oversize,
}

super::reading::reading_source!(StdinSourceConfig);

impl StdinSourceConfig {
    /// Checks what types alone cannot; the error is `(key, what is expected)`.
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        self.check_key_and_size()
    }
}
