//! Appending a source's events until the queue says they are durable: the one wait loop that
//! every reading source (syslog, file, stdin) shares.
//!
//! A source that reads a stream it cannot refuse (a socket, a file, a pipe) has nobody to
//! answer "503, retry later" to: when the queue is full it stops reading and waits, so that
//! the back-pressure reaches the writer through the stream itself (TCP flow control, a pipe
//! that fills, a file that simply waits). Nothing is dropped; a stop is the only way out.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::syslog::framing::{Cut, Frame};
use crate::config::IntakeKey;
use crate::intake_api::IncomingEvent;
use crate::queue::{Checkpoint, Queue, QueueError};

/// How often a full queue is looked at again.
const FULL_POLL: Duration = Duration::from_millis(50);
/// Pause after an error of the queue that is not "full" (it is logged once per state change).
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The source was stopped before the events were durable (they were not stored).
#[derive(Debug)]
pub struct Stopped;

/// Appends one source's events, waiting out a full queue.
#[derive(Debug)]
pub struct Appender {
    pub queue: Queue,
    /// The source's name in logs: `syslog source tcp://127.0.0.1:10514`, `stdin source`.
    pub name: String,
    /// What a full queue means for this source's writers, said when reading stops.
    full_hint: &'static str,
    /// Whether the last append found the queue full or failing (logged when this changes).
    waiting: AtomicBool,
}

impl Appender {
    pub fn new(queue: Queue, name: String, full_hint: &'static str) -> Appender {
        Appender {
            queue,
            name,
            full_hint,
            waiting: AtomicBool::new(false),
        }
    }

    /// Appends the events `events()` gives (called again for each try: an append consumes
    /// them) with `checkpoints`, in one atomic commit, and returns once they are durable;
    /// `full_waits` counts the times the queue was full. `Err` only if `stop` comes first.
    pub async fn append(
        &self,
        mut events: impl FnMut() -> Vec<IncomingEvent>,
        checkpoints: &[Checkpoint],
        full_waits: &AtomicU64,
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        loop {
            match self
                .queue
                .append_with_checkpoints(events(), checkpoints.to_vec())
                .await
            {
                Ok(()) => {
                    self.wait_state(false, None);
                    return Ok(());
                }
                Err(QueueError::Closed) => return Err(Stopped),
                Err(QueueError::Full) => {
                    self.wait_state(true, None);
                    full_waits.fetch_add(1, Ordering::Relaxed);
                    pause(FULL_POLL, stop).await?;
                    while self.queue.is_full() {
                        pause(FULL_POLL, stop).await?;
                    }
                }
                Err(e) => {
                    self.wait_state(true, Some(&e));
                    pause(ERROR_PAUSE, stop).await?;
                }
            }
        }
    }

    /// Appends the events of `frames` for `key` with `checkpoints` (one atomic commit) and
    /// returns once they are durable, with what they were (for the source's counters);
    /// `Err` only if `stop` comes first.
    pub async fn append_frames(
        &self,
        frames: &[Frame],
        key: &IntakeKey,
        checkpoints: &[Checkpoint],
        full_waits: &AtomicU64,
        stop: &CancellationToken,
    ) -> Result<Tally, Stopped> {
        let mut invalid_utf8 = 0;
        self.append(
            || {
                let (events, invalid) = events(frames, key);
                invalid_utf8 = invalid;
                events
            },
            checkpoints,
            full_waits,
            stop,
        )
        .await?;
        Ok(Tally {
            invalid_utf8,
            ..Tally::of(frames)
        })
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
                "queue full: the source stops reading until there is room ({})",
                self.full_hint
            ),
            (true, Some(e)) => tracing::error!(
                source = %self.name,
                error = %e,
                "cannot store the source's events; reading stops and the append is retried"
            ),
            (false, _) => tracing::info!(source = %self.name, "source reading again"),
        }
    }
}

async fn pause(time: Duration, stop: &CancellationToken) -> Result<(), Stopped> {
    tokio::select! {
        () = stop.cancelled() => Err(Stopped),
        () = tokio::time::sleep(time) => Ok(()),
    }
}

/// The events of `frames` for `key`, and how many of them were not valid UTF-8 (replaced,
/// [`text`]).
pub fn events(frames: &[Frame], key: &IntakeKey) -> (Vec<IncomingEvent>, u64) {
    let mut invalid_utf8 = 0;
    let events = frames
        .iter()
        .map(|frame| IncomingEvent {
            intake_key: key.0.clone(),
            timestamp: None,
            raw: text(&frame.message).unwrap_or_else(|lossy| {
                invalid_utf8 += 1;
                lossy
            }),
        })
        .collect();
    (events, invalid_utf8)
}

/// What the counters of a line-reading source add for frames made durable.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub events: u64,
    pub bytes: u64,
    pub truncated: u64,
    pub pieces: u64,
    /// Events that were not valid UTF-8 (replaced).
    pub invalid_utf8: u64,
}

impl Tally {
    /// What `frames` are (`invalid_utf8` is known only once they are events: 0 here).
    pub fn of(frames: &[Frame]) -> Tally {
        let mut t = Tally {
            events: frames.len() as u64,
            ..Tally::default()
        };
        for frame in frames {
            t.bytes += frame.message.len() as u64;
            match frame.cut {
                Cut::Whole => {}
                Cut::Truncated { .. } => t.truncated += 1,
                Cut::Piece => t.pieces += 1,
            }
        }
        t
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
