//! The faults a mock can be told to inject, and their check: the JSON of `PUT /_mock/faults`.

use std::collections::HashMap;

use hyper::header::HeaderValue;
use serde::{Deserialize, Serialize};

use super::answers::answerable;

/// The faults the mock injects. `FaultConfig::default()` (or `{}` in JSON) is a healthy intake.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Applied to successive intake requests, in order; normal answers once exhausted.
    pub script: Vec<ScriptedFault>,
    /// Refuse (400) any request with an event containing this text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reject_containing: Option<String>,
    /// Refuse (413) bodies bigger than this (the 10 MiB limit of the intake always applies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<usize>,
    /// Answer requests carrying one of these intake keys with the given status (401, 403...).
    pub key_status: HashMap<String, u16>,
    /// Added to the time of every answer, in milliseconds.
    pub delay_ms: u64,
}

/// One step of the script: a fault, applied to `times` successive requests (1 if not given).
///
/// In JSON: `{"fault": "<snake_case name>", ..., "times": N}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fault", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScriptedFault {
    /// Answer `status` with a JSON error body (and `Retry-After` if given); record nothing.
    Status {
        status: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_secs: Option<u64>,
        #[serde(default = "one")]
        times: u32,
    },
    /// Close the connection without answering; record nothing.
    Drop {
        #[serde(default = "one")]
        times: u32,
    },
    /// Record the events, then answer normally after `delay_ms`.
    Slow {
        delay_ms: u64,
        #[serde(default = "one")]
        times: u32,
    },
    /// Record the events, then answer 500: the intake kept events whose answer is lost.
    AcceptThenFail {
        #[serde(default = "one")]
        times: u32,
    },
    /// Record the events, then answer 200 with `len + delta` ids (at least 0).
    WrongIds {
        delta: i32,
        #[serde(default = "one")]
        times: u32,
    },
    /// Answer `status` with `Retry-After` as an HTTP date `after_secs` from now; record nothing.
    RetryAtDate {
        status: u16,
        after_secs: u64,
        #[serde(default = "one")]
        times: u32,
    },
    /// Answer a redirect (`status` 300..=399) to `location`; record nothing.
    Redirect {
        status: u16,
        location: String,
        #[serde(default = "one")]
        times: u32,
    },
}

fn one() -> u32 {
    1
}

impl ScriptedFault {
    /// How many successive requests this step applies to.
    pub fn times(&self) -> u32 {
        match *self {
            ScriptedFault::Status { times, .. }
            | ScriptedFault::Drop { times }
            | ScriptedFault::Slow { times, .. }
            | ScriptedFault::AcceptThenFail { times }
            | ScriptedFault::WrongIds { times, .. }
            | ScriptedFault::RetryAtDate { times, .. }
            | ScriptedFault::Redirect { times, .. } => times,
        }
    }
}

/// Why a [`FaultConfig`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidFaults {
    #[error("{0} is not a status the mock can answer (200..=599)")]
    Status(u16),
    #[error("{0} is not a redirect status (300..=399)")]
    Redirect(u16),
    #[error("{0:?} cannot be sent as a Location header")]
    Location(String),
}

impl FaultConfig {
    /// Checks that every status of the config can be answered.
    pub fn validate(&self) -> Result<(), InvalidFaults> {
        for step in &self.script {
            if let ScriptedFault::Redirect {
                status, location, ..
            } = step
            {
                if !(300..=399).contains(status) {
                    return Err(InvalidFaults::Redirect(*status));
                }
                if HeaderValue::from_str(location).is_err() {
                    return Err(InvalidFaults::Location(location.clone()));
                }
            }
        }
        let scripted = self.script.iter().filter_map(|s| match s {
            ScriptedFault::Status { status, .. } | ScriptedFault::RetryAtDate { status, .. } => {
                Some(*status)
            }
            _ => None,
        });
        match scripted
            .chain(self.key_status.values().copied())
            .find(|s| answerable(*s).is_none())
        {
            Some(bad) => Err(InvalidFaults::Status(bad)),
            None => Ok(()),
        }
    }
}
