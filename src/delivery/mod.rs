//! Delivery: drains the queue to the intake's `/jsons`, one intake key per request.
//!
//! One task per lane (intake key) reads batches in queue order and hands each to a task of its
//! own ([`batch::deliver`]), up to `max_in_flight` per lane; a global semaphore bounds the
//! requests on the wire at once. Batches of one lane may therefore complete out of order; the
//! intake orders events by their dates, not by arrival.
//!
//! Nothing leaves the queue unless the intake answered 2xx with one event id per event sent
//! ([`client::classify`]); the removal goes through [`Queue::ack`].
//!
//! Every wait and age here is timed with the monotonic clock (tokio's time, [`Instant`]): a
//! wall clock stepped backwards must not stall a lane. Wall time is only for what leaves the
//! process (the dates of dead letters).

mod batch;
pub mod client;
mod own_runtime;
pub mod retry;

pub use own_runtime::Running;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::IntakeConfig;
use crate::intake_api::redact_key;
use crate::queue::{Ack, BatchDate, Lane, Position, Queue, QueueError, ReadLimits, ReadSpan};
use batch::BatchBuilder;
use client::{Headers, IntakeClient, Outcome};

crate::stats::stats_table! {
    /// Delivery's counters, shown by `/status` and `/metrics`.
    pub struct DeliveryStats => DeliverySnapshot, metrics "delivery" {
        requests: counter, "Requests sent to the intake";
        acked_events: counter, "Events acknowledged by the intake";
        retries: counter, "Failed requests that will be retried";
        auth_failures: counter, "Requests refused for their intake key (401/403)";
        dead_letters: counter, "Events refused for good and kept aside";
        redirects: counter, "Redirects (3xx) answered by the intake: never followed, retried";
        undated_events: counter,
            "Events sent without their event date, which could not be sent as a header";
        reception_dated_events: counter,
            "Events without a date of their own sent dated by their reception (event_time = reception)";
        in_flight: gauge, "Requests on the wire";
    }
}

/// What every delivery task shares.
pub(crate) struct Ctx {
    config: IntakeConfig,
    queue: Queue,
    client: IntakeClient,
    requests: Semaphore,
    stats: Arc<DeliveryStats>,
    shutdown: CancellationToken,
    /// Whether the intake's last answer was a redirect: logged when it starts and ends, not
    /// at every try.
    redirected: AtomicBool,
}

impl Ctx {
    /// One request, holding a global slot only while it is on the wire.
    async fn send(&self, headers: &Headers, body: bytes::Bytes, events: usize) -> Outcome {
        let _slot = self.requests.acquire().await;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let outcome = self.client.send(headers, body, events).await;
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.note_redirect(&outcome);
        outcome
    }

    /// Counts redirects, and logs when the intake starts answering with them (with the host
    /// it points to) and when it stops.
    fn note_redirect(&self, outcome: &Outcome) {
        match outcome {
            Outcome::Redirected { status, to } => {
                self.stats.redirects.fetch_add(1, Ordering::Relaxed);
                if !self.redirected.swap(true, Ordering::Relaxed) {
                    tracing::error!(status, location = %to, endpoint = self.client.endpoint(),
                        "the intake answers with a redirect; redirects are never followed (the \
                         intake key would go along), so events stay queued and are retried with \
                         backoff: check intake.url");
                }
            }
            Outcome::Retry { .. } => {}
            _ => {
                if self.redirected.swap(false, Ordering::Relaxed) {
                    tracing::info!("the intake answers again instead of redirecting");
                }
            }
        }
    }

    /// Records progress in the queue; false if the queue is gone (shutting down).
    ///
    /// A storage error (a full disk) is retried every second: the batch keeps its chunks, so
    /// they are neither lost nor sent again while the disk recovers.
    async fn write_back(&self, lane: u32, ack: Ack) -> bool {
        if ack.remove.is_empty() && ack.rewrite.is_empty() && ack.dead.is_empty() {
            return true;
        }
        let mut logged = false;
        loop {
            match self.queue.ack(lane, ack.clone()).await {
                Ok(()) => return true,
                Err(QueueError::Closed) => {
                    tracing::warn!(
                        lane,
                        "queue closed before delivered events were recorded; \
                        they will be sent again after restart"
                    );
                    return false;
                }
                Err(e) => {
                    if !logged {
                        tracing::warn!(lane, error = %e,
                            "cannot record delivered events yet; retrying every second");
                        logged = true;
                    }
                    if !self.sleep(Duration::from_secs(1)).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Sleeps unless shutdown comes first; false on shutdown.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.shutdown.cancelled() => false,
        }
    }
}

/// The delivery engine.
pub struct Delivery {
    ctx: Arc<Ctx>,
    tasks: TaskTracker,
}

impl Delivery {
    pub fn new(
        config: IntakeConfig,
        queue: Queue,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Delivery> {
        let client = IntakeClient::new(&config)?;
        let ctx = Arc::new(Ctx {
            requests: Semaphore::new(config.max_in_flight),
            config,
            queue,
            client,
            stats: Arc::default(),
            shutdown,
            redirected: AtomicBool::new(false),
        });
        Ok(Delivery {
            ctx,
            tasks: TaskTracker::new(),
        })
    }

    pub fn stats(&self) -> Arc<DeliveryStats> {
        self.ctx.stats.clone()
    }

    /// The URL batches go to.
    pub fn endpoint(&self) -> &str {
        self.ctx.client.endpoint()
    }

    /// Runs until shutdown, then waits for requests on the wire to finish (their answers are
    /// recorded) for at most `grace`.
    pub async fn run(self, grace: Duration) {
        let mut started = HashSet::new();
        loop {
            // Before the list: a lane created after this call wakes it, even while the list is
            // read and the tasks are started.
            let changed = self.ctx.queue.lanes_changed();
            for lane in self.ctx.queue.lanes() {
                if started.insert(lane.id) {
                    self.tasks
                        .spawn(run_lane(self.ctx.clone(), lane, self.tasks.clone()));
                }
            }
            tokio::select! {
                _ = changed => {}
                _ = self.ctx.shutdown.cancelled() => break,
            }
        }
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("delivery still busy at the end of the grace period; unfinished batches stay queued");
        }
    }
}

/// Reads one lane in order and starts its batches.
async fn run_lane(ctx: Arc<Ctx>, lane: Arc<Lane>, tasks: TaskTracker) {
    let slots = Arc::new(Semaphore::new(ctx.config.max_in_flight));
    let mut cursor = Position::default();
    // Since when the events after `cursor` may have been waiting: the events of a partial
    // batch linger until `linger_ms` after it. Monotonic, so a clock step cannot stall them.
    // After a batch leaves, the next one's events were all appended since then.
    let mut waiting_since: Option<Instant> = None;
    // A partial batch waiting for more events (linger), kept as read and built so far: the
    // next read goes on after it rather than reading, decompressing and escaping every one of
    // its events again (a lane lingering through many commits used to rebuild its batch at
    // each).
    let mut pending: Option<(ReadSpan, BatchBuilder)> = None;
    let key = redact_key(&lane.intake_key);
    tracing::debug!(lane = lane.id, intake_key = %key, "delivering lane");
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => return },
            _ = ctx.shutdown.cancelled() => return,
        };
        let appended_before = lane.appended();
        let read = match pending.take() {
            None => read_lane(&ctx, lane.id, cursor).await,
            Some((span, builder)) => read_on(&ctx, lane.id, span, builder).await,
        };
        let (read, builder) = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(lane = lane.id, error = %e, "cannot read the queue; retrying");
                if !ctx.sleep(Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
        };
        // The queue moved the chunks it could not decode to the dead letters: counted here
        // with the others.
        ctx.stats
            .dead_letters
            .fetch_add(read.undecodable as u64, Ordering::Relaxed);
        if builder.is_empty() {
            cursor = read.next;
            waiting_since = None;
            drop(slot);
            if read.undecodable > 0 {
                // Only undecodable chunks this time (the end of a generation, say): the rest
                // of the lane may be in the next generations, so read on rather than wait for
                // an append that may never come.
                continue;
            }
            tokio::select! {
                _ = lane.notify.notified() => {}
                _ = ctx.shutdown.cancelled() => return,
            }
            continue;
        }
        let age = waiting_since.get_or_insert_with(Instant::now).elapsed();
        if let Some(wait) = linger_left(&ctx.config, &read, age) {
            drop(slot);
            if !wait_for_more(&ctx, &lane, appended_before, &read, wait).await {
                return;
            }
            let read = ReadSpan {
                undecodable: 0,
                ..read
            };
            pending = Some((read, builder));
            continue;
        }
        cursor = read.next;
        waiting_since = Some(Instant::now());
        let batch = builder.finish(lane.id, read.gen);
        let ctx = ctx.clone();
        tasks.spawn(async move {
            batch::deliver(ctx, batch).await;
            drop(slot);
        });
    }
}

/// Reads the next batch of a lane from `cursor`, built into a request body as it is read.
async fn read_lane(
    ctx: &Arc<Ctx>,
    lane: u32,
    cursor: Position,
) -> Result<(ReadSpan, BatchBuilder), anyhow::Error> {
    let queue = ctx.queue.clone();
    let limits = ReadLimits {
        max_events: ctx.config.batch_max_events,
        max_bytes: ctx.config.batch_max_bytes,
        reception_tolerance_ms: ctx.config.reception_tolerance_ms(),
    };
    let read = tokio::task::spawn_blocking(move || {
        let mut builder = BatchBuilder::default();
        let span = queue.read_with(lane, cursor, limits, &mut |seq, chunk| {
            builder.push(seq, chunk)
        })?;
        Ok::<_, QueueError>((span, builder))
    })
    .await??;
    Ok(read)
}

/// Reads on after a partial batch (`span`, built so far into `builder`) that waited for
/// more events: the span and the builder grown by what came since, in the same generation
/// and with the same event date; `undecodable` counts only what this read found.
async fn read_on(
    ctx: &Arc<Ctx>,
    lane: u32,
    mut span: ReadSpan,
    mut builder: BatchBuilder,
) -> Result<(ReadSpan, BatchBuilder), anyhow::Error> {
    let queue = ctx.queue.clone();
    let limits = ReadLimits {
        max_events: ctx.config.batch_max_events.saturating_sub(span.events),
        max_bytes: ctx.config.batch_max_bytes.saturating_sub(span.bytes),
        reception_tolerance_ms: ctx.config.reception_tolerance_ms(),
    };
    let read = tokio::task::spawn_blocking(move || {
        let timestamp = builder.timestamp().map(str::to_owned);
        let date = BatchDate {
            timestamp: timestamp.as_deref(),
            received_at_ms: builder.received_at_ms(),
        };
        let more = queue.read_on(lane, span.next, limits, date, &mut |seq, chunk| {
            builder.push(seq, chunk)
        })?;
        span.chunks += more.chunks;
        span.events += more.events;
        span.bytes += more.bytes;
        span.next = more.next;
        span.sealed = more.sealed;
        span.cut = more.cut;
        span.full = more.full;
        span.undecodable = more.undecodable;
        Ok::<_, QueueError>((span, builder))
    })
    .await??;
    Ok(read)
}

/// How much longer a partial batch whose events have waited `age` may wait for more, if any:
/// none once nothing more can join it (a sealed generation, a chunk of another date after it,
/// or a next chunk that does not fit).
fn linger_left(config: &IntakeConfig, read: &ReadSpan, age: Duration) -> Option<Duration> {
    if read.sealed || read.cut || read.full {
        return None;
    }
    if read.events >= config.batch_max_events || read.bytes >= config.batch_max_bytes / 2 {
        return None;
    }
    config.linger().checked_sub(age).filter(|d| !d.is_zero())
}

/// Waits until the linger time is over or enough events arrived to fill the batch.
async fn wait_for_more(
    ctx: &Ctx,
    lane: &Lane,
    appended_before: u64,
    read: &ReadSpan,
    wait: Duration,
) -> bool {
    let deadline = Instant::now() + wait;
    let room = ctx.config.batch_max_events.saturating_sub(read.events) as u64;
    loop {
        if lane.appended().saturating_sub(appended_before) >= room {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        tokio::select! {
            _ = lane.notify.notified() => {}
            _ = tokio::time::sleep(left) => return true,
            _ = ctx.shutdown.cancelled() => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QueueConfig;
    use crate::intake_api::IncomingEvent;
    use crate::mock_intake::MockIntake;
    use crate::queue::now_ms;

    /// Delivery of `queue` to `mock`, running until [`Running::stop`]. One request at a time,
    /// so that the mock receives events in queue order (batches in flight together may
    /// complete in any order).
    struct Running {
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Running {
        fn start(queue: &Queue, mock: &MockIntake) -> Running {
            let config = IntakeConfig {
                linger_ms: 10,
                ..IntakeConfig::default()
            };
            Running::with(queue, mock, config)
        }

        /// With `config`, but the mock's URL and one request at a time.
        fn with(queue: &Queue, mock: &MockIntake, config: IntakeConfig) -> Running {
            let config = IntakeConfig {
                url: mock.url().parse().unwrap(),
                max_in_flight: 1,
                ..config
            };
            let stop = CancellationToken::new();
            let delivery = Delivery::new(config, queue.clone(), stop.clone()).unwrap();
            let task = tokio::spawn(delivery.run(Duration::from_secs(5)));
            Running { stop, task }
        }

        async fn stop(self) {
            self.stop.cancel();
            self.task.await.unwrap();
        }
    }

    /// A mock intake, and a queue of `config` in a temporary directory (kept alive by the
    /// returned guard).
    async fn mock_and_queue(config: QueueConfig) -> (MockIntake, tempfile::TempDir, Queue) {
        let mock = MockIntake::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::open(&QueueConfig {
            path: dir.path().join("q"),
            ..config
        })
        .unwrap();
        (mock, dir, queue)
    }

    /// Waits (30 s at most) until `done` holds.
    async fn eventually(mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A partial batch that waits for more events (linger) reads each chunk once: once its
    /// wait is over it reads on after its chunks, where it used to read, decompress and escape
    /// all of them again (here: 21 chunk reads for 20 chunks). And it still goes as one
    /// request with every event once.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_lingering_batch_reads_each_chunk_once() {
        let (mock, _dir, queue) = mock_and_queue(QueueConfig::default()).await;
        let key = "linger-reads-once-test-key";
        let (appends, per_append) = (20u64, 100usize);
        // The batch waits (for up to a minute) until it is full: 20 appends' worth.
        let config = IntakeConfig {
            linger_ms: 60_000,
            batch_max_events: appends as usize * per_append,
            ..IntakeConfig::default()
        };
        let running = Running::with(&queue, &mock, config);
        let reads = || {
            let (memory, decompressed) = queue.fresh_reads();
            memory + decompressed
        };
        let mut want = Vec::new();
        for r in 0..appends {
            // Events that compress well: one chunk per append, stored compressed, and each
            // read of it counted.
            let batch: Vec<IncomingEvent> = (0..per_append)
                .map(|i| IncomingEvent {
                    intake_key: key.into(),
                    timestamp: None,
                    raw: format!("append {r:02} event {i:03} of the lingering batch test"),
                })
                .collect();
            want.extend(batch.iter().map(|e| e.raw.clone()));
            queue.append(batch).await.unwrap();
            if r == 0 {
                // The batch has begun with the first chunk, and waits for more.
                eventually(|| reads() >= 1).await;
                assert_eq!(reads(), 1);
            }
        }
        assert!(
            mock.wait_for(|e| e.len() >= want.len(), Duration::from_secs(30))
                .await,
            "delivered {} of {}",
            mock.events().len(),
            want.len()
        );
        running.stop().await;
        let got: Vec<String> = mock.events().into_iter().map(|e| e.raw).collect();
        assert_eq!(got, want, "every event once, in order");
        assert_eq!(mock.stats().accepted_requests, 1, "one batch");
        assert_eq!(reads(), appends, "each chunk read once");
    }

    /// A backlog of events received seconds apart (an outage) goes one request per tolerance
    /// window, each dated by its first event's reception, and a batch cut by the tolerance is
    /// sent at once: it does not linger (here a minute) for events that can never join it.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_batch_cut_by_reception_time_goes_without_lingering() {
        let (mock, _dir, queue) = mock_and_queue(QueueConfig::default()).await;
        let key = "reception-cut-test-key-01";
        let start = now_ms() - 10_000;
        for (i, at) in [start, start + 400, start + 2_000, start + 4_000]
            .into_iter()
            .enumerate()
        {
            let event = IncomingEvent {
                intake_key: key.into(),
                timestamp: None,
                raw: format!("received at +{} ms ({i})", at - start),
            };
            queue.append_received_at(vec![event], at).await.unwrap();
        }
        let config = IntakeConfig {
            linger_ms: 60_000,
            ..IntakeConfig::default()
        };
        let began = Instant::now();
        let running = Running::with(&queue, &mock, config);
        // The first three events in two cut batches; the last one lingers (nothing after it
        // cut its batch), up to the minute.
        let delivered = mock
            .wait_for(|e| e.len() >= 3, Duration::from_secs(30))
            .await;
        let took = began.elapsed();
        running.stop().await;
        assert!(delivered, "got {:?}", mock.events());
        assert!(took < Duration::from_secs(30), "lingered: {took:?}");
        let got: Vec<(String, Option<String>)> = mock
            .events()
            .into_iter()
            .map(|e| (e.raw, e.timestamp))
            .collect();
        let date = |ms| crate::intake_api::reception_date(ms);
        assert_eq!(
            got,
            [
                ("received at +0 ms (0)".to_owned(), date(start)),
                ("received at +400 ms (1)".to_owned(), date(start)),
                ("received at +2000 ms (2)".to_owned(), date(start + 2_000)),
            ]
        );
        assert_eq!(mock.stats().accepted_requests, 2);
    }

    /// A batch that the next chunk would take past `batch_max_events` goes at once: it is as
    /// full as chunks make it. Before, it lingered for room that never came: a backlog in the
    /// active generation went one batch per `linger_ms` (200-byte events from a file: 80 events
    /// a chunk, 9,963 of 10,000 a batch, 1 M events drained in 8 s instead of 1).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_batch_the_next_chunk_does_not_fit_goes_without_lingering() {
        let (mock, _dir, queue) = mock_and_queue(QueueConfig::default()).await;
        let key = "full-batch-test-key-0001";
        // Three appends of 30 events: three chunks; a batch of at most 50 takes one (30),
        // the next (60) would not fit.
        for r in 0..3 {
            let events = (0..30)
                .map(|i| IncomingEvent {
                    intake_key: key.into(),
                    timestamp: None,
                    raw: format!("append {r} event {i:02}"),
                })
                .collect();
            queue.append(events).await.unwrap();
        }
        let config = IntakeConfig {
            linger_ms: 60_000,
            batch_max_events: 50,
            ..IntakeConfig::default()
        };
        let began = Instant::now();
        let running = Running::with(&queue, &mock, config);
        // The first two batches go at once; the last one (30 events, nothing after it) may
        // linger.
        let delivered = mock
            .wait_for(|e| e.len() >= 60, Duration::from_secs(30))
            .await;
        let took = began.elapsed();
        running.stop().await;
        assert!(delivered, "got {} events", mock.events().len());
        assert!(took < Duration::from_secs(30), "lingered: {took:?}");
    }

    /// A lane created after `lanes_changed()` was called wakes the waiter, even if the wait is
    /// first polled later: `Delivery::run` reads the lane list in between, and a lane created
    /// then would otherwise have no delivery task until another new key came.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_new_lane_between_the_list_and_the_wait_is_not_missed() {
        let (_mock, _dir, queue) = mock_and_queue(QueueConfig::default()).await;
        let changed = queue.lanes_changed();
        let lanes_seen = queue.lanes().len();
        queue
            .append(vec![IncomingEvent {
                intake_key: "lane-created-in-the-gap-key".into(),
                timestamp: None,
                raw: "first".into(),
            }])
            .await
            .unwrap();
        assert_eq!(queue.lanes().len(), lanes_seen + 1);
        let woken = tokio::time::timeout(Duration::from_secs(10), changed).await;
        assert!(woken.is_ok(), "the new lane's notification was lost");
    }

    /// A queued event date that cannot be sent as a header (queued before dates were checked at
    /// ingest) is a local failure, not the intake's 400: the events are sent without the date
    /// (the intake then dates them at reception) and nothing is dead-lettered. An intake key
    /// that cannot be a header cannot be sent at all: its events are dead-lettered at once,
    /// with a reason that says it was local (status 0), and no request is made for them.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_request_that_cannot_be_built_is_not_the_intakes_answer() {
        let (mock, _dir, queue) = mock_and_queue(QueueConfig::default()).await;
        let event = |key: &str, timestamp: &str, raw: &str| IncomingEvent {
            intake_key: key.into(),
            timestamp: Some(timestamp.into()),
            raw: raw.into(),
        };
        let good_key = "local-failure-test-key-01";
        let huge_date = format!("2024-01-01T00:00:00{}Z", "0".repeat(100_000));
        queue
            .append(vec![
                event(good_key, "2024-01-01\nT00:00:00Z", "newline date 1"),
                event(good_key, "2024-01-01\nT00:00:00Z", "newline date 2"),
                event(good_key, &huge_date, "huge date"),
                event(good_key, "2024-01-01T00:00:00Z", "good date"),
                event("bad\nkey", "2024-01-01T00:00:00Z", "bad key 1"),
                event("bad\nkey", "2024-01-01T00:00:00Z", "bad key 2"),
            ])
            .await
            .unwrap();
        let running = Running::start(&queue, &mock);
        let delivered = mock
            .wait_for(|e| e.len() >= 4, Duration::from_secs(30))
            .await;
        let raws = || -> Vec<String> { mock.events().into_iter().map(|e| e.raw).collect() };
        assert!(delivered, "got {:?}", raws());
        eventually(|| queue.dead_letter_count() >= 2 && queue.totals().0 == 0).await;
        running.stop().await;

        let mut got: Vec<(String, Option<String>)> = mock
            .events()
            .into_iter()
            .map(|e| (e.raw, e.timestamp))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                (
                    "good date".to_owned(),
                    Some("2024-01-01T00:00:00Z".to_owned())
                ),
                ("huge date".to_owned(), None),
                ("newline date 1".to_owned(), None),
                ("newline date 2".to_owned(), None),
            ]
        );
        let dead = queue.dead_letters().unwrap();
        let mut raws: Vec<&str> = dead.iter().map(|d| d.event.as_str()).collect();
        raws.sort();
        assert_eq!(raws, ["bad key 1", "bad key 2"], "{dead:?}");
        for d in &dead {
            assert_eq!(
                d.status, 0,
                "a local failure is not an answer of the intake"
            );
            assert!(d.reason.contains("never sent"), "{}", d.reason);
        }
        assert_eq!(queue.totals().0, 0);
        assert_eq!(mock.stats().status_count(400), 0, "{:?}", mock.stats());
    }

    /// Linger is timed with the monotonic clock: a chunk stamped an hour ahead of the wall
    /// clock (what the clock stepped back by an hour after the append looks like) is sent once
    /// the linger time has passed, not an hour later.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_clock_stepped_back_does_not_stall_a_quiet_lane() {
        let (mock, _dir, queue) = mock_and_queue(QueueConfig::default()).await;
        let key = "clock-step-test-key-01";
        queue
            .append(vec![IncomingEvent {
                intake_key: key.into(),
                timestamp: None,
                raw: "from the future".into(),
            }])
            .await
            .unwrap();
        let ahead = crate::queue::Chunk {
            intake_key: key.into(),
            timestamp: None,
            received_at_ms: now_ms() + 3_600_000,
            events: vec!["from the future".into()],
        };
        queue.insert_chunk(0, 0, &ahead);
        let running = Running::start(&queue, &mock);
        let delivered = mock
            .wait_for(|e| !e.is_empty(), Duration::from_secs(30))
            .await;
        running.stop().await;
        assert!(delivered, "a lane stalled by a clock stepped back");
    }

    /// A chunk that cannot be decoded (a corrupt queue) is moved to the dead letters with its
    /// raw bytes, and the events around it are still delivered.
    #[tokio::test(flavor = "multi_thread")]
    async fn undecodable_chunks_are_quarantined_and_the_lane_goes_on() {
        let (mock, _dir, queue) = mock_and_queue(QueueConfig::default()).await;
        let event = |raw: &str| IncomingEvent {
            intake_key: "corrupt-queue-test-key-01".into(),
            timestamp: None,
            raw: raw.into(),
        };
        for raw in ["before", "lost 1", "lost 2", "after"] {
            queue.append(vec![event(raw)]).await.unwrap();
        }
        // Chunks 1 and 2 rot on disk.
        queue.insert_raw_chunk(0, 1, b"\x01 not a chunk");
        queue.insert_raw_chunk(0, 2, b"\x07");

        let running = Running::start(&queue, &mock);
        let delivered = mock
            .wait_for(|e| e.len() >= 2, Duration::from_secs(30))
            .await;
        assert!(delivered, "got {:?}", mock.events());
        let raws: Vec<String> = mock.events().into_iter().map(|e| e.raw).collect();
        assert_eq!(raws, ["before", "after"]);
        eventually(|| queue.dead_letter_count() >= 2).await;
        let dead = queue.dead_letters().unwrap();
        assert_eq!(dead.len(), 2);
        assert!(dead.iter().all(|d| d.reason == "undecodable chunk"));
        assert_eq!(dead[0].event.as_bytes(), b"\x01 not a chunk");
        eventually(|| queue.totals().0 == 0).await;
        assert_eq!(
            queue.totals().0,
            0,
            "the lane must be empty once all is handled"
        );
        running.stop().await;
    }

    /// A read that finds only undecodable chunks (here: the whole of a sealed generation) does
    /// not leave the lane waiting for a new append: it reads on into the next generation.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_generation_of_undecodable_chunks_does_not_stall_the_lane() {
        let (mock, _dir, queue) = mock_and_queue(QueueConfig {
            generation_bytes: 64 * 1024,
            ..QueueConfig::default()
        })
        .await;
        let key = "corrupt-generation-test-key";
        let event = |raw: String| IncomingEvent {
            intake_key: key.into(),
            timestamp: None,
            raw,
        };
        // 100 KB fills generation 0 past its 64 KiB, so the next append goes to generation 1.
        let filler = (0..100).map(|i| event(format!("{i:>1000}"))).collect();
        queue.append(filler).await.unwrap();
        queue.append(vec![event("after".into())]).await.unwrap();
        let first = queue
            .read(0, Position::default(), usize::MAX, usize::MAX)
            .unwrap();
        assert!(
            first.span.sealed,
            "the filler must be in a sealed generation"
        );
        for chunk in &first.chunks {
            queue.insert_raw_chunk(0, chunk.seq, b"\x01 rotten");
        }
        // Take the wake-up the appends left, so that nothing but the read itself moves the lane.
        queue.lanes()[0].notify.notified().await;

        let running = Running::start(&queue, &mock);
        let delivered = mock
            .wait_for(|e| !e.is_empty(), Duration::from_secs(30))
            .await;
        assert!(
            delivered,
            "the event after the rotten generation never came"
        );
        let raws: Vec<String> = mock.events().into_iter().map(|e| e.raw).collect();
        assert_eq!(raws, ["after"]);
        let rotten = first.chunks.len() as u64;
        eventually(|| queue.dead_letter_count() >= rotten).await;
        assert_eq!(queue.dead_letter_count(), rotten);
        running.stop().await;
    }
}
