//! Gathering a group commit: which operations one commit covers, and when the writer waits a
//! moment for more.
//!
//! A commit costs the same whatever it holds: sled's flush hands its buffer to sled's I/O
//! threads and waits for them, then one fsync (`docs/performance.md`, "Session 7"). With
//! senders that each wait for their answer before sending again (an HTTP client over keep-alive
//! connections), the senders split into cohorts: the ones answered by one commit come back while
//! the next commit runs, so each commit holds about half of them. Waiting a moment for the
//! senders that were just answered merges the cohorts: half the commits for the same events.
//!
//! The writer waits only when it may pay, as databases' group commit does (PostgreSQL's
//! `commit_delay` with `commit_siblings`): sources say how many senders may append again soon
//! ([`crate::queue::SenderGuard`], one per open HTTP connection), and the writer waits only while
//! the group holds fewer appends than that, never longer than [`MAX_WAIT`] (about what a commit
//! takes). Waits that gain nothing (idle keep-alive connections, one busy sender among many) turn
//! waiting off for a while, so a lone sender does not pay for it.

use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::thread::Thread;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::Op;
use crate::queue::{Stats, COMMIT_MAX_BYTES};

/// The longest a commit waits for more appends.
const MAX_WAIT: Duration = Duration::from_millis(1);
/// The shortest wait worth its wake-ups.
const MIN_WAIT: Duration = Duration::from_micros(200);
/// Waits in a row that gained nothing before waiting is turned off ...
const MISSES_BEFORE_PAUSE: u32 = 3;
/// ... for this many commits, after which it is tried again.
const PAUSE_COMMITS: u32 = 64;

/// The senders that may append again soon, and how to wake the writer while it waits for them:
/// shared by the queue's handles and its writer.
#[derive(Debug, Default)]
pub struct Senders {
    count: AtomicUsize,
    /// While the writer waits for more appends: how many it waits for (0: it does not wait).
    /// It is woken once that many have been sent, not by each: every wake-up is a context
    /// switch, for the writer and for the sender that makes it.
    waiting_for: AtomicUsize,
    /// Appends sent since the writer began waiting for `waiting_for`.
    arrived: AtomicUsize,
    writer: OnceLock<Thread>,
    /// Times a sender woke the writer (tests).
    wakeups: AtomicUsize,
}

impl Senders {
    pub fn add(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn remove(&self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Called by the writer thread once: the thread that [`Senders::wake_writer`] wakes.
    pub fn set_writer(&self) {
        let _ = self.writer.set(std::thread::current());
    }

    /// Called after each append is sent: wakes the writer if it waits for appends and this one
    /// is the last it waits for.
    pub fn wake_writer(&self) {
        // Pairs with the fence in `Gatherer::wait`: either the writer's `try_recv` sees the
        // operation just sent, or this load sees what the writer waits for and counts it in.
        // (Both may happen: the writer then wakes early and finds less than it waited for.)
        fence(Ordering::SeqCst);
        let waiting_for = self.waiting_for.load(Ordering::SeqCst);
        if waiting_for == 0 || self.arrived.fetch_add(1, Ordering::SeqCst) + 1 != waiting_for {
            return;
        }
        if let Some(writer) = self.writer.get() {
            self.wakeups.fetch_add(1, Ordering::Relaxed);
            writer.unpark();
        }
    }
}

/// The operations of one commit.
pub(super) struct Group {
    pub ops: Vec<Op>,
    /// A `Close` is among them: the writer stops after this commit.
    pub closing: bool,
    /// A `Refresh` (housekeeping) was asked for.
    pub refresh: bool,
}

/// How long the writer may wait for more appends, learnt from the commits before.
#[derive(Debug)]
pub(super) struct Gatherer {
    /// How long the last commit took: a wait about twice that costs a sender at most about
    /// one commit's latency more, and gives the senders just answered time to come back.
    last_commit: Duration,
    /// Bounds of a wait.
    min_wait: Duration,
    max_wait: Duration,
    misses: u32,
    /// Commits left before waiting is tried again.
    paused: u32,
}

impl Default for Gatherer {
    fn default() -> Gatherer {
        Gatherer::with_bounds(MIN_WAIT, MAX_WAIT)
    }
}

impl Gatherer {
    fn with_bounds(min_wait: Duration, max_wait: Duration) -> Gatherer {
        Gatherer {
            last_commit: Duration::ZERO,
            min_wait,
            max_wait,
            misses: 0,
            paused: 0,
        }
    }

    /// Takes `first` and what else is waiting in the channel (up to [`COMMIT_MAX_BYTES`]), and
    /// waits a moment for more appends when it may pay.
    pub fn gather(
        &mut self,
        senders: &Senders,
        stats: &Stats,
        rx: &mut mpsc::Receiver<Op>,
        first: Op,
    ) -> Group {
        let mut group = Gathering::new(first);
        while group.open() {
            match rx.try_recv() {
                Ok(op) => group.push(op),
                Err(_) => break,
            }
        }
        if group.open() && self.should_wait(senders, &group) {
            let before = group.ops.len();
            self.wait(senders, rx, &mut group);
            self.learn(stats, group.ops.len() - before);
        }
        group.finish()
    }

    /// Records how long a commit took.
    pub fn committed(&mut self, took: Duration) {
        self.last_commit = took;
    }

    fn should_wait(&mut self, senders: &Senders, group: &Gathering) -> bool {
        if group.appends == 0 {
            // Acknowledgements and housekeeping: nobody is waiting on a sender's next request.
            return false;
        }
        if self.paused > 0 {
            self.paused -= 1;
            return false;
        }
        group.appends < senders.count()
    }

    /// Waits until the group holds an append from every sender, is full, or the wait is over.
    fn wait(&self, senders: &Senders, rx: &mut mpsc::Receiver<Op>, group: &mut Gathering) {
        let wait = (self.last_commit * 2).clamp(self.min_wait, self.max_wait);
        let deadline = Instant::now() + wait;
        while group.open() && group.appends < senders.count() {
            // Say how many appends are still to come, then look again: pairs with the fence in
            // `Senders::wake_writer`, so that an append sent meanwhile is either taken by this
            // `try_recv` or counted towards the wake-up.
            senders.arrived.store(0, Ordering::SeqCst);
            let missing = senders.count().saturating_sub(group.appends).max(1);
            senders.waiting_for.store(missing, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            match rx.try_recv() {
                Ok(op) => group.push(op),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    std::thread::park_timeout(deadline - now);
                    // Take everything sent meanwhile before counting again.
                    while group.open() {
                        match rx.try_recv() {
                            Ok(op) => group.push(op),
                            Err(_) => break,
                        }
                    }
                }
            }
        }
        senders.waiting_for.store(0, Ordering::SeqCst);
    }

    /// Counts the wait; turns waiting off for a while after waits that gained nothing.
    fn learn(&mut self, stats: &Stats, gained: usize) {
        stats.group_waits.fetch_add(1, Ordering::Relaxed);
        stats
            .group_wait_gained_ops
            .fetch_add(gained as u64, Ordering::Relaxed);
        if gained > 0 {
            self.misses = 0;
            return;
        }
        self.misses += 1;
        if self.misses >= MISSES_BEFORE_PAUSE {
            self.misses = 0;
            self.paused = PAUSE_COMMITS;
        }
    }
}

/// A group being gathered.
struct Gathering {
    ops: Vec<Op>,
    bytes: usize,
    appends: usize,
    closing: bool,
}

impl Gathering {
    fn new(first: Op) -> Gathering {
        let mut group = Gathering {
            ops: Vec::new(),
            bytes: 0,
            appends: 0,
            closing: false,
        };
        group.push(first);
        group
    }

    fn push(&mut self, op: Op) {
        self.bytes += op.bytes();
        self.appends += usize::from(matches!(op, Op::Append { .. }));
        self.closing |= matches!(op, Op::Close { .. });
        self.ops.push(op);
    }

    /// Whether more may join: nothing joins after a `Close`, nor past [`COMMIT_MAX_BYTES`].
    fn open(&self) -> bool {
        !self.closing && self.bytes < COMMIT_MAX_BYTES
    }

    fn finish(mut self) -> Group {
        let refresh = self.ops.iter().any(|op| matches!(op, Op::Refresh));
        // A `Quarantine` only wakes the writer: what it is about waits in `Undecodable`.
        self.ops
            .retain(|op| !matches!(op, Op::Refresh | Op::Quarantine));
        Group {
            ops: self.ops,
            closing: self.closing,
            refresh,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn append() -> Op {
        let (done, _) = tokio::sync::oneshot::channel();
        Op::Append {
            groups: Vec::new(),
            checkpoints: Vec::new(),
            order: None,
            done,
        }
    }

    fn ack() -> Op {
        let (done, _) = tokio::sync::oneshot::channel();
        Op::Ack {
            lane: 0,
            ack: crate::queue::Ack::default(),
            done,
        }
    }

    /// Waits (up to a generous deadline) until the writer side waits for more appends.
    fn until_waiting(senders: &Senders) {
        let end = Instant::now() + Duration::from_secs(30);
        while senders.waiting_for.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < end, "the gatherer never waited");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_commit_waits_for_the_next_append_of_each_sender() {
        let senders = Arc::new(Senders::default());
        let stats = Stats::default();
        (0..3).for_each(|_| senders.add());
        senders.set_writer();
        let (tx, mut rx) = mpsc::channel(16);
        tx.try_send(append()).unwrap();
        let first = rx.try_recv().unwrap();
        // The wait ends as soon as every sender's append is in; the long bound only keeps a
        // busy machine from ending it first.
        let mut gatherer = Gatherer::with_bounds(Duration::from_secs(60), Duration::from_secs(60));
        let late = {
            let senders = senders.clone();
            std::thread::spawn(move || {
                until_waiting(&senders);
                for _ in 0..2 {
                    tx.try_send(append()).unwrap();
                    senders.wake_writer();
                }
            })
        };
        let group = gatherer.gather(&senders, &stats, &mut rx, first);
        late.join().unwrap();
        assert_eq!(group.ops.len(), 3, "one commit for the three senders");
        assert_eq!(stats.group_waits.load(Ordering::Relaxed), 1);
        assert_eq!(stats.group_wait_gained_ops.load(Ordering::Relaxed), 2);
        // Woken at most once, by the last append it waited for (not at all if it took both
        // before it parked), not once per append: each wake-up is a context switch.
        let wakeups = senders.wakeups.load(Ordering::Relaxed);
        assert!(wakeups <= 1, "woken {wakeups} times for two appends");
    }

    #[test]
    fn no_wait_for_a_lone_sender_nor_for_acknowledgements() {
        let senders = Senders::default();
        let stats = Stats::default();
        senders.add();
        let (tx, mut rx) = mpsc::channel(16);
        let mut gatherer = Gatherer::with_bounds(Duration::from_secs(60), Duration::from_secs(60));
        // One sender, its append in: nothing to wait for.
        let group = gatherer.gather(&senders, &stats, &mut rx, append());
        assert_eq!(group.ops.len(), 1);
        // Acknowledgements only: no sender waits on them.
        senders.add();
        tx.try_send(ack()).unwrap();
        let group = gatherer.gather(&senders, &stats, &mut rx, ack());
        assert_eq!(group.ops.len(), 2);
        assert_eq!(stats.group_waits.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn waits_that_gain_nothing_turn_waiting_off_for_a_while() {
        let senders = Senders::default();
        let stats = Stats::default();
        // Many idle keep-alive connections, one busy sender.
        (0..10).for_each(|_| senders.add());
        let (_tx, mut rx) = mpsc::channel(16);
        let mut gatherer =
            Gatherer::with_bounds(Duration::from_micros(1), Duration::from_micros(1));
        for _ in 0..(MISSES_BEFORE_PAUSE + PAUSE_COMMITS) {
            gatherer.gather(&senders, &stats, &mut rx, append());
        }
        assert_eq!(
            stats.group_waits.load(Ordering::Relaxed),
            u64::from(MISSES_BEFORE_PAUSE),
            "waiting paused after {MISSES_BEFORE_PAUSE} waits that gained nothing"
        );
        gatherer.gather(&senders, &stats, &mut rx, append());
        assert_eq!(
            stats.group_waits.load(Ordering::Relaxed),
            u64::from(MISSES_BEFORE_PAUSE) + 1,
            "tried again after the pause"
        );
    }
}
