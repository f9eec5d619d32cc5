//! What the configurations of the reading sources (syslog, file, stdin) and `send` share:
//! whose events they are (an intake key, given in one of three ways) and how long one event
//! may be. One reading of each, so that the three sources cannot drift apart.

use std::path::Path;

use serde::Deserialize;

use crate::intake_api;

/// An intake key: shown redacted in `Debug`, so that a logged configuration never holds it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct IntakeKey(pub String);

impl std::fmt::Debug for IntakeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IntakeKey({})", crate::intake_api::redact_key(&self.0))
    }
}

const KEY_CHOICE: &str = "expected exactly one of intake_key, intake_key_env, intake_key_file";

/// `intake_key`, `intake_key_env` and `intake_key_file` of one source, as given.
#[derive(Debug, Clone, Copy)]
pub struct KeyFields<'a> {
    pub key: Option<&'a IntakeKey>,
    pub env: Option<&'a str>,
    pub file: Option<&'a Path>,
}

/// A source configuration with an intake key of its own and a largest event. (The fields
/// stay in each source's struct: serde cannot flatten them into a struct that denies
/// unknown fields.)
pub trait ReadingSource {
    fn key_fields(&self) -> KeyFields<'_>;
    fn max_event_bytes(&self) -> usize;

    /// The key, read from where the configuration says. The error names the place, never
    /// the key.
    fn resolve_intake_key(&self) -> Result<IntakeKey, String> {
        let f = self.key_fields();
        resolve_intake_key(f.key, f.env, f.file)
    }

    /// Exactly one way to the key is given, and `max_event_bytes` is one the intake takes;
    /// the error is `(key, what is expected)`.
    fn check_key_and_size(&self) -> Result<(), (String, String)> {
        let f = self.key_fields();
        let given = [f.key.is_some(), f.env.is_some(), f.file.is_some()];
        check(
            given.iter().filter(|&&g| g).count() == 1,
            "intake_key",
            KEY_CHOICE,
        )?;
        check_max_event_bytes(self.max_event_bytes())
            .map_err(|msg| ("source.max_event_bytes".into(), msg))
    }
}

/// Implements [`ReadingSource`] for a source configuration with the usual fields
/// (`intake_key`, `intake_key_env`, `intake_key_file`, `max_event_bytes`).
macro_rules! reading_source {
    ($config:ty) => {
        impl $crate::config::ReadingSource for $config {
            fn key_fields(&self) -> $crate::config::KeyFields<'_> {
                $crate::config::KeyFields {
                    key: self.intake_key.as_ref(),
                    env: self.intake_key_env.as_deref(),
                    file: self.intake_key_file.as_deref(),
                }
            }
            fn max_event_bytes(&self) -> usize {
                self.max_event_bytes
            }
        }
    };
}
pub(super) use reading_source;

/// `Err((source.KEY, msg))` unless `ok`: the shape of every source's validation error.
pub(super) fn check(ok: bool, key: &str, msg: &str) -> Result<(), (String, String)> {
    if ok {
        Ok(())
    } else {
        Err((format!("source.{key}"), msg.to_owned()))
    }
}

pub(super) fn default_max_event_bytes() -> usize {
    intake_api::MAX_EVENT_BYTES
}

/// What `max_event_bytes` of a line-reading source (syslog, file, stdin, `send`) may be.
pub fn check_max_event_bytes(max: usize) -> Result<(), String> {
    if (256..=intake_api::MAX_EVENT_BYTES).contains(&max) {
        Ok(())
    } else {
        Err("expected 256 to 250000 (the intake refuses larger events)".into())
    }
}

/// A source's intake key, from `intake_key`, `intake_key_env` or `intake_key_file` (exactly
/// one given). The error names the place, never the key.
pub fn resolve_intake_key(
    key: Option<&IntakeKey>,
    env: Option<&str>,
    file: Option<&std::path::Path>,
) -> Result<IntakeKey, String> {
    let key = match (key, env, file) {
        (Some(key), None, None) => key.0.clone(),
        (None, Some(var), None) => std::env::var(var)
            .map_err(|_| format!("the environment variable {var} (intake_key_env) is not set"))?,
        (None, None, Some(file)) => std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read intake_key_file {}: {e}", file.display()))?,
        _ => return Err(KEY_CHOICE.to_owned()),
    };
    let key = key.trim();
    if key.is_empty() {
        return Err("the intake key is empty".to_owned());
    }
    // It travels in an HTTP header: a key that could never be sent is refused at start, not
    // found out by every batch.
    if key.len() > intake_api::MAX_KEY_BYTES || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "the intake key is not an intake key (expected visible ASCII, at most {} bytes)",
            intake_api::MAX_KEY_BYTES
        ));
    }
    Ok(IntakeKey(key.to_owned()))
}
