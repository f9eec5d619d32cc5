//! Appending a source's events until the queue says they are durable: the one wait loop that
//! every reading source (syslog, file, stdin) shares.
//!
//! A source that reads a stream it cannot refuse (a socket, a file, a pipe) has nobody to
//! answer "503, retry later" to: when the queue is full it stops reading and waits, so that
//! the back-pressure reaches the writer through the stream itself (TCP flow control, a pipe
//! that fills, a file that simply waits). Nothing is dropped; a stop is the only way out.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::syslog::framing::{Cut, Frame, Oversize};
use crate::config::IntakeKey;
use crate::queue::{now_ms, Checkpoint, DeadLetter, Queue, QueueError};

mod in_flight;
pub use in_flight::{Durable, InFlight, DEPTH};

/// How often a full queue is looked at again.
const FULL_POLL: Duration = Duration::from_millis(50);
/// Pause after an error of the queue that is not "full" (it is logged once per state change).
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The source was stopped before the events were durable (they were not stored).
#[derive(Debug)]
pub struct Stopped;

/// The counters a line-reading source keeps of what it made durable: implemented for each
/// source's stats by [`line_counters!`], so that the three sources count alike.
pub trait LineCounters: std::fmt::Debug + Send + Sync {
    fn counted(&self, tally: &Tally);
    /// Times the source stopped reading because the queue was full.
    fn queue_full_waits(&self) -> &AtomicU64;
}

/// Implements [`LineCounters`] for a source's stats table whose counters have the usual names
/// (`accepted_events`, `truncated_events`, `split_pieces`, `dead_lettered_events`,
/// `invalid_utf8_events`, `queue_full_waits`), `$bytes` naming its byte counter.
macro_rules! line_counters {
    ($stats:ty, $bytes:ident) => {
        impl $crate::sources::durable::LineCounters for $stats {
            fn counted(&self, t: &$crate::sources::durable::Tally) {
                use std::sync::atomic::Ordering::Relaxed;
                self.accepted_events.fetch_add(t.events, Relaxed);
                self.$bytes.fetch_add(t.bytes, Relaxed);
                self.truncated_events.fetch_add(t.truncated, Relaxed);
                self.split_pieces.fetch_add(t.pieces, Relaxed);
                self.dead_lettered_events
                    .fetch_add(t.dead_lettered, Relaxed);
                self.invalid_utf8_events.fetch_add(t.invalid_utf8, Relaxed);
            }
            fn queue_full_waits(&self) -> &std::sync::atomic::AtomicU64 {
                &self.queue_full_waits
            }
        }
    };
}
pub(crate) use line_counters;

/// Whose events a source's lines are, and what becomes of one over the limit.
#[derive(Debug, Clone)]
pub struct Lines {
    pub key: IntakeKey,
    pub oversize: Oversize,
    pub counters: Arc<dyn LineCounters>,
}

/// Appends one source's events, waiting out a full queue.
#[derive(Debug)]
pub struct Appender {
    pub queue: Queue,
    /// The source's name in logs: `syslog source tcp://127.0.0.1:10514`, `stdin source`.
    pub name: String,
    lines: Lines,
    /// What a full queue means for this source's writers, said when reading stops.
    full_hint: &'static str,
    /// Whether the last append found the queue full or failing (logged when this changes).
    waiting: AtomicBool,
}

impl Appender {
    pub fn new(queue: Queue, name: String, lines: Lines, full_hint: &'static str) -> Appender {
        Appender {
            queue,
            name,
            lines,
            full_hint,
            waiting: AtomicBool::new(false),
        }
    }

    /// Stores `frames` as the source's events with `checkpoints` (one atomic commit), counts
    /// them, and returns once they are durable; `Err` only if `stop` comes first (nothing of
    /// them was stored, the checkpoints did not move).
    pub async fn store(
        &self,
        frames: &[Frame],
        checkpoints: &[Checkpoint],
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        if frames.is_empty() && checkpoints.is_empty() {
            return Ok(());
        }
        let l = &self.lines;
        let tally = self
            .append_frames(
                frames,
                &l.key,
                l.oversize,
                checkpoints,
                l.counters.queue_full_waits(),
                stop,
            )
            .await?;
        l.counters.counted(&tally);
        Ok(())
    }

    /// Appends the events of `frames` for `key` with `checkpoints` (one atomic commit) and
    /// returns once they are durable, with what they were (for the source's counters);
    /// `Err` only if `stop` comes first. With [`Oversize::DeadLetter`], the frames cut for
    /// being over the limit are stored as dead letters instead, first, in a commit of their
    /// own: a checkpoint moves only with the events, so a crash between the two makes their
    /// lines be read again and the dead letters kept twice, never lost.
    async fn append_frames(
        &self,
        frames: &[Frame],
        key: &IntakeKey,
        oversize: Oversize,
        checkpoints: &[Checkpoint],
        full_waits: &AtomicU64,
        stop: &CancellationToken,
    ) -> Result<Tally, Stopped> {
        let Prepared { lines, dead, tally } = prepare(frames, key, oversize);
        if !dead.is_empty() {
            self.until_stored(full_waits, stop, || {
                self.queue.add_dead_letters(dead.clone())
            })
            .await?;
        }
        self.until_stored(full_waits, stop, || {
            self.queue
                .append_lines(&key.0, &lines, checkpoints.to_vec())
        })
        .await?;
        Ok(tally)
    }

    /// Runs `attempt` until it succeeds, waiting while the queue is full and retrying its
    /// errors; `Err` only if `stop` comes first (or the queue is closed).
    async fn until_stored<F, Fut>(
        &self,
        full_waits: &AtomicU64,
        stop: &CancellationToken,
        mut attempt: F,
    ) -> Result<(), Stopped>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), QueueError>>,
    {
        loop {
            match attempt().await {
                Ok(()) => {
                    self.wait_state(false, None);
                    return Ok(());
                }
                Err(e) => self.after_error(&e, full_waits, stop).await?,
            }
        }
    }

    /// Waits before an append that failed with `e` is tried again: while the queue is full,
    /// or a pause after another error (said once per state change); `Err` if `stop` comes
    /// first or the queue is closed.
    async fn after_error(
        &self,
        e: &QueueError,
        full_waits: &AtomicU64,
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        match e {
            QueueError::Closed => Err(Stopped),
            QueueError::Full => {
                self.wait_state(true, None);
                full_waits.fetch_add(1, Ordering::Relaxed);
                pause(FULL_POLL, stop).await?;
                while self.queue.is_full() {
                    pause(FULL_POLL, stop).await?;
                }
                Ok(())
            }
            e => {
                self.wait_state(true, Some(e));
                pause(ERROR_PAUSE, stop).await
            }
        }
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

/// The status a dead letter of an over-long frame is kept with: what the intake answers an
/// event over its limit.
pub const OVERSIZE_STATUS: u16 = 413;

/// Frames made into what the queue stores: lines borrowing the frames' bytes (copied only
/// where they were not UTF-8), and dead letters.
#[derive(Debug, Default)]
pub struct Prepared<'a> {
    pub lines: Vec<Cow<'a, str>>,
    pub dead: Vec<DeadLetter>,
    pub tally: Tally,
}

/// What the counters of a line-reading source add for frames made durable.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Events to send (lines, messages, pieces of split ones).
    pub events: u64,
    /// Their bytes, as stored.
    pub bytes: u64,
    pub truncated: u64,
    pub pieces: u64,
    /// Frames (sent or dead-lettered) that were not valid UTF-8 (replaced, [`text`]).
    pub invalid_utf8: u64,
    /// Over-long frames kept as dead letters instead of sent (`oversize = "dead_letter"`).
    pub dead_lettered: u64,
}

/// `frames` as events of `key`; with [`Oversize::DeadLetter`], a frame cut for being over
/// the limit (its first bytes, marked with how long it was) is a dead letter instead.
pub fn prepare<'a>(frames: &'a [Frame], key: &IntakeKey, oversize: Oversize) -> Prepared<'a> {
    let mut out = Prepared {
        lines: Vec::with_capacity(frames.len()),
        ..Prepared::default()
    };
    let now = now_ms();
    for frame in frames {
        let raw = text(&frame.message).unwrap_or_else(|lossy| {
            out.tally.invalid_utf8 += 1;
            lossy
        });
        match (frame.cut, oversize) {
            (Cut::Truncated { total }, Oversize::DeadLetter) => {
                out.tally.dead_lettered += 1;
                out.dead.push(DeadLetter {
                    intake_key: key.0.clone(),
                    timestamp: None,
                    received_at_ms: now,
                    event: raw.into_owned(),
                    status: OVERSIZE_STATUS,
                    reason: format!(
                        "not sent by sekoia-forwarder: {total} bytes, over max_event_bytes \
                         (oversize = \"dead_letter\"); its first bytes are kept"
                    ),
                    dead_at_ms: now,
                });
                continue;
            }
            (Cut::Truncated { .. }, _) => out.tally.truncated += 1,
            (Cut::Piece, _) => out.tally.pieces += 1,
            (Cut::Whole, _) => {}
        }
        out.tally.events += 1;
        out.tally.bytes += frame.message.len() as u64;
        out.lines.push(raw);
    }
    out
}

/// A message as the intake gets it: JSON carries text, so bytes that are not UTF-8 are
/// replaced by U+FFFD (`Err`, counted in `invalid_utf8_events`); the rest is kept as sent,
/// borrowed from the bytes read.
pub fn text(message: &[u8]) -> Result<Cow<'_, str>, Cow<'_, str>> {
    match std::str::from_utf8(message) {
        Ok(text) => Ok(Cow::Borrowed(text)),
        Err(_) => Err(String::from_utf8_lossy(message)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn frame(text: &[u8], cut: Cut) -> Frame {
        Frame {
            message: Bytes::copy_from_slice(text),
            cut,
        }
    }

    #[test]
    fn a_truncated_frame_is_a_dead_letter_only_when_asked() {
        let key = IntakeKey("k".into());
        let frames = [
            frame(b"whole", Cut::Whole),
            frame(b"long [truncated]", Cut::Truncated { total: 9000 }),
            frame(b"bad \xff", Cut::Whole),
        ];
        let sent = prepare(&frames, &key, Oversize::Truncate);
        assert_eq!(sent.lines.len(), 3);
        assert!(sent.dead.is_empty());
        assert_eq!(sent.tally.truncated, 1);
        assert_eq!(sent.tally.invalid_utf8, 1);
        let kept = prepare(&frames, &key, Oversize::DeadLetter);
        assert_eq!(kept.lines.len(), 2);
        assert_eq!(kept.tally.events, 2);
        assert_eq!(kept.tally.dead_lettered, 1);
        assert_eq!(kept.tally.truncated, 0);
        assert_eq!(kept.dead[0].status, OVERSIZE_STATUS);
        assert_eq!(kept.dead[0].event, "long [truncated]");
        assert!(
            kept.dead[0].reason.contains("9000 bytes"),
            "{}",
            kept.dead[0].reason
        );
        assert_eq!(kept.lines[1], "bad \u{fffd}");
    }
}
