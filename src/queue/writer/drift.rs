//! Counters that drift: recounting a sealed generation once delivery has passed its end.
//!
//! A generation is deleted when its counters say it is empty. Counters follow the store, but
//! some acknowledgements cannot say what they delivered (a chunk whose header no longer decodes
//! is quarantined with the events it held unknown), so a generation's counters can stay above
//! zero after every chunk in it is delivered, and it would never be deleted. Once delivery of
//! every lane it counts has gone past its end, the writer recounts it from the undelivered
//! chunks it still holds (only chunks in flight, normally none), whatever its counters say.

use std::collections::HashSet;

use super::Writer;
use crate::queue::QueueError;

/// What one acknowledgement tells about how far its lane's delivery got.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reached {
    pub lane: u32,
    pub gen: u64,
    /// The highest sequence number it removed, if any.
    pub last_removed: Option<u64>,
}

impl Writer {
    /// Notes, after a commit, the sealed generations whose end the acknowledged lanes passed:
    /// every one before the acknowledgement's generation, and that generation itself if its
    /// last chunk of the lane was removed.
    pub(super) fn note_reached(&mut self, reached: &[Reached]) {
        let active = self.state.active;
        for r in reached {
            for (id, g) in self.state.gens.range_mut(..=r.gen) {
                if *id == active {
                    continue;
                }
                let Some(count) = g.lanes.get(&r.lane) else {
                    continue;
                };
                let past_end = *id < r.gen
                    || r.last_removed
                        .is_some_and(|seq| seq.saturating_add(1) >= count.end_seq);
                if count.events > 0 && past_end {
                    g.passed.insert(r.lane);
                }
            }
        }
    }

    /// Recounts the sealed generations that every lane they count has been delivered past.
    pub(super) fn recount_passed(&mut self) -> Result<(), QueueError> {
        let due: Vec<u64> = self
            .state
            .gens
            .iter()
            .filter(|(_, g)| {
                !g.passed.is_empty()
                    && g.lanes
                        .iter()
                        .filter(|(_, c)| c.events > 0)
                        .all(|(lane, _)| g.passed.contains(lane))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(g) = self.state.gens.get_mut(&id) {
                g.passed = HashSet::new();
            }
            // Counted from its summary still: read its records first (which also moves the
            // dead letters a queue of the first layout kept in it).
            self.make_exact(id)?;
            let before = self.state.gens.get(&id).map_or(0, |g| g.events());
            self.recount(id)?;
            let after = self.state.gens.get(&id).map_or(0, |g| g.events());
            if after != before {
                tracing::warn!(
                    generation = id,
                    counted = before,
                    found = after,
                    "queue generation recounted after delivery passed its end: its counters were off"
                );
            }
        }
        Ok(())
    }
}
