//! Delivering one batch until every event in it is acknowledged or dead-lettered.
//!
//! A batch is a run of whole chunks of one lane, read in queue order. It owns those chunks
//! until it ends: no other batch reads them (the lane's cursor has moved past), so partial
//! progress can be written back without races.
//!
//! - Retryable answers (network, timeout, 429, 5xx, a wrong id count) repeat the same request
//!   after a backoff delay, for ever; the events wait in the queue.
//! - 413 splits the request in two, down to single events; a single event that is still too
//!   large is dead-lettered.
//! - 400 bisects: halves are sent separately until the refused events are isolated and
//!   dead-lettered, while every other event is delivered.
//! - 401/403 keeps the events and retries slowly; other lanes are not held up because a batch
//!   only holds a request slot while its request is on the wire.
//! - 3xx (a redirect, never followed) is a failed try, retried with backoff.
//! - A request that cannot be built is a local failure, never taken for an answer (it used to
//!   pass for a 400 and be bisected into the dead letters without a request sent): an event
//!   date that cannot be a header is left out (the intake then dates the events at
//!   reception); an intake key that cannot be a header cannot be sent at all, so the batch is
//!   dead-lettered at once, with status 0 and a reason that says so.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::client::{Headers, Outcome, MAX_REQUEST_BODY};
use super::retry::Retry;
use super::Ctx;
use crate::config::EventTime;
use crate::crash_point;
use crate::intake_api::{reception_date, redact_key};
use crate::queue::{now_ms, Ack, Chunk, ChunkView, DeadLetter};

/// Where each event of the batch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Pending,
    Delivered,
    Dead,
}

/// One chunk of the batch: where it is in the queue, and which of the batch's events it holds.
#[derive(Debug, Clone)]
struct ChunkSpan {
    seq: u64,
    events: Range<usize>,
    received_at_ms: u64,
}

/// A batch of one lane, held as the `/jsons` body it is sent as (no decoded events): the
/// events are escaped straight from the queue's bytes into the body, and a request for all of
/// them sends the body itself, retries included, without a copy. The rare paths that need an
/// event back (a dead letter, the rest of a chunk half delivered) unescape it from the body.
pub struct Batch {
    pub lane: u32,
    /// The queue generation the chunks were read from.
    pub gen: u64,
    pub intake_key: String,
    /// The sender's event date of every event of the batch, if they have one.
    pub timestamp: Option<String>,
    /// When the batch's first chunk was received (ms since the Unix epoch; 0: unknown): the
    /// date its undated events are sent with ([`Batch::event_date`]).
    received_at_ms: u64,
    /// `[e0,e1,...]`: the events as JSON strings.
    body: Bytes,
    /// Where each event's JSON string ends in `body` (it starts after the `[` or the comma
    /// that follows the one before).
    ends: Vec<usize>,
    chunks: Vec<ChunkSpan>,
}

/// Builds a [`Batch`] from the chunks a queue read hands over.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    intake_key: String,
    timestamp: Option<String>,
    received_at_ms: u64,
    body: Vec<u8>,
    ends: Vec<usize>,
    chunks: Vec<ChunkSpan>,
}

impl BatchBuilder {
    /// Adds a chunk's events (chunks of one read share the intake key and the event date).
    pub fn push(&mut self, seq: u64, chunk: &ChunkView<'_>) {
        if self.chunks.is_empty() {
            chunk.intake_key.clone_into(&mut self.intake_key);
            self.timestamp = chunk.timestamp.map(str::to_owned);
            self.received_at_ms = chunk.received_at_ms;
            self.body.reserve(chunk.payload_bytes() * 2);
            self.body.push(b'[');
        }
        let first = self.ends.len();
        for event in &chunk.events {
            if !self.ends.is_empty() {
                self.body.push(b',');
            }
            // SIMD escaping: serde_json's byte-by-byte escaping was 7 % of a live forwarder's
            // CPU. Its output is the event as a JSON string, quotes included.
            json_escape_simd::escape_into(event, &mut self.body);
            self.ends.push(self.body.len());
        }
        self.chunks.push(ChunkSpan {
            seq,
            events: first..self.ends.len(),
            received_at_ms: chunk.received_at_ms,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// The event date of the batch (of its first chunk; every chunk of a batch shares it).
    pub fn timestamp(&self) -> Option<&str> {
        self.timestamp.as_deref()
    }

    /// When the batch's first chunk was received: the chunks read on after it must have been
    /// received within the tolerance of it (`queue::BatchDate::admits`).
    pub fn received_at_ms(&self) -> u64 {
        self.received_at_ms
    }

    pub fn finish(mut self, lane: u32, gen: u64) -> Batch {
        if self.body.is_empty() {
            self.body.push(b'[');
        }
        self.body.push(b']');
        // The escaper reserves room for the worst case of each event; give back what a
        // batch in flight would otherwise hold for nothing.
        if self.body.capacity() > self.body.len() + self.body.len() / 4 {
            self.body.shrink_to_fit();
        }
        Batch {
            lane,
            gen,
            intake_key: self.intake_key,
            timestamp: self.timestamp,
            received_at_ms: self.received_at_ms,
            body: Bytes::from(self.body),
            ends: self.ends,
            chunks: self.chunks,
        }
    }
}

impl Batch {
    fn len(&self) -> usize {
        self.ends.len()
    }

    /// The `X-SEKOIAIO-EVENT-TIMESTAMP` of the batch's requests: the sender's date if the
    /// events have one; else, with `event_time = "reception"`, the reception time of the
    /// batch's first chunk (every chunk of the batch was received within
    /// `event_time_tolerance_ms` of it: the read cut the batch there). The first, not a
    /// middle or a mean: it is known when the batch begins, before linger decides how many
    /// chunks follow, so every request of the batch (retries, the halves of a 413 or 400)
    /// carries the same date, and that date is the true reception time of real events; no
    /// event is dated more than the tolerance before it was received, and none after (but
    /// for a wall clock stepped back within the batch). A
    /// chunk whose reception time is unknown (0) goes without a date, as with `"intake"`.
    pub fn event_date(&self, event_time: EventTime) -> Option<Cow<'_, str>> {
        if let Some(ts) = &self.timestamp {
            return Some(Cow::Borrowed(ts));
        }
        match event_time {
            EventTime::Reception => reception_date(self.received_at_ms).map(Cow::Owned),
            EventTime::Intake => None,
        }
    }

    /// Where event `i`'s JSON string is in the body.
    fn span(&self, i: usize) -> Range<usize> {
        let start = if i == 0 { 1 } else { self.ends[i - 1] + 1 };
        start..self.ends[i]
    }

    /// The `/jsons` body of the events of `range` (not empty).
    fn body(&self, range: &Range<usize>) -> Bytes {
        if range.start == 0 && range.end == self.len() {
            return self.body.clone();
        }
        let inner = self.span(range.start).start..self.ends[range.end - 1];
        let mut body = Vec::with_capacity(inner.len() + 2);
        body.push(b'[');
        body.extend_from_slice(&self.body[inner]);
        body.push(b']');
        Bytes::from(body)
    }

    /// Event `i` as it was queued.
    fn event(&self, i: usize) -> String {
        let json = &self.body[self.span(i)];
        // The body was written by serde_json from a string: reading it back cannot fail.
        serde_json::from_slice(json).unwrap_or_else(|_| String::from_utf8_lossy(json).into())
    }
}

struct Progress {
    batch: Batch,
    fates: Vec<Fate>,
    /// Chunks already removed from the store.
    removed: Vec<bool>,
    dead: Vec<DeadLetter>,
}

impl Progress {
    fn new(batch: Batch) -> Progress {
        Progress {
            fates: vec![Fate::Pending; batch.len()],
            removed: vec![false; batch.chunks.len()],
            batch,
            dead: Vec::new(),
        }
    }

    fn settle(&mut self, range: &Range<usize>, fate: Fate) {
        self.fates[range.clone()].fill(fate);
    }

    fn bury(&mut self, index: usize, status: u16, reason: &str) {
        let received_at_ms = self
            .batch
            .chunks
            .iter()
            .find(|c| c.events.contains(&index))
            .map_or(0, |c| c.received_at_ms);
        self.dead.push(DeadLetter {
            intake_key: self.batch.intake_key.clone(),
            timestamp: self.batch.timestamp.clone(),
            received_at_ms,
            event: self.batch.event(index),
            status,
            reason: reason.to_owned(),
            dead_at_ms: now_ms(),
        });
        self.fates[index] = Fate::Dead;
    }

    /// What to write back now: chunks that are done are removed, chunks with some events done
    /// are rewritten with the rest, dead letters are stored.
    fn take_ack(&mut self) -> Ack {
        let mut ack = Ack {
            gen: self.batch.gen,
            dead: std::mem::take(&mut self.dead),
            ..Ack::default()
        };
        for (c, chunk) in self.batch.chunks.iter().enumerate() {
            if self.removed[c] {
                continue;
            }
            let fates = &self.fates[chunk.events.clone()];
            if fates.iter().all(|f| *f != Fate::Pending) {
                ack.remove.push(chunk.seq);
                self.removed[c] = true;
            } else if fates.iter().any(|f| *f != Fate::Pending) {
                let rest = Chunk {
                    intake_key: self.batch.intake_key.clone(),
                    timestamp: self.batch.timestamp.clone(),
                    received_at_ms: chunk.received_at_ms,
                    events: chunk
                        .events
                        .clone()
                        .filter(|i| self.fates[*i] == Fate::Pending)
                        .map(|i| self.batch.event(i))
                        .collect(),
                };
                ack.rewrite.push((chunk.seq, rest));
            }
        }
        ack
    }
}

/// Delivers `batch` until all of it is acknowledged or dead-lettered, or shutdown.
pub async fn deliver(ctx: Arc<Ctx>, batch: Batch) {
    let total = batch.len();
    let lane = batch.lane;
    let key = redact_key(&batch.intake_key);
    let mut progress = Progress::new(batch);
    let mut work: VecDeque<Range<usize>> = VecDeque::new();
    if total > 0 {
        work.push_back(0..total);
    } else if !ctx.write_back(lane, progress.take_ack()).await {
        // Chunks without events: nothing to send, only to remove.
        return;
    }
    let Some(headers) = prepare(&ctx, &mut progress, &key).await else {
        return;
    };
    let mut retry = Retry::new(ctx.config.backoff_initial(), ctx.config.backoff_max());
    while let Some(range) = work.pop_front() {
        let body = progress.batch.body(&range);
        if body.len() > MAX_REQUEST_BODY && range.len() > 1 {
            split(&mut work, range);
            continue;
        }
        let outcome = ctx.send(&headers, body, range.len()).await;
        crash_point!("delivery-after-answer");
        match outcome {
            Outcome::Acked => {
                crash_point!("delivery-after-ack-check");
                retry.reset();
                ctx.stats
                    .acked_events
                    .fetch_add(range.len() as u64, Ordering::Relaxed);
                progress.settle(&range, Fate::Delivered);
                if !ctx.write_back(lane, progress.take_ack()).await {
                    return;
                }
                crash_point!("delivery-after-remove");
            }
            Outcome::TooLarge { reason } | Outcome::Rejected { reason, .. } if range.len() > 1 => {
                tracing::warn!(lane, intake_key = %key, events = range.len(), %reason,
                    "intake refused a batch; splitting it to find what it refuses");
                split(&mut work, range);
            }
            Outcome::TooLarge { reason } => {
                bury_one(&ctx, &mut progress, range.start, 413, &reason, lane, &key);
                if !ctx.write_back(lane, progress.take_ack()).await {
                    return;
                }
            }
            Outcome::Rejected { status, reason } => {
                bury_one(
                    &ctx,
                    &mut progress,
                    range.start,
                    status,
                    &reason,
                    lane,
                    &key,
                );
                if !ctx.write_back(lane, progress.take_ack()).await {
                    return;
                }
            }
            Outcome::AuthFailed { status, reason } => {
                ctx.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(lane, intake_key = %key, status, %reason,
                    retry_in_secs = ctx.config.auth_retry_secs,
                    "the intake refuses this intake key (wrong or revoked?); its events are kept \
                     and retried slowly, other keys keep flowing");
                work.push_front(range);
                if !ctx.sleep(ctx.config.auth_retry()).await {
                    return;
                }
            }
            Outcome::Redirected { .. } => {
                // Counted and logged once by `Ctx::send`: a redirecting intake answers every
                // request so, and one line per try would flood the log.
                ctx.stats.retries.fetch_add(1, Ordering::Relaxed);
                work.push_front(range);
                if !ctx.sleep(retry.next_delay(None)).await {
                    return;
                }
            }
            Outcome::Retry {
                retry_after,
                reason,
            } => {
                ctx.stats.retries.fetch_add(1, Ordering::Relaxed);
                let delay = retry.next_delay(retry_after);
                tracing::warn!(lane, intake_key = %key, events = range.len(), %reason,
                    retry_in_ms = delay.as_millis() as u64, "delivery failed; will retry");
                work.push_front(range);
                if !ctx.sleep(delay).await {
                    return;
                }
            }
        }
    }
}

/// The headers of the batch's requests. A batch that cannot be sent at all is dead-lettered
/// here (None; also None if shutdown came before it was recorded).
async fn prepare(ctx: &Ctx, progress: &mut Progress, key: &str) -> Option<Headers> {
    let lane = progress.batch.lane;
    let events = progress.batch.len();
    let date = progress.batch.event_date(ctx.config.event_time);
    let failure = match ctx
        .client
        .headers(&progress.batch.intake_key, date.as_deref())
    {
        Ok(headers) => {
            if progress.batch.timestamp.is_none() && date.is_some() {
                ctx.stats
                    .reception_dated_events
                    .fetch_add(events as u64, Ordering::Relaxed);
            }
            if let Some(why) = headers.date_left_out {
                ctx.stats
                    .undated_events
                    .fetch_add(events as u64, Ordering::Relaxed);
                tracing::warn!(lane, intake_key = %key, events,
                    date_bytes = date.as_ref().map_or(0, |d| d.len()),
                    "the events' date cannot be sent as a header ({why}); they are sent without \
                     it, and the intake dates them at reception");
            }
            return Some(headers);
        }
        Err(failure) => failure,
    };
    let reason = format!("never sent: {failure} (a local failure, not an answer)");
    tracing::error!(lane, intake_key = %key, events, %reason,
        "events that cannot be sent are kept in the dead-letter store");
    ctx.stats
        .dead_letters
        .fetch_add(events as u64, Ordering::Relaxed);
    for i in 0..events {
        progress.bury(i, 0, &reason);
    }
    ctx.write_back(lane, progress.take_ack()).await;
    None
}

fn split(work: &mut VecDeque<Range<usize>>, range: Range<usize>) {
    let mid = range.start + range.len() / 2;
    work.push_front(mid..range.end);
    work.push_front(range.start..mid);
}

fn bury_one(
    ctx: &Ctx,
    progress: &mut Progress,
    index: usize,
    status: u16,
    reason: &str,
    lane: u32,
    key: &str,
) {
    ctx.stats.dead_letters.fetch_add(1, Ordering::Relaxed);
    let bytes = progress.batch.event(index).len();
    tracing::error!(lane, intake_key = %key, status, event_bytes = bytes, %reason,
        "the intake refuses an event for good; it is kept in the dead-letter store");
    progress.bury(index, status, reason);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(received_at_ms: u64, events: Vec<&'a str>) -> ChunkView<'a> {
        ChunkView {
            intake_key: "batch-test-key",
            timestamp: Some("2024-01-01T00:00:00Z"),
            received_at_ms,
            events,
        }
    }

    /// Events that JSON must escape: quotes, backslashes, control characters, non-ASCII.
    const AWKWARD: [&str; 6] = [
        "plain",
        "a\"quoted\"",
        "back\\slash",
        "tab\tnl\n\u{1}",
        "é😀",
        "",
    ];

    fn batch() -> Batch {
        let mut builder = BatchBuilder::default();
        builder.push(7, &view(10, AWKWARD[..2].to_vec()));
        builder.push(8, &view(20, AWKWARD[2..].to_vec()));
        builder.finish(3, 9)
    }

    #[test]
    fn the_body_is_the_json_list_of_the_events() {
        let batch = batch();
        let whole: Vec<String> = serde_json::from_slice(&batch.body(&(0..6))).unwrap();
        assert_eq!(whole, AWKWARD);
        for start in 0..6 {
            for end in start + 1..=6 {
                let part: Vec<String> = serde_json::from_slice(&batch.body(&(start..end))).unwrap();
                assert_eq!(part, AWKWARD[start..end], "events {start}..{end}");
            }
        }
        for (i, want) in AWKWARD.iter().enumerate() {
            assert_eq!(batch.event(i), *want);
        }
        assert_eq!(batch.intake_key, "batch-test-key");
        assert_eq!(batch.timestamp.as_deref(), Some("2024-01-01T00:00:00Z"));
    }

    /// Every ASCII character, at every offset of strings longer than a SIMD register, with
    /// multi-byte characters around: the body is valid JSON and reads back exactly.
    #[test]
    fn escaping_round_trips_every_character() {
        let ascii: String = (0u8..128).map(char::from).collect();
        let mut events: Vec<String> = (0..70)
            .map(|offset| {
                format!(
                    "{}{ascii}é😀{}",
                    "x".repeat(offset),
                    "\u{7f}".repeat(offset % 3)
                )
            })
            .collect();
        events.push("\u{2028}\u{2029}\u{feff}".into());
        let mut builder = BatchBuilder::default();
        builder.push(1, &view(1, events.iter().map(String::as_str).collect()));
        let batch = builder.finish(0, 0);
        let back: Vec<String> = serde_json::from_slice(&batch.body(&(0..events.len()))).unwrap();
        assert_eq!(back, events);
        for (i, want) in events.iter().enumerate() {
            assert_eq!(&batch.event(i), want);
        }
    }

    /// The date of a batch's requests: the sender's when the events have one, whatever
    /// `event_time` says; else the first chunk's reception time with `"reception"`, nothing
    /// with `"intake"` or when the reception time is unknown (0).
    #[test]
    fn the_event_date_is_the_senders_else_the_first_reception_time() {
        let batch = batch();
        for mode in [EventTime::Reception, EventTime::Intake] {
            assert_eq!(
                batch.event_date(mode).as_deref(),
                Some("2024-01-01T00:00:00Z")
            );
        }
        let undated = |first: u64| {
            let mut builder = BatchBuilder::default();
            for (seq, at) in [(1, first), (2, first + 900)] {
                builder.push(
                    seq,
                    &ChunkView {
                        timestamp: None,
                        ..view(at, vec!["e"])
                    },
                );
            }
            builder.finish(0, 0)
        };
        let batch = undated(1_617_651_211_123);
        assert_eq!(
            batch.event_date(EventTime::Reception).as_deref(),
            Some("2021-04-05T19:33:31.123Z"),
            "the first chunk's, not the second's"
        );
        assert_eq!(batch.event_date(EventTime::Intake), None);
        assert_eq!(undated(0).event_date(EventTime::Reception), None);
        // What a partial delivery writes back keeps the sender's date (none), not the one sent.
        let mut progress = Progress::new(undated(1_617_651_211_123));
        progress.settle(&(0..1), Fate::Delivered);
        let ack = progress.take_ack();
        assert_eq!(ack.remove, [1]);
        let mut progress = Progress::new(undated(1_617_651_211_123));
        progress.bury(1, 400, "refused");
        let ack = progress.take_ack();
        assert_eq!(ack.dead[0].timestamp, None);
        assert_eq!(ack.dead[0].received_at_ms, 1_617_651_212_023);
    }

    /// A chunk as the first release wrote it (v1, pinned bytes: every release stored the
    /// reception time): it decodes, and its events are sent dated by that time. Queues written
    /// before `event_time` existed need no conversion.
    #[test]
    fn a_chunk_of_the_first_release_is_dated_by_its_reception() {
        let at: u64 = 1_617_651_211_123;
        let mut stored = vec![1, 1, 0, 0, 0, 2, 0, 0, 0, 1, b'K', 0, 0xFD];
        stored.extend_from_slice(&at.to_le_bytes());
        stored.extend_from_slice(&[1, 2, b'a', b'b']);
        let mut scratch = Vec::new();
        let view = ChunkView::decode(&stored, &mut scratch).unwrap();
        assert_eq!(
            (view.intake_key, view.timestamp, view.received_at_ms),
            ("K", None, at)
        );
        let mut builder = BatchBuilder::default();
        builder.push(0, &view);
        let batch = builder.finish(0, 0);
        assert_eq!(
            batch.event_date(EventTime::Reception).as_deref(),
            Some("2021-04-05T19:33:31.123Z")
        );
    }

    /// Partial progress removes finished chunks and rewrites the others with what is left,
    /// each with its own reception time; dead letters carry the event as it was queued.
    #[test]
    fn progress_writes_back_what_is_done() {
        let mut progress = Progress::new(batch());
        progress.settle(&(0..3), Fate::Delivered);
        progress.bury(4, 400, "refused");
        let ack = progress.take_ack();
        assert_eq!(ack.gen, 9);
        assert_eq!(ack.remove, [7]);
        assert_eq!(ack.rewrite.len(), 1);
        let (seq, rest) = &ack.rewrite[0];
        assert_eq!(*seq, 8);
        assert_eq!(rest.events, [AWKWARD[3], AWKWARD[5]]);
        assert_eq!(rest.received_at_ms, 20);
        assert_eq!(rest.intake_key, "batch-test-key");
        assert_eq!(ack.dead.len(), 1);
        assert_eq!(ack.dead[0].event, AWKWARD[4]);
        assert_eq!(ack.dead[0].received_at_ms, 20);
        progress.settle(&(3..6), Fate::Delivered);
        let ack = progress.take_ack();
        assert_eq!(ack.remove, [8]);
        assert!(ack.rewrite.is_empty() && ack.dead.is_empty());
        assert!(
            progress.take_ack().remove.is_empty(),
            "a chunk is removed once"
        );
    }
}
