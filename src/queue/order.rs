//! Several appends of one stream in flight at once, made durable in the order they were
//! handed to the writer or not at all.
//!
//! A source that reads one stream (a connection, a file) hands its next batch to the writer
//! while the one before is still being made durable: one batch at a time, its rate was bounded
//! by the commit's latency. The writer takes appends in the order they were sent, and a group
//! commit succeeds or fails whole; but two batches of a stream may fall in two commits, and the
//! first may fail (disk low, a storage error) while the second succeeds. The second would then
//! be durable without the first: out of order, and, for a file, with a checkpoint past lines
//! that were never stored (lost at the next crash).
//!
//! So each stream's appends carry one [`AppendOrder`]: the writer marks it broken when it
//! answers one of them with an error (or drops one unanswered), and refuses every later one
//! that carries it ([`crate::queue::QueueError::EarlierAppendFailed`]) until the source,
//! having heard every answer of what it had in flight, mends it and appends them again, in
//! order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The order of one stream's appends (clones share it).
#[derive(Debug, Clone, Default)]
pub struct AppendOrder(Arc<AtomicBool>);

impl AppendOrder {
    pub fn new() -> AppendOrder {
        AppendOrder::default()
    }

    /// Whether an append of the stream failed since the last [`AppendOrder::mend`]: the later
    /// ones are refused.
    pub fn is_broken(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Lets the stream's appends through again: only once every append sent with it was
    /// answered, so that none of them is still waiting in the writer.
    pub fn mend(&self) {
        self.0.store(false, Ordering::Release);
    }

    /// An append of the stream failed (the writer's side).
    pub(crate) fn broke(&self) {
        self.0.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_state_and_mend_clears_it() {
        let order = AppendOrder::new();
        let writer_side = order.clone();
        assert!(!order.is_broken());
        writer_side.broke();
        assert!(order.is_broken());
        order.mend();
        assert!(!writer_side.is_broken());
    }
}
