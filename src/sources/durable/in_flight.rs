//! Batches of one stream handed to the queue and not yet durable: a connection or a file goes
//! on reading while its last batches are committed, and hears of them in the order it read
//! them.
//!
//! One batch at a time, a stream's rate was bounded by the commit's latency: the batch was
//! prepared and compressed, then the writer committed and fsynced it, and only then was the
//! next one prepared (`docs/performance.md`, "Session 16"). With up to [`DEPTH`] in flight, the
//! next batch is prepared while the writer commits the ones before it.
//!
//! Order, and so the promise, holds because the appends carry the stream's [`AppendOrder`]
//! (`queue/order.rs`): once one fails, every later one fails too, none is stored ahead of it.
//! Then every batch in flight is appended again, one at a time and in order, waiting out a full
//! queue as a single append does. A file's checkpoint therefore never becomes durable ahead of
//! the lines before it.

use std::collections::VecDeque;

use tokio_util::sync::CancellationToken;

use super::{prepare, Appender, Prepared, Stopped, Tally};
use crate::queue::{AppendOrder, Checkpoint, QueueError, Submitted};
use crate::sources::syslog::framing::Frame;

/// Most batches of one stream in flight at once. Two gave one connection 15-25 % more
/// events/s than one; three added no more than the host's noise (`docs/performance.md`).
pub const DEPTH: usize = 2;

/// One stream's batches in flight, oldest first, each with what the source keeps with it
/// until it is durable (`T`: room in a budget, files it lets go of).
#[derive(Debug)]
pub struct InFlight<T> {
    order: AppendOrder,
    flights: VecDeque<Flight<T>>,
}

#[derive(Debug)]
struct Flight<T> {
    frames: Vec<Frame>,
    checkpoints: Vec<Checkpoint>,
    tally: Tally,
    state: State,
    extra: T,
}

#[derive(Debug)]
enum State {
    /// With the writer.
    Submitted(Submitted),
    /// Answered, or refused before it reached the writer.
    Answered(Result<(), QueueError>),
}

/// A batch that is durable: its frames (to reuse their vector) and what the source kept
/// with it.
#[derive(Debug)]
pub struct Durable<T> {
    pub frames: Vec<Frame>,
    pub extra: T,
}

impl<T> Default for InFlight<T> {
    fn default() -> Self {
        InFlight {
            order: AppendOrder::new(),
            flights: VecDeque::new(),
        }
    }
}

impl<T> InFlight<T> {
    pub fn new() -> InFlight<T> {
        InFlight::default()
    }

    pub fn len(&self) -> usize {
        self.flights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flights.is_empty()
    }

    /// Whether [`DEPTH`] batches are in flight: the next waits for the oldest.
    pub fn is_full(&self) -> bool {
        self.flights.len() >= DEPTH
    }

    /// What the source kept with each batch in flight, oldest first.
    pub fn extras(&self) -> impl Iterator<Item = &T> {
        self.flights.iter().map(|f| &f.extra)
    }

    /// Waits until the oldest batch has its answer (then [`Appender::durable`] returns at
    /// once, or retries); never, if none is in flight. Cancel-safe, for a `select!`: an
    /// answer is kept once heard.
    pub async fn answered(&mut self) {
        let Some(front) = self.flights.front_mut() else {
            return std::future::pending().await;
        };
        if let State::Submitted(submitted) = &mut front.state {
            let result = submitted.await;
            front.state = State::Answered(result);
        }
    }
}

impl Appender {
    /// Prepares `frames` as events and hands them, with `checkpoints` (one atomic commit), to
    /// the queue behind the batches already in flight, without waiting for them to be durable:
    /// [`Appender::durable`] says when they are. The caller keeps at most [`DEPTH`] in flight
    /// ([`InFlight::is_full`]) so that a full queue still stops its reading. Frames cut for
    /// being over the limit with `oversize = "dead_letter"` are stored as dead letters first,
    /// waited for (as in [`Appender::store`]); `Err` only if `stop` comes first then.
    pub async fn submit<T>(
        &self,
        in_flight: &mut InFlight<T>,
        frames: Vec<Frame>,
        checkpoints: Vec<Checkpoint>,
        extra: T,
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        let l = &self.lines;
        let Prepared { lines, dead, tally } = prepare(&frames, &l.key, l.oversize);
        if !dead.is_empty() {
            let stored = self
                .until_stored(l.counters.queue_full_waits(), stop, || {
                    self.queue.add_dead_letters(dead.clone())
                })
                .await;
            if stored.is_err() {
                self.lost_at_stop(frames.len(), in_flight);
                return Err(Stopped);
            }
        }
        let order = &in_flight.order;
        let submitted = self
            .queue
            .submit_lines(&l.key.0, &lines, checkpoints.clone(), order)
            .await;
        drop(lines);
        let state = match submitted {
            Ok(submitted) => State::Submitted(submitted),
            Err(e) => {
                // Refused before it reached the writer (full, say): the later batches must
                // not be stored ahead of it either.
                order.broke();
                State::Answered(Err(e))
            }
        };
        in_flight.flights.push_back(Flight {
            frames,
            checkpoints,
            tally,
            state,
            extra,
        });
        Ok(())
    }

    /// The oldest batch in flight once it is durable, counted; `None` if none is in flight.
    /// If it failed, every batch in flight is appended again, in order, waiting as long as
    /// the queue is full; `Err` if `stop` comes first then (they were not stored, and the
    /// source says so). Not cancel-safe: a `select!` waits on [`InFlight::answered`], then
    /// calls this.
    pub async fn durable<T>(
        &self,
        in_flight: &mut InFlight<T>,
        stop: &CancellationToken,
    ) -> Option<Result<Durable<T>, Stopped>> {
        let mut oldest = in_flight.flights.pop_front()?;
        let answer = match std::mem::replace(&mut oldest.state, State::Answered(Ok(()))) {
            State::Submitted(submitted) => submitted.await,
            State::Answered(answer) => answer,
        };
        let result = match answer {
            Ok(()) => Ok(()),
            Err(e) => self.append_again(&oldest, e, in_flight, stop).await,
        };
        if result.is_err() {
            self.lost_at_stop(oldest.frames.len(), in_flight);
            return Some(Err(Stopped));
        }
        self.wait_state(false, None);
        self.lines.counters.counted(&oldest.tally);
        Some(Ok(Durable {
            frames: oldest.frames,
            extra: oldest.extra,
        }))
    }

    /// Says how many events the source read and could not store at a stop: `unstored` of its
    /// own and those of the batches in flight not known durable, which are dropped (the
    /// durable ones stay, to be heard of as such): never lost unsaid, never said twice.
    fn lost_at_stop<T>(&self, unstored: usize, in_flight: &mut InFlight<T>) {
        let durable = |f: &Flight<T>| matches!(f.state, State::Answered(Ok(())));
        let events = unstored
            + in_flight
                .flights
                .iter()
                .filter(|f| !durable(f))
                .map(|f| f.frames.len())
                .sum::<usize>();
        in_flight.flights.retain(durable);
        tracing::warn!(
            source = %self.name,
            events,
            "the source stopped while the queue could not take its events: they were read \
             but not stored"
        );
    }

    /// After `oldest` failed with `error`: hears every later batch's answer (each failed, the
    /// order being broken, or will at once), so that none is still with the writer, mends the
    /// order, and appends them all again, one at a time and in order.
    async fn append_again<T>(
        &self,
        oldest: &Flight<T>,
        error: QueueError,
        in_flight: &mut InFlight<T>,
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        for flight in in_flight.flights.iter_mut() {
            if let State::Submitted(submitted) = &mut flight.state {
                let result = submitted.await;
                flight.state = State::Answered(result);
            }
        }
        in_flight.order.mend();
        let full_waits = self.lines.counters.queue_full_waits();
        self.after_error(&error, full_waits, stop).await?;
        self.store_again(oldest, stop).await?;
        for flight in in_flight.flights.iter_mut() {
            // A later batch stored all the same (the order forbids it) is not stored twice.
            if !matches!(flight.state, State::Answered(Ok(()))) {
                self.store_again(flight, stop).await?;
                flight.state = State::Answered(Ok(()));
            }
        }
        Ok(())
    }

    /// Appends a batch's events (not its dead letters: they are stored) with its checkpoints
    /// until they are durable.
    async fn store_again<T>(
        &self,
        flight: &Flight<T>,
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        let l = &self.lines;
        let lines = prepare(&flight.frames, &l.key, l.oversize).lines;
        self.until_stored(l.counters.queue_full_waits(), stop, || {
            self.queue
                .append_lines(&l.key.0, &lines, flight.checkpoints.clone())
        })
        .await
    }
}

#[cfg(all(test, feature = "failpoints"))]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::config::{IntakeKey, QueueConfig};
    use crate::queue::{Position, Queue};
    use crate::sources::durable::Lines;
    use crate::sources::stdin::StdinSourceStats;
    use crate::sources::syslog::framing::{Cut, Oversize};

    fn frames(tag: &str, n: usize) -> Vec<Frame> {
        (0..n)
            .map(|i| Frame {
                message: Bytes::from(format!("{tag}-{i}")),
                cut: Cut::Whole,
            })
            .collect()
    }

    fn texts(frames: &[Frame]) -> Vec<String> {
        frames
            .iter()
            .map(|f| String::from_utf8_lossy(&f.message).into_owned())
            .collect()
    }

    /// A stream's first batch in flight is refused (the disk looked full when its group was
    /// checked) and its second, in a group of its own, is refused for it: the appender
    /// stores both again, in order, once there is room, and counts each once.
    #[tokio::test]
    async fn a_refused_batch_and_the_one_after_it_are_stored_again_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = QueueConfig {
            path: dir.path().join("q"),
            ..QueueConfig::default()
        };
        let queue = Queue::open(&cfg).unwrap();
        let stats = Arc::new(StdinSourceStats::default());
        let lines = Lines {
            key: IntakeKey("K".into()),
            oversize: Oversize::Truncate,
            counters: stats.clone(),
        };
        let appender = Appender::new(queue.clone(), "test source".into(), lines, "test");
        let aim = crate::failpoint::aim(&cfg.path);
        let scenario = fail::FailScenario::setup();
        let (mut reached, release) = crate::failpoint::hold_once("queue-disk-check");
        let stop = CancellationToken::new();
        let mut in_flight = InFlight::new();
        let (one, two) = (frames("one", 3), frames("two", 3));
        appender
            .submit(&mut in_flight, one.clone(), Vec::new(), 1, &stop)
            .await
            .unwrap();
        reached.recv().await.unwrap();
        appender
            .submit(&mut in_flight, two.clone(), Vec::new(), 2, &stop)
            .await
            .unwrap();
        assert!(in_flight.is_full());
        fail::cfg("queue-disk-low", "1*return").unwrap();
        release.send(()).unwrap();
        let first = appender
            .durable(&mut in_flight, &stop)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.extra, 1);
        let second = appender
            .durable(&mut in_flight, &stop)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(second.extra, 2);
        assert!(appender.durable(&mut in_flight, &stop).await.is_none());
        fail::remove("queue-disk-check");
        fail::remove("queue-disk-low");
        drop(scenario);
        drop(aim);
        let stored: Vec<String> = queue
            .read(0, Position::default(), usize::MAX, usize::MAX)
            .unwrap()
            .chunks
            .into_iter()
            .flat_map(|c| c.chunk.events)
            .collect();
        assert_eq!(stored, [texts(&one), texts(&two)].concat());
        assert_eq!(stats.accepted_events.load(Ordering::Relaxed), 6);
        assert!(stats.queue_full_waits.load(Ordering::Relaxed) >= 1);
    }
}
