//! Quarantine: a chunk that a read could not decode (bit rot, a torn write) is moved out of its
//! lane into the dead letters, with what can be salvaged of its bytes, by the writer.
//!
//! The queue owns its bytes: a read only reports where the undecodable chunk is
//! ([`Undecodable::report`]) and skips it; delivery never sees stored bytes, nor repairs the
//! store. The writer reads the chunk again itself, makes sure it is still stored, undelivered
//! and undecodable (a chunk reported twice is quarantined once), and stages an acknowledgement
//! that marks it delivered with its dead letter: the path of every dead letter (`ack.rs`), so
//! the dead letter is durable before the chunk is marked, in the same commit.

use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::sync::oneshot;

use super::{Op, Writer};
use crate::queue::fresh::ChunkAt;
use crate::queue::generation;
use crate::queue::record::{self, ChunkView, DeadLetter};
use crate::queue::{now_ms, Ack, QueueError, Shared};

/// Why a quarantined chunk is a dead letter.
const REASON: &str = "undecodable chunk";

/// Undecodable chunks reported by reads, waiting for the writer's next commit. Shared by the
/// queue's handles and its writer.
#[derive(Debug, Default)]
pub struct Undecodable {
    found: Mutex<Vec<ChunkAt>>,
}

impl Undecodable {
    /// Reports undecodable chunks of `lane` in `gen`, for the writer to quarantine. The read
    /// that found them wakes the writer; if it cannot (the writer's channel is full), the
    /// writer's next commit or housekeeping (every second) takes them.
    pub fn report(&self, gen: u64, lane: u32, seqs: &[u64]) {
        let mut found = self.found.lock().unwrap_or_else(|p| p.into_inner());
        found.extend(seqs.iter().map(|&seq| (gen, lane, seq)));
    }

    fn take(&self) -> Vec<ChunkAt> {
        std::mem::take(&mut *self.found.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn is_empty(&self) -> bool {
        self.found
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }
}

/// A chunk to quarantine: its sequence number and its stored length (for the log).
#[derive(Debug, Clone, Copy)]
struct Found {
    seq: u64,
    bytes: usize,
}

/// An acknowledgement that quarantines chunks of one lane in one generation, added to a
/// commit, and the commit's answer.
struct Staged {
    gen: u64,
    lane: u32,
    chunks: Vec<Found>,
    answer: oneshot::Receiver<Result<(), QueueError>>,
}

/// The quarantines added to one commit, to settle once it is answered.
#[derive(Default)]
pub(super) struct Quarantines {
    staged: Vec<Staged>,
}

impl Quarantines {
    /// Logs the chunks that are now dead letters, and reports again those whose commit failed
    /// but may succeed later (the store did not fail for good, the generation is not damaged):
    /// the next commit retries them.
    pub(super) fn settle(self, shared: &Shared) {
        for mut q in self.staged {
            let lane = q.lane;
            match q.answer.try_recv() {
                Ok(Ok(())) => {
                    for Found { seq, bytes } in q.chunks {
                        tracing::error!(
                            lane,
                            seq,
                            bytes,
                            "undecodable chunk in the queue; moved to the dead letters"
                        );
                    }
                }
                Ok(Err(e)) if e.is_corrupt() || matches!(e, QueueError::RestartNeeded(_)) => {}
                _ => {
                    let seqs: Vec<u64> = q.chunks.iter().map(|c| c.seq).collect();
                    shared.undecodable.report(q.gen, lane, &seqs);
                }
            }
        }
    }
}

impl Writer {
    /// Adds to `ops` an acknowledgement per lane and generation that moves the undecodable
    /// chunks reported since the last commit into the dead letters.
    pub(super) fn stage_quarantines(&mut self, ops: &mut Vec<Op>) -> Quarantines {
        let mut quarantines = Quarantines::default();
        if self.shared.undecodable.is_empty() {
            return quarantines;
        }
        let mut by_lane: BTreeMap<(u64, u32), Vec<u64>> = BTreeMap::new();
        for (gen, lane, seq) in self.shared.undecodable.take() {
            by_lane.entry((gen, lane)).or_default().push(seq);
        }
        for ((gen, lane), mut seqs) in by_lane {
            seqs.sort_unstable();
            seqs.dedup();
            let (ack, chunks) = match self.quarantine_ack(gen, lane, &seqs) {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                // Damage that sled finds here is the generation's: it is moved aside at the
                // next housekeeping, with these chunks in it (for `salvage`).
                Err(e) => {
                    tracing::warn!(lane, gen, error = %e,
                        "cannot read undecodable chunks to quarantine them");
                    continue;
                }
            };
            let (done, answer) = oneshot::channel();
            ops.push(Op::Ack { lane, ack, done });
            quarantines.staged.push(Staged {
                gen,
                lane,
                chunks,
                answer,
            });
        }
        quarantines
    }

    /// The acknowledgement that quarantines the chunks `seqs` of `lane` in `gen`, with each
    /// chunk's stored length; `None` if none is left to quarantine: the generation is gone
    /// (deleted, or moved aside), or each chunk is delivered, absent or decodes after all.
    fn quarantine_ack(
        &mut self,
        gen: u64,
        lane: u32,
        seqs: &[u64],
    ) -> Result<Option<(Ack, Vec<Found>)>, QueueError> {
        // The watermark of a sealed generation is known once its own counters are read.
        self.make_exact(gen)?;
        let (Some(g), Some(state)) = (
            self.state.gens.get(&gen),
            self.state.lanes.get(lane as usize),
        ) else {
            return Ok(None);
        };
        let marks = g.marks.get(&lane).cloned().unwrap_or_default();
        let Some(db) = self.gen_db(gen)? else {
            return Ok(None);
        };
        let stored = generation::guard("reading undecodable chunks", || {
            let mut stored = Vec::new();
            for &seq in seqs.iter().filter(|&&seq| !marks.is_acked(seq)) {
                if let Some(value) = db.db.get(record::chunk_key(lane, seq))? {
                    stored.push((seq, value));
                }
            }
            Ok(stored)
        })?;
        let mut ack = Ack {
            gen,
            ..Ack::default()
        };
        let mut chunks = Vec::new();
        let mut scratch = Vec::new();
        for (seq, value) in stored {
            if ChunkView::decode(&value, &mut scratch).is_ok() {
                continue;
            }
            ack.remove.push(seq);
            ack.dead.push(dead_letter(&state.intake_key, &value));
            chunks.push(Found {
                seq,
                bytes: value.len(),
            });
        }
        Ok((!chunks.is_empty()).then_some((ack, chunks)))
    }
}

/// The dead letter that keeps an undecodable chunk of `intake_key`: its bytes in the most
/// readable form there is ([`record::salvage`]); no event date or reception time, which were
/// in the bytes; status 0: not an answer of the intake.
fn dead_letter(intake_key: &str, stored: &[u8]) -> DeadLetter {
    DeadLetter {
        intake_key: intake_key.to_owned(),
        timestamp: None,
        received_at_ms: 0,
        event: String::from_utf8_lossy(&record::salvage(stored)).into_owned(),
        status: 0,
        reason: REASON.into(),
        dead_at_ms: now_ms(),
    }
}
