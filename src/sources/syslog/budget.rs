//! The bytes one TCP/TLS syslog source holds read from its sockets and not yet durable, for
//! all its connections together (`max_buffered_bytes`).
//!
//! A connection holds at most three batches (two handed to the queue, one being read), so without a
//! bound shared by the connections, a thousand busy senders make a thousand times that (the
//! bench's 1,000 connections took 257 MiB of RSS). A connection takes room for each message it
//! has read before it reads the next, and gives it back once the batch holding it is durable;
//! with no room left it stops reading, and its sender is pushed back by TCP flow control as
//! with a full queue, until there is room for its message and the next ones ([`WAIT_FOR`]). Only messages already read hold room, and they are always on their way
//! to the queue (a batch is handed over as soon as fewer than two are in flight), so a slow or
//! silent connection holds none of it and cannot stall the others.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::SyslogSourceStats;

/// Room a connection waits for when there is none left: at least this much (or a sixteenth of
/// the budget, if that is less), not just its next message. Room comes back a batch at a time;
/// handed out a message at a time, it went to hundreds of waiting connections at once, each of
/// which then appended a batch of a few messages (four times the chunks, twice the CPU per
/// message with a 4 MiB budget: `docs/performance.md`, session 17). The room taken beyond the
/// message is kept for the connection's next messages, and given back with its batch.
const WAIT_FOR: usize = 64 * 1024;

/// Room for message bytes, shared by a source's connections.
#[derive(Debug)]
pub struct Budget {
    room: Semaphore,
    /// `max_buffered_bytes`: no message takes more than this (a longer one, possible only
    /// with a budget under `max_event_bytes`, takes all of it).
    total: usize,
    stats: Arc<SyslogSourceStats>,
}

impl Budget {
    pub fn new(total: usize, stats: Arc<SyslogSourceStats>) -> Budget {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        Budget {
            room: Semaphore::new(total),
            total,
            stats,
        }
    }

    /// Nothing held yet.
    pub fn none(&self) -> Held<'_> {
        Held {
            budget: self,
            bytes: 0,
            spare: 0,
        }
    }

    fn share(&self, message_bytes: usize) -> u32 {
        message_bytes.min(self.total).min(u32::MAX as usize) as u32
    }

    /// Takes room for a message of `message_bytes` into `held` if there is some now (left
    /// over from its last wait, or in the budget); if not, counts a wait (the caller then
    /// waits with [`Budget::take`]).
    pub fn try_take(&self, held: &mut Held<'_>, message_bytes: usize) -> bool {
        let n = self.share(message_bytes);
        if held.spare >= n as usize {
            held.spare -= n as usize;
            return true;
        }
        match self.room.try_acquire_many(n) {
            Ok(permit) => {
                permit.forget();
                self.taken(held, n);
                true
            }
            Err(_) => {
                self.stats.budget_waits.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Waits for room for a message of `message_bytes` and for the next ones ([`WAIT_FOR`]),
    /// then takes it into `held`.
    pub async fn take(&self, held: &mut Held<'_>, message_bytes: usize) {
        let n = self.share(message_bytes);
        let wanted = self.share(message_bytes.max(WAIT_FOR.min(self.total / 16)));
        // The semaphore is never closed, so the error cannot happen; taking nothing then is
        // safe (the room is only ever given back as much as was taken).
        if let Ok(permit) = self.room.acquire_many(wanted).await {
            permit.forget();
            self.taken(held, wanted);
            held.spare += (wanted - n) as usize;
        }
    }

    fn taken(&self, held: &mut Held<'_>, n: u32) {
        held.bytes += n as usize;
        let now = self
            .stats
            .buffered_bytes
            .fetch_add(u64::from(n), Ordering::Relaxed)
            + u64::from(n);
        self.stats
            .buffered_bytes_peak
            .fetch_max(now, Ordering::Relaxed);
    }
}

/// Room a batch holds, given back when it is dropped (once the batch is durable, or lost
/// with its connection).
#[derive(Debug)]
pub struct Held<'a> {
    budget: &'a Budget,
    /// All the room taken, given back on drop.
    bytes: usize,
    /// What of it no message holds yet (taken by a wait beyond the message waited for).
    spare: usize,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget
                .stats
                .buffered_bytes
                .fetch_sub(self.bytes as u64, Ordering::Relaxed);
            self.budget.room.add_permits(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn room_comes_back_when_a_batch_is_dropped() {
        let budget = Budget::new(100, Arc::default());
        let mut a = budget.none();
        assert!(budget.try_take(&mut a, 60));
        let mut b = budget.none();
        assert!(!budget.try_take(&mut b, 60), "only 40 bytes are left");
        assert!(budget.try_take(&mut b, 40));
        assert_eq!(budget.stats.buffered_bytes.load(Ordering::Relaxed), 100);
        drop(a);
        assert_eq!(budget.stats.buffered_bytes.load(Ordering::Relaxed), 40);
        let mut c = budget.none();
        budget.take(&mut c, 60).await;
        assert_eq!(
            budget.stats.buffered_bytes_peak.load(Ordering::Relaxed),
            100
        );
    }

    #[tokio::test]
    async fn a_wait_takes_room_for_the_next_messages_too() {
        let budget = Budget::new(1 << 20, Arc::default());
        let mut all = budget.none();
        budget.take(&mut all, 1 << 20).await;
        let mut a = budget.none();
        assert!(!budget.try_take(&mut a, 200), "the budget is full");
        drop(all);
        budget.take(&mut a, 200).await;
        assert_eq!(a.bytes, WAIT_FOR, "a wait takes more than its message");
        // The next messages use what the wait took, not the budget's room.
        let left = budget.room.available_permits();
        for _ in 0..(WAIT_FOR / 200) - 1 {
            assert!(budget.try_take(&mut a, 200));
        }
        assert_eq!(budget.room.available_permits(), left);
        assert!(budget.try_take(&mut a, 200));
        assert_eq!(
            budget.room.available_permits(),
            left - 200,
            "then the budget's room"
        );
        drop(a);
        assert_eq!(budget.room.available_permits(), 1 << 20);
        assert_eq!(budget.stats.buffered_bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_message_longer_than_the_budget_takes_all_of_it() {
        let budget = Budget::new(100, Arc::default());
        let mut a = budget.none();
        budget.take(&mut a, 1000).await;
        assert_eq!(a.bytes, 100);
        let mut b = budget.none();
        assert!(!budget.try_take(&mut b, 1));
        drop(a);
        assert!(budget.try_take(&mut b, 1));
    }
}
