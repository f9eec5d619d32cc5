//! Disk space: back-pressure at `max_bytes`, and the free-space reserve.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Op, Writer, SLED_AMPLIFICATION};
use crate::queue::generation;
use crate::queue::{QueueError, Shared};

impl Writer {
    /// Answers `Full` to the appends of this group if writing them could fill the disk.
    ///
    /// sled does not recover well from a full disk (it may retry a write for ever), and
    /// removals need space too, so the writer refuses to eat into `min_free_bytes`.
    pub(super) fn refuse_appends_if_disk_low(&mut self, ops: Vec<Op>) -> Vec<Op> {
        let append_bytes: u64 = ops
            .iter()
            .filter(|op| matches!(op, Op::Append { .. }))
            .map(|op| op.bytes() as u64)
            .sum();
        if append_bytes == 0 {
            return ops;
        }
        let free = self.free_space_for_appends();
        if free
            >= self
                .shared
                .min_free_bytes
                .saturating_add(append_bytes * SLED_AMPLIFICATION)
        {
            return ops;
        }
        self.update_disk_usage();
        self.shared.full.store(true, Ordering::Release);
        let mut kept = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                op @ Op::Append { .. } => super::answer(op, Err(QueueError::Full)),
                other => kept.push(other),
            }
        }
        kept
    }

    /// Measures what the queue takes on disk and the free space left, and sets the
    /// back-pressure flag: sources are held back when the disk use or the queued payload
    /// reaches `max_bytes`, or when the file system has less than `min_free_bytes` free
    /// (removals need space too: a disk filled to the last byte could not even record what was
    /// delivered).
    pub fn update_disk_usage(&mut self) {
        self.last_disk_check = Instant::now();
        let gens = &self.state.gens;
        let open = gens.values().filter(|g| g.handle.is_open()).count();
        measure_space(&self.shared, gens.len(), open);
    }
}

/// [`Writer::update_disk_usage`] for a queue of `generations` generations, `open` of them
/// open: also what a queue opened read-only shows (`read_only.rs`).
pub fn measure_space(shared: &Shared, generations: usize, open: usize) {
    let disk = generation::disk_usage(&shared.path);
    let stats = &shared.stats;
    stats.disk_bytes.store(disk, Ordering::Relaxed);
    stats
        .generations
        .store(generations as u64, Ordering::Relaxed);
    stats.open_generations.store(open as u64, Ordering::Relaxed);
    let free = free_space(&shared.path).unwrap_or(u64::MAX);
    let queued = shared.queued_bytes.load(Ordering::Acquire);
    let max = shared.max_bytes;
    let full = queued >= max || disk >= max || free < shared.min_free_bytes;
    stats.free_bytes.store(free, Ordering::Relaxed);
    let was = shared.full.swap(full, Ordering::AcqRel);
    if full == was {
        return;
    }
    if full {
        tracing::warn!(
            disk_bytes = disk,
            queued_bytes = queued,
            max_bytes = max,
            free_bytes = free,
            min_free_bytes = shared.min_free_bytes,
            "queue full: sources get back-pressure until delivery catches up"
        );
    } else {
        tracing::info!(
            disk_bytes = disk,
            queued_bytes = queued,
            free_bytes = free,
            "queue below its limits again"
        );
    }
}

impl Writer {
    /// [`free_space`] where the queue is, as the check before a group's appends sees it.
    fn free_space_for_appends(&self) -> u64 {
        let path = &self.shared.path;
        // Tests hold the writer here (a callback), and make the disk look full ("return").
        fail::fail_point!("queue-disk-check", crate::failpoint::aimed_at(path), |_| 0);
        fail::fail_point!("queue-disk-low", crate::failpoint::aimed_at(path), |_| 0);
        free_space(path).unwrap_or(u64::MAX)
    }
}

/// Bytes an unprivileged writer may still use on the file system holding `path`.
fn free_space(path: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(path).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}
