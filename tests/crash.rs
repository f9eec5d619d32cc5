//! Crashes and stops: `kill -9` at random instants, SIGTERM under load, and (with the
//! `failpoints` feature) an abort between every two steps of append -> flush -> answer and of
//! send -> check ids -> remove. After each, a restart must deliver every event that a client
//! saw acknowledged, and nothing else: no event of a refused request, no phantom.
//!
//! Every kill happens with a backlog (a slow intake and small batches: the queue holds events
//! that are not delivered yet, which `status` shows after the kill), and the duplicates a kill
//! may cause are bounded: at most the batches on the wire, `max_in_flight` of
//! `batch_max_events`.

mod common;

use common::*;
use rand::Rng;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KEY: &str = "crash-test-intake-key-00001";

/// Batches on the wire at once, and events per batch: a kill can cause at most
/// `IN_FLIGHT * BATCH` duplicates (the batches the intake got but whose answer was lost).
const IN_FLIGHT: usize = 4;
const BATCH: usize = 100;
/// How long the intake takes to answer while load runs: delivery then takes at most
/// `IN_FLIGHT * BATCH` events per `SLOW_MS`, fewer than the clients send.
const SLOW_MS: u64 = 300;

/// What the clients of a [`Load`] learnt of their requests.
#[derive(Default)]
struct Outcomes {
    acked: Vec<String>,
    /// Requests that got no answer: their events may be stored or not.
    unknown: Vec<String>,
}

/// Clients that send until stopped (or until the forwarder is gone), recording what became of
/// each request.
struct Load {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Outcomes>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String, first: usize, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Outcomes::default()));
        let tasks = (0..clients)
            .map(|c| {
                let (stop, outcomes, url) = (stop.clone(), outcomes.clone(), url.clone());
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    let mut i = first + c * 1_000_000;
                    let mut failures = 0;
                    while !stop.load(Ordering::Relaxed) && failures < 50 {
                        let batch: Vec<String> = (i..i + 20).map(event).collect();
                        i += 20;
                        let sent = post_jsons_outcome(&client, &url, KEY, &batch).await;
                        match sent {
                            Sent::Acked => outcomes.lock().unwrap().acked.extend(batch),
                            Sent::Unknown => outcomes.lock().unwrap().unknown.extend(batch),
                            Sent::Refused => {}
                        }
                        if sent == Sent::Acked {
                            failures = 0;
                        } else {
                            failures += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            outcomes,
            tasks,
        }
    }

    async fn stop(self) -> Outcomes {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        std::mem::take(&mut *self.outcomes.lock().unwrap())
    }

    fn acked_count(&self) -> usize {
        self.outcomes.lock().unwrap().acked.len()
    }
}

impl Outcomes {
    fn extend(&mut self, other: Outcomes) {
        self.acked.extend(other.acked);
        self.unknown.extend(other.unknown);
    }
}

async fn wait_for_acks(load: &Load, n: usize) {
    let ok = wait_until_async(DEADLINE, || async { load.acked_count() >= n }).await;
    assert!(ok, "the forwarder acknowledged fewer than {n} events");
}

/// An intake that answers each request after `delay_ms`: with batches of [`BATCH`] events
/// and [`IN_FLIGHT`] of them at once, the clients outpace delivery and the queue holds a
/// backlog.
async fn slow_intake(delay_ms: u64) -> MockIntake {
    let mock = start_mock().await;
    mock.set_faults(FaultConfig {
        delay_ms,
        ..FaultConfig::default()
    });
    mock
}

/// The configuration of every test here: small batches, so that a backlog builds up and the
/// duplicates of a kill are bounded by a small number.
fn crash_config(dir: &std::path::Path, mock: &MockIntake) -> std::path::PathBuf {
    let intake = format!("batch_max_events = {BATCH}\nmax_in_flight = {IN_FLIGHT}");
    write_config(dir, &mock.url(), &intake, "")
}

/// Waits until the running forwarder's queue holds at least `n` events.
async fn wait_for_backlog(fwd: &Forwarder, n: u64) {
    let ok = wait_until_async(DEADLINE, || async {
        fwd.status().await["queue"]["events"].as_u64() >= Some(n)
    })
    .await;
    assert!(ok, "no backlog of {n} events built up:\n{}", fwd.log());
}

/// The events the stopped forwarder left queued, read with the `status` command (which opens
/// the queue as a restart does), and checks that the open left no half-made or half-deleted
/// generation.
fn backlog_after_stop(config: &std::path::Path) -> u64 {
    let (_, report) = run_json_command("status", config);
    assert_no_leftover_generations(&config.with_file_name("queue"));
    report["queue"]["events"].as_u64().expect("events")
}

/// Restarts the forwarder on the same queue, with the intake fast again, and checks that the
/// intake gets every event acknowledged and nothing but what was sent. Returns the duplicates.
async fn restart_and_check(config: &std::path::Path, mock: &MockIntake, sent: &Outcomes) -> usize {
    mock.set_faults(FaultConfig::default());
    let mut fwd = Forwarder::start(config);
    wait_delivered_from(&fwd, mock, &sent.acked).await;
    fwd.wait_drained().await;
    assert!(fwd.terminate().success(), "{}", fwd.log());
    assert_no_leftover_generations(&config.with_file_name("queue"));
    assert_received_only(mock, &sent.acked, &sent.unknown)
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_random_instants_loses_nothing_acknowledged() {
    const KILLS: usize = 6;
    let mock = slow_intake(SLOW_MS).await;
    let dir = tempfile::tempdir().unwrap();
    let config = crash_config(dir.path(), &mock);
    let mut sent = Outcomes::default();
    let mut rng = rand::rng();
    for round in 0..KILLS {
        mock.set_faults(FaultConfig {
            delay_ms: SLOW_MS,
            ..FaultConfig::default()
        });
        let mut fwd = Forwarder::start(&config);
        let load = Load::start(fwd.url(), round * 10_000_000, 4);
        wait_for_acks(&load, 100).await;
        wait_for_backlog(&fwd, 200).await;
        // The instant of the kill is random on purpose; what is asserted does not depend on it.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        fwd.kill9();
        sent.extend(load.stop().await);
        let backlog = backlog_after_stop(&config);
        assert!(backlog > 0, "round {round}: nothing was queued at the kill");
    }
    let dups = restart_and_check(&config, &mock, &sent).await;
    eprintln!(
        "{} events acknowledged, {dups} duplicates after {KILLS} kills",
        sent.acked.len()
    );
    assert!(
        dups <= KILLS * IN_FLIGHT * BATCH,
        "{dups} duplicates: more than the batches on the wire at {KILLS} kills"
    );
}

/// SIGTERM with requests on the wire to a slow intake: they finish within the delivery grace
/// and their acknowledgements are recorded before the queue closes, so a restart sends
/// nothing twice.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_exits_cleanly_and_loses_nothing() {
    let mock = slow_intake(500).await;
    let dir = tempfile::tempdir().unwrap();
    let config = crash_config(dir.path(), &mock);
    let mut fwd = Forwarder::start(&config);
    let load = Load::start(fwd.url(), 0, 4);
    wait_for_acks(&load, 500).await;
    let on_the_wire = wait_until_async(DEADLINE, || async {
        fwd.status().await["delivery"]["in_flight"].as_u64() > Some(0)
    })
    .await;
    assert!(on_the_wire, "no request on the wire:\n{}", fwd.log());
    let status = fwd.terminate();
    assert!(status.success(), "exit status {status:?}:\n{}", fwd.log());
    assert!(fwd.log().contains("SIGTERM received"));
    let sent = load.stop().await;
    assert!(
        backlog_after_stop(&config) > 0,
        "nothing was queued at the stop"
    );
    let dups = restart_and_check(&config, &mock, &sent).await;
    assert_eq!(
        dups, 0,
        "a clean stop must record every acknowledgement it got"
    );
}

#[cfg(feature = "failpoints")]
mod crash_points {
    use super::*;

    /// Aborts the forwarder at the third pass through `point`, then restarts it.
    async fn crash_at(point: &str) {
        let run = stop_at(point, "return").await;
        assert!(
            run.log.contains(&format!("crash point {point}")),
            "{}",
            run.log
        );
        run.check_after().await;
    }

    /// A forwarder that ended at a fail point, and what its clients learnt.
    struct Ended {
        _dir: tempfile::TempDir,
        config: std::path::PathBuf,
        mock: MockIntake,
        sent: Outcomes,
        log: String,
    }

    /// Starts a forwarder under load with `point` set to `action` at its third pass, waits for
    /// the process to end, and checks that it ended badly with a backlog queued.
    async fn stop_at(point: &str, action: &str) -> Ended {
        let mock = slow_intake(SLOW_MS).await;
        let dir = tempfile::tempdir().unwrap();
        let config = crash_config(dir.path(), &mock);
        let scenario = format!("{point}=2*off->{action}");
        let mut fwd = Forwarder::start_with_env(&config, &[("FAILPOINTS", &scenario)]);
        let load = Load::start(fwd.url(), 0, 2);
        let status = fwd.wait_exit();
        assert!(
            !status.success(),
            "{point}: the process should have ended with an error:\n{}",
            fwd.log()
        );
        let sent = load.stop().await;
        assert!(
            backlog_after_stop(&config) > 0,
            "{point}: nothing was queued when the process ended"
        );
        Ended {
            _dir: dir,
            config,
            mock,
            sent,
            log: fwd.log(),
        }
    }

    impl Ended {
        /// The queue reopens, everything acknowledged before the end arrives (and nothing
        /// else), and the queue still works.
        async fn check_after(&self) {
            let dups = restart_and_check(&self.config, &self.mock, &self.sent).await;
            assert!(
                dups <= IN_FLIGHT * BATCH,
                "{dups} duplicates after one crash"
            );
            let fwd = Forwarder::start(&self.config);
            let client = reqwest::Client::new();
            let more = send_events(&client, &fwd.url(), KEY, 99_000_000, 40, 20).await;
            assert_eq!(more.len(), 40);
            wait_delivered(&self.mock, &more).await;
            fwd.wait_drained().await;
        }
    }

    /// A bug that ends the queue writer thread (a panic) leaves a process that can store
    /// nothing: it must exit non-zero, so that systemd restarts it, and say why once.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_dead_writer_thread_ends_the_process() {
        let run = stop_at("queue-before-apply", "panic").await;
        assert_eq!(
            run.log.matches("the queue writer stopped").count(),
            1,
            "{}",
            run.log
        );
        run.check_after().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn crash_before_apply() {
        crash_at("queue-before-apply").await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn crash_after_apply_before_flush() {
        crash_at("queue-after-apply").await;
    }

    /// An append commit is applied key by key: its chunks on disk without the lane records
    /// that count them are counted in at the next open, delivered, and never overwritten.
    #[tokio::test(flavor = "multi_thread")]
    async fn crash_between_an_appends_chunks_and_its_lane_records() {
        let point = "queue-append-before-records";
        let run = stop_at(point, "return").await;
        assert!(
            run.log.contains(&format!("crash point {point}")),
            "{}",
            run.log
        );
        // The crash left the chunks on disk: the next open finds them past their count (it
        // logs that once the queue is open, before the listeners start).
        let mut fwd = Forwarder::start(&run.config);
        assert!(fwd.terminate().success(), "{}", fwd.log());
        assert!(
            fwd.log().contains("an append that a crash cut short"),
            "{}",
            fwd.log()
        );
        run.check_after().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn crash_after_flush_before_fsync() {
        crash_at("queue-after-flush").await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn crash_after_fsync_before_answer() {
        crash_at("queue-after-fsync").await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn crash_after_sealing_a_generation_before_creating_the_next() {
        crash_at("queue-rotate-after-summary").await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn crash_after_creating_a_generation_before_using_it() {
        crash_at("queue-rotate-after-create").await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn crash_before_deleting_a_delivered_generation() {
        crash_at("queue-delete-before-rename").await;
    }

    /// vectordotdev/vector#25525: a crash between deleting a finished file and recording it
    /// left Vector in a crash loop. Here the rename is the commit point; the next open removes
    /// what is left.
    #[tokio::test(flavor = "multi_thread")]
    async fn crash_after_renaming_a_delivered_generation_before_removing_it() {
        crash_at("queue-delete-after-rename").await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn crash_after_removing_a_delivered_generation() {
        crash_at("queue-delete-after-remove").await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn crash_after_intake_answer_before_check() {
        crash_at("delivery-after-answer").await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn crash_after_check_before_remove() {
        crash_at("delivery-after-ack-check").await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn crash_after_remove() {
        crash_at("delivery-after-remove").await;
    }
}
