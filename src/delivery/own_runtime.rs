//! Delivery on threads of its own, so that how busy the sources are cannot starve the drain.
//!
//! Sources and delivery on one tokio runtime share its workers task by task: with a thousand
//! syslog connections runnable, the lane tasks and their HTTP connections got about one turn
//! in a thousand, so delivery sent almost nothing until the senders paused. The queue took
//! nearly the whole burst (978,855 of 1,000,000 events queued at once in the bench's
//! 1,000-connection cell), those events were read back from disk and decompressed rather than
//! from the bodies kept in memory (`queue/fresh.rs`), and they reached the intake seconds
//! late. On a runtime of its own, delivery's threads are scheduled by the kernel beside the
//! sources' workers, whatever the number of source tasks (`docs/performance.md`, session 15).

use std::time::Duration;

use tokio::sync::oneshot;

use super::Delivery;

/// A delivery running on its own runtime; [`Running::finished`] waits for its end.
#[derive(Debug)]
pub struct Running {
    done: oneshot::Receiver<()>,
}

/// Delivery's worker threads: half the machine's cores (at least one), so that sources keep
/// the rest; delivery's own work per event (building and sending requests) is a fraction of
/// what storing it costs.
fn worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

impl Delivery {
    /// Starts [`Delivery::run`] on a runtime of its own (threads named `delivery`); `Err` if
    /// its threads cannot be made.
    ///
    /// The runtime is built, run and dropped on delivery's own thread: a runtime dropped
    /// in an async context panics, which a failed `spawn` holding it would do here.
    pub async fn start(self, grace: Duration) -> std::io::Result<Running> {
        let (started, built) = oneshot::channel();
        let (tx, done) = oneshot::channel();
        std::thread::Builder::new()
            .name("delivery".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(worker_threads())
                    .thread_name("delivery")
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = started.send(Err(e));
                        return;
                    }
                };
                let _ = started.send(Ok(()));
                runtime.block_on(self.run(grace));
                // The runtime is shut down (its tasks dropped, their connections closed)
                // before the end is told, so that the queue is closed after it.
                drop(runtime);
                let _ = tx.send(());
            })?;
        built
            .await
            .map_err(|_| std::io::Error::other("the delivery thread ended at its start"))??;
        Ok(Running { done })
    }
}

impl Running {
    /// Waits until delivery has stopped (after its stop was asked for, or if it panicked).
    pub async fn finished(self) -> Result<(), &'static str> {
        self.done.await.map_err(|_| "the delivery thread panicked")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::config::{IntakeConfig, QueueConfig};
    use crate::intake_api::IncomingEvent;
    use crate::mock_intake::MockIntake;
    use crate::queue::Queue;

    fn runtime(workers: usize) -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .unwrap()
    }

    /// A thousand busy syslog connections left a delivery on their runtime about one turn in
    /// a thousand; this takes that to its end: every worker of the runtime delivery is
    /// started from is held by a task that does not yield, and the events still arrive. (On
    /// that runtime, `tokio::spawn(delivery.run(..))`, as before, delivers nothing until the
    /// workers are let go.)
    #[test]
    fn delivery_goes_on_while_every_worker_of_the_sources_runtime_is_held() {
        // The intake and the queue's appends on a runtime of their own, as if elsewhere.
        let intake = runtime(1);
        let dir = tempfile::tempdir().unwrap();
        let (mock, queue) = intake.block_on(async {
            let mock = MockIntake::start("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            let queue = Queue::open(&QueueConfig {
                path: dir.path().join("q"),
                ..QueueConfig::default()
            })
            .unwrap();
            (mock, queue)
        });
        let events: Vec<IncomingEvent> = (0..100)
            .map(|i| IncomingEvent {
                intake_key: "held-workers-test-key".into(),
                timestamp: None,
                raw: format!("event {i} while the sources hold every worker"),
            })
            .collect();
        intake.block_on(queue.append(events)).unwrap();

        let sources = runtime(2);
        let (release, holding) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        for _ in 0..2 {
            let (release, holding) = (release.clone(), holding.clone());
            sources.spawn(async move {
                holding.fetch_add(1, Ordering::SeqCst);
                while !release.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while holding.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(holding.load(Ordering::SeqCst), 2, "both workers are held");

        let stop = CancellationToken::new();
        let config = IntakeConfig {
            url: mock.url().parse().unwrap(),
            linger_ms: 10,
            ..IntakeConfig::default()
        };
        // Started from within the sources' runtime, as `app.rs` does (its `block_on` runs
        // on this thread, not on the held workers).
        let delivery = Delivery::new(config, queue.clone(), stop.clone()).unwrap();
        let running = sources
            .block_on(delivery.start(Duration::from_secs(5)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while mock.stats().accepted_events < 100 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let delivered = mock.stats().accepted_events;
        release.store(true, Ordering::SeqCst);
        assert_eq!(
            delivered, 100,
            "delivered while the sources' workers were held"
        );

        stop.cancel();
        intake.block_on(async {
            running.finished().await.unwrap();
            queue.close().await.unwrap();
            mock.shutdown().await;
        });
    }
}
