//! From messages to durable events: what every syslog transport shares.
//!
//! Syslog has no acknowledgement (UDP none at all, TCP and TLS only a byte stream), so the
//! promise is about what reached the queue: a transport reads its next messages only once the
//! last ones are durable. When the queue is full it stops reading and waits; the kernel's
//! flow control then pushes back on a TCP sender, and a UDP sender's datagrams pile up in the
//! socket buffer, then are dropped by the kernel and counted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::framing::{Cut, Frame};
use super::SyslogSourceStats;
use crate::config::IntakeKey;
use crate::intake_api::IncomingEvent;
use crate::queue::{Queue, QueueError};

/// How often a full queue is looked at again.
const FULL_POLL: Duration = Duration::from_millis(50);
/// Pause after an error of the queue that is not "full" (it is logged once per state change).
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The source was stopped before the messages were durable.
#[derive(Debug)]
pub struct Stopped;

/// What every connection (or the UDP socket) of one source shares.
#[derive(Debug)]
pub struct Store {
    pub queue: Queue,
    intake_key: IntakeKey,
    pub stats: Arc<SyslogSourceStats>,
    /// The source's name in logs: `syslog source tcp://127.0.0.1:10514`.
    pub name: String,
    /// Whether the last append found the queue full (logged when this changes).
    waiting: AtomicBool,
}

impl Store {
    pub fn new(
        queue: Queue,
        intake_key: IntakeKey,
        stats: Arc<SyslogSourceStats>,
        name: String,
    ) -> Store {
        Store {
            queue,
            intake_key,
            stats,
            name,
            waiting: AtomicBool::new(false),
        }
    }

    /// Appends `frames` as events and returns once they are durable, waiting as long as the
    /// queue is full; `Err` only if `stop` comes first (they were not stored).
    pub async fn store(&self, frames: &[Frame], stop: &CancellationToken) -> Result<(), Stopped> {
        if frames.is_empty() {
            return Ok(());
        }
        let stored = self.append_until_stored(frames, stop).await;
        if stored.is_err() {
            // What was read from the socket and is not durable is lost with the connection:
            // said, never silent.
            tracing::warn!(
                source = %self.name,
                messages = frames.len(),
                "the source stopped while the queue could not take its messages: they were \
                 read from the socket but not stored"
            );
        }
        stored
    }

    async fn append_until_stored(
        &self,
        frames: &[Frame],
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        loop {
            let (events, invalid_utf8) = self.events(frames);
            match self.queue.append(events).await {
                Ok(()) => {
                    self.stored(frames, invalid_utf8);
                    return Ok(());
                }
                Err(QueueError::Closed) => return Err(Stopped),
                Err(QueueError::Full) => {
                    self.wait_state(true, None);
                    self.stats.queue_full_waits.fetch_add(1, Ordering::Relaxed);
                    self.pause(FULL_POLL, stop).await?;
                    while self.queue.is_full() {
                        self.pause(FULL_POLL, stop).await?;
                    }
                }
                Err(e) => {
                    self.wait_state(true, Some(&e));
                    self.pause(ERROR_PAUSE, stop).await?;
                }
            }
        }
    }

    /// The events of `frames`, and how many of them were not valid UTF-8.
    fn events(&self, frames: &[Frame]) -> (Vec<IncomingEvent>, u64) {
        let mut invalid_utf8 = 0;
        let events = frames
            .iter()
            .map(|frame| IncomingEvent {
                intake_key: self.intake_key.0.clone(),
                timestamp: None,
                raw: text(&frame.message).unwrap_or_else(|lossy| {
                    invalid_utf8 += 1;
                    lossy
                }),
            })
            .collect();
        (events, invalid_utf8)
    }

    fn stored(&self, frames: &[Frame], invalid_utf8: u64) {
        let s = &self.stats;
        s.accepted_events
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        let bytes: usize = frames.iter().map(|f| f.message.len()).sum();
        s.message_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        for frame in frames {
            match frame.cut {
                Cut::Whole => {}
                Cut::Truncated { .. } => {
                    s.truncated_events.fetch_add(1, Ordering::Relaxed);
                }
                Cut::Piece => {
                    s.split_pieces.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        s.invalid_utf8_events
            .fetch_add(invalid_utf8, Ordering::Relaxed);
        self.wait_state(false, None);
    }

    /// Logs once when appends start failing (full queue, or an error) and once when they work
    /// again: one line per state change, not per try.
    fn wait_state(&self, waiting: bool, error: Option<&QueueError>) {
        if self.waiting.swap(waiting, Ordering::Relaxed) == waiting {
            return;
        }
        match (waiting, error) {
            (true, None) => tracing::warn!(
                source = %self.name,
                "queue full: the syslog source stops reading until there is room (TCP senders \
                 are pushed back, UDP datagrams wait in the socket buffer)"
            ),
            (true, Some(e)) => tracing::error!(
                source = %self.name,
                error = %e,
                "cannot store syslog messages; reading stops and the append is retried"
            ),
            (false, _) => tracing::info!(source = %self.name, "syslog source reading again"),
        }
    }

    async fn pause(&self, time: Duration, stop: &CancellationToken) -> Result<(), Stopped> {
        tokio::select! {
            () = stop.cancelled() => Err(Stopped),
            () = tokio::time::sleep(time) => Ok(()),
        }
    }
}

/// A message as the intake gets it: JSON carries text, so bytes that are not UTF-8 are
/// replaced by U+FFFD (`Err`, counted in `invalid_utf8_events`); the rest is kept as sent.
pub fn text(message: &[u8]) -> Result<String, String> {
    match std::str::from_utf8(message) {
        Ok(text) => Ok(text.to_owned()),
        Err(_) => Err(String::from_utf8_lossy(message).into_owned()),
    }
}
