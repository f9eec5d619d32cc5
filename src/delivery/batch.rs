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

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::client::{jsons_body, Outcome, MAX_REQUEST_BODY};
use super::retry::Retry;
use super::Ctx;
use crate::crash_point;
use crate::queue::{now_ms, redact_key, Ack, Chunk, DeadLetter, StoredChunk};

/// Where each event of the batch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Pending,
    Delivered,
    Dead,
}

pub struct Batch {
    pub lane: u32,
    /// The queue generation the chunks were read from.
    pub gen: u64,
    pub intake_key: String,
    pub timestamp: Option<String>,
    pub chunks: Vec<StoredChunk>,
}

/// One event of the batch: its chunk and its index in the chunk.
type Place = (usize, usize);

struct Progress {
    batch: Batch,
    places: Vec<Place>,
    fates: Vec<Vec<Fate>>,
    /// Chunks already removed from the store.
    removed: Vec<bool>,
    dead: Vec<DeadLetter>,
}

impl Progress {
    fn new(batch: Batch) -> Progress {
        let places = batch
            .chunks
            .iter()
            .enumerate()
            .flat_map(|(c, chunk)| (0..chunk.chunk.events.len()).map(move |e| (c, e)))
            .collect();
        let fates = batch
            .chunks
            .iter()
            .map(|c| vec![Fate::Pending; c.chunk.events.len()])
            .collect();
        let removed = vec![false; batch.chunks.len()];
        Progress {
            batch,
            places,
            fates,
            removed,
            dead: Vec::new(),
        }
    }

    fn event(&self, place: Place) -> &str {
        &self.batch.chunks[place.0].chunk.events[place.1]
    }

    fn events(&self, range: &Range<usize>) -> Vec<&str> {
        self.places[range.clone()]
            .iter()
            .map(|p| self.event(*p))
            .collect()
    }

    fn settle(&mut self, range: &Range<usize>, fate: Fate) {
        for i in range.clone() {
            let (c, e) = self.places[i];
            self.fates[c][e] = fate;
        }
    }

    fn bury(&mut self, index: usize, status: u16, reason: &str) {
        let (c, e) = self.places[index];
        let chunk = &self.batch.chunks[c].chunk;
        self.dead.push(DeadLetter {
            intake_key: chunk.intake_key.clone(),
            timestamp: chunk.timestamp.clone(),
            received_at_ms: chunk.received_at_ms,
            event: chunk.events[e].clone(),
            status,
            reason: reason.to_owned(),
            dead_at_ms: now_ms(),
        });
        self.fates[c][e] = Fate::Dead;
    }

    /// What to write back now: chunks that are done are removed, chunks with some events done
    /// are rewritten with the rest, dead letters are stored.
    fn take_ack(&mut self) -> Ack {
        let mut ack = Ack {
            gen: self.batch.gen,
            dead: std::mem::take(&mut self.dead),
            ..Ack::default()
        };
        for (c, stored) in self.batch.chunks.iter().enumerate() {
            if self.removed[c] {
                continue;
            }
            let fates = &self.fates[c];
            if fates.iter().all(|f| *f != Fate::Pending) {
                ack.remove.push(stored.seq);
                self.removed[c] = true;
            } else if fates.iter().any(|f| *f != Fate::Pending) {
                let rest = Chunk {
                    events: stored
                        .chunk
                        .events
                        .iter()
                        .zip(fates)
                        .filter(|(_, f)| **f == Fate::Pending)
                        .map(|(e, _)| e.clone())
                        .collect(),
                    ..stored.chunk.clone()
                };
                ack.rewrite.push((stored.seq, rest));
            }
        }
        ack
    }
}

/// Delivers `batch` until all of it is acknowledged or dead-lettered, or shutdown.
pub async fn deliver(ctx: Arc<Ctx>, batch: Batch) {
    let total = batch.chunks.iter().map(|c| c.chunk.events.len()).sum();
    let lane = batch.lane;
    let key = redact_key(&batch.intake_key);
    let mut progress = Progress::new(batch);
    let mut work: VecDeque<Range<usize>> = VecDeque::new();
    work.push_back(0..total);
    let mut retry = Retry::new(ctx.config.backoff_initial(), ctx.config.backoff_max());
    while let Some(range) = work.pop_front() {
        let body = jsons_body(&progress.events(&range));
        if body.len() > MAX_REQUEST_BODY && range.len() > 1 {
            split(&mut work, range);
            continue;
        }
        let outcome = ctx
            .send(
                &progress.batch.intake_key,
                progress.batch.timestamp.as_deref(),
                body,
                range.len(),
            )
            .await;
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
    let bytes = progress.event(progress.places[index]).len();
    tracing::error!(lane, intake_key = %key, status, event_bytes = bytes, %reason,
        "the intake refuses an event for good; it is kept in the dead-letter store");
    progress.bury(index, status, reason);
}
