//! `[[source]] type = "stdin"`: whose events the standard input's lines are, and how a long
//! line is cut.

use std::path::PathBuf;

use serde::Deserialize;

use super::syslog::{resolve_intake_key, IntakeKey, KEY_CHOICE};
use crate::intake_api;
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
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
    #[serde(default)]
    pub oversize: Oversize,
}

fn default_max_event_bytes() -> usize {
    intake_api::MAX_EVENT_BYTES
}

impl StdinSourceConfig {
    /// The key, read from where the configuration says. The error names the place, never
    /// the key.
    pub fn resolve_intake_key(&self) -> Result<IntakeKey, String> {
        resolve_intake_key(
            self.intake_key.as_ref(),
            self.intake_key_env.as_deref(),
            self.intake_key_file.as_deref(),
        )
    }

    /// Checks what types alone cannot; the error is `(key, what is expected)`.
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        let given = [
            self.intake_key.is_some(),
            self.intake_key_env.is_some(),
            self.intake_key_file.is_some(),
        ];
        if given.iter().filter(|&&g| g).count() != 1 {
            return Err(("source.intake_key".into(), KEY_CHOICE.into()));
        }
        check_max_event_bytes(self.max_event_bytes)
            .map_err(|msg| ("source.max_event_bytes".into(), msg))
    }
}

/// What `max_event_bytes` of a line-reading source (stdin, `send`) may be.
pub fn check_max_event_bytes(max: usize) -> Result<(), String> {
    if (256..=intake_api::MAX_EVENT_BYTES).contains(&max) {
        Ok(())
    } else {
        Err("expected 256 to 250000 (the intake refuses larger events)".into())
    }
}
