//! What a mock shares between its connections: the faults in force, what is left of the script,
//! the events it accepted and its stats, with a way to wait for them to change.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::{FaultConfig, ScriptedFault};
use crate::intake_api::IncomingEvent;

/// One event the mock accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceivedEvent {
    pub intake_key: String,
    /// The event date the sender gave, verbatim.
    pub timestamp: Option<String>,
    /// The event as the intake received it.
    pub raw: String,
}

impl From<IncomingEvent> for ReceivedEvent {
    fn from(e: IncomingEvent) -> Self {
        ReceivedEvent {
            intake_key: e.intake_key,
            timestamp: e.timestamp,
            raw: e.raw,
        }
    }
}

/// What the mock saw since it started (or since the last [`MockIntake::clear`](super::MockIntake::clear)).
///
/// Requests to the control API are not counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MockStats {
    /// TCP connections accepted (a keep-alive client opens few).
    pub connections: u64,
    /// Requests to anything but the control API.
    pub requests: u64,
    /// Answers sent, by status.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests whose events were recorded.
    pub accepted_requests: u64,
    /// Events recorded (including those of `accept_then_fail` and `wrong_ids`).
    pub accepted_events: u64,
    /// Connections closed without an answer by a `drop` fault.
    pub dropped_connections: u64,
    /// Requests a scripted fault was applied to.
    pub scripted_faults: u64,
    /// Scripted applications still to come.
    pub script_remaining: u64,
    /// Requests with a gzip body.
    pub gzip_requests: u64,
    /// Request body bytes received, as sent (compressed or not).
    pub body_bytes: u64,
    /// Events no longer kept in memory (the CLI keeps only the latest ones).
    pub forgotten_events: u64,
}

impl MockStats {
    /// How many answers had this status.
    pub fn status_count(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }
}

/// How a mock is run: the CLI prints events as they come and keeps only the latest ones.
pub(super) struct Settings {
    pub(super) tap: Option<mpsc::UnboundedSender<ReceivedEvent>>,
    pub(super) max_kept_events: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            tap: None,
            max_kept_events: usize::MAX,
        }
    }
}

pub(super) struct Shared {
    state: Mutex<State>,
    /// Bumped on every change of events or stats, so that waiters wake up instead of polling.
    changes: watch::Sender<u64>,
    settings: Settings,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) faults: FaultConfig,
    /// What is left of `faults.script`: each step with the number of requests it still applies to.
    script: VecDeque<(ScriptedFault, u32)>,
    pub(super) events: VecDeque<ReceivedEvent>,
    stats: MockStats,
}

impl State {
    /// The stats, with what is left of the script.
    pub(super) fn stats(&self) -> MockStats {
        let mut stats = self.stats.clone();
        stats.script_remaining = self.script.iter().map(|(_, left)| u64::from(*left)).sum();
        stats
    }

    /// Takes the fault scripted for the next request, if any.
    fn next_scripted(&mut self) -> Option<ScriptedFault> {
        while let Some((step, left)) = self.script.front_mut() {
            if *left == 0 {
                self.script.pop_front();
                continue;
            }
            *left -= 1;
            let fault = step.clone();
            if *left == 0 {
                self.script.pop_front();
            }
            return Some(fault);
        }
        None
    }
}

impl Shared {
    pub(super) fn new(settings: Settings) -> Shared {
        Shared {
            state: Mutex::new(State::default()),
            changes: watch::channel(0).0,
            settings,
        }
    }

    /// The state; a panic elsewhere (a test's predicate) must not take the mock down with it.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let r = f(&mut self.lock());
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
        r
    }

    pub(super) fn set_faults(&self, faults: FaultConfig) {
        self.update(|st| {
            st.script = faults
                .script
                .iter()
                .map(|s| (s.clone(), s.times()))
                .collect();
            st.faults = faults;
        });
    }

    pub(super) fn faults(&self) -> FaultConfig {
        self.lock().faults.clone()
    }

    pub(super) fn events(&self) -> Vec<ReceivedEvent> {
        self.lock().events.iter().cloned().collect()
    }

    pub(super) fn stats(&self) -> MockStats {
        self.lock().stats()
    }

    /// Forgets the events and resets the stats; returns how many events were forgotten.
    pub(super) fn clear(&self) -> usize {
        self.update(|st| {
            let n = st.events.len();
            st.events.clear();
            st.stats = MockStats::default();
            n
        })
    }

    pub(super) fn count_connection(&self) {
        self.update(|st| st.stats.connections += 1);
    }

    /// Counts a new intake request and takes its scripted fault.
    pub(super) fn begin_request(&self) -> Option<ScriptedFault> {
        self.update(|st| {
            st.stats.requests += 1;
            let fault = st.next_scripted();
            if fault.is_some() {
                st.stats.scripted_faults += 1;
            }
            fault
        })
    }

    /// Counts a request to no endpoint: it does not consume the script.
    pub(super) fn begin_request_unrouted(&self) {
        self.update(|st| st.stats.requests += 1);
    }

    pub(super) fn count_body(&self, bytes: u64, gzip: bool) {
        self.update(|st| {
            st.stats.body_bytes += bytes;
            st.stats.gzip_requests += u64::from(gzip);
        });
    }

    pub(super) fn count_answer(&self, status: StatusCode) {
        self.update(|st| *st.stats.by_status.entry(status.as_u16()).or_default() += 1);
    }

    pub(super) fn count_drop(&self) {
        self.update(|st| st.stats.dropped_connections += 1);
    }

    /// Records the events of one accepted request and hands them to the CLI printer.
    pub(super) fn record(&self, events: Vec<IncomingEvent>) {
        let max = self.settings.max_kept_events;
        if max == 0 && self.settings.tap.is_none() {
            // Count only (benchmarks): nothing is kept, so nothing is copied.
            let n = events.len() as u64;
            self.update(|st| {
                st.stats.accepted_requests += 1;
                st.stats.accepted_events += n;
                st.stats.forgotten_events += n;
            });
            return;
        }
        let events: Vec<ReceivedEvent> = events.into_iter().map(ReceivedEvent::from).collect();
        self.update(|st| {
            st.stats.accepted_requests += 1;
            st.stats.accepted_events += events.len() as u64;
            st.events.extend(events.iter().cloned());
            while st.events.len() > max {
                st.events.pop_front();
                st.stats.forgotten_events += 1;
            }
        });
        if let Some(tap) = &self.settings.tap {
            for event in events {
                // The printer only goes away when stdout is gone; events are still recorded.
                let _ = tap.send(event);
            }
        }
    }

    /// Waits until `check` holds on the state, or the deadline passes; says whether it holds.
    pub(super) async fn wait_until(
        &self,
        check: impl Fn(&mut State) -> bool,
        timeout: Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        // Subscribing before checking means no change between the check and the wait is missed.
        let mut changes = self.changes.subscribe();
        loop {
            changes.borrow_and_update();
            if check(&mut self.lock()) {
                return true;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return check(&mut self.lock()),
            }
        }
    }
}
