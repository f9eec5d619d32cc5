//! Crashes and stops: `kill -9` at random instants, SIGTERM under load, and (with the
//! `failpoints` feature) an abort between every two steps of append -> flush -> answer and of
//! send -> check ids -> remove. After each, a restart must deliver every event that a client
//! saw acknowledged.

mod common;

use common::*;
use rand::Rng;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KEY: &str = "crash-test-intake-key-00001";

/// Clients that send until stopped (or until the forwarder is gone), recording what was acked.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String, first: usize, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|c| {
                let (stop, acked, url) = (stop.clone(), acked.clone(), url.clone());
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    let mut i = first + c * 1_000_000;
                    let mut failures = 0;
                    while !stop.load(Ordering::Relaxed) && failures < 50 {
                        let batch: Vec<String> = (i..i + 20).map(event).collect();
                        i += 20;
                        if post_jsons(&client, &url, KEY, &batch).await {
                            acked.lock().unwrap().extend(batch);
                            failures = 0;
                        } else {
                            failures += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                })
            })
            .collect();
        Load { stop, acked, tasks }
    }

    async fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }

    fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }
}

async fn wait_for_acks(load: &Load, n: usize) {
    let ok = wait_until_async(DEADLINE, || async { load.acked_count() >= n }).await;
    assert!(ok, "the forwarder acknowledged fewer than {n} events");
}

/// Restarts the forwarder on the same queue and checks that everything acked arrives.
async fn restart_and_check(config: &std::path::Path, mock: &MockIntake, acked: &[String]) -> usize {
    let fwd = Forwarder::start(config);
    wait_delivered(mock, acked).await;
    fwd.wait_drained().await;
    assert_all_delivered(mock, acked)
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_random_instants_loses_nothing_acknowledged() {
    // A slow intake keeps a backlog in the queue while the forwarder is killed.
    let mock = slow_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &mock.url(), "", "");
    let mut acked = Vec::new();
    let mut rng = rand::rng();
    for round in 0..6 {
        let mut fwd = Forwarder::start(&config);
        let load = Load::start(fwd.url(), round * 10_000_000, 4);
        wait_for_acks(&load, 100).await;
        // The instant of the kill is random on purpose; what is asserted does not depend on it.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        fwd.kill9();
        acked.extend(load.stop().await);
    }
    let dups = restart_and_check(&config, &mock, &acked).await;
    eprintln!(
        "{} events acknowledged, {dups} duplicates after 6 kills",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_exits_cleanly_and_loses_nothing() {
    let mock = slow_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &mock.url(), "", "");
    let mut fwd = Forwarder::start(&config);
    let load = Load::start(fwd.url(), 0, 4);
    wait_for_acks(&load, 500).await;
    let status = fwd.terminate();
    assert!(status.success(), "exit status {status:?}:\n{}", fwd.log());
    assert!(fwd.log().contains("SIGTERM received"));
    let acked = load.stop().await;
    let dups = restart_and_check(&config, &mock, &acked).await;
    eprintln!(
        "{} events acknowledged, {dups} duplicates after SIGTERM",
        acked.len()
    );
}

#[cfg(feature = "failpoints")]
mod crash_points {
    use super::*;

    /// Aborts the forwarder at the third pass through `point`, then restarts it.
    async fn crash_at(point: &str) {
        let mock = MockIntake::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &mock.url(), "", "");
        let scenario = format!("{point}=2*off->return");
        let mut fwd = Forwarder::start_with_env(&config, &[("FAILPOINTS", &scenario)]);
        let load = Load::start(fwd.url(), 0, 2);
        let status = fwd.wait_exit();
        assert!(
            !status.success(),
            "{point}: the process should have aborted"
        );
        assert!(
            fwd.log().contains(&format!("crash point {point}")),
            "{}",
            fwd.log()
        );
        let acked = load.stop().await;
        // The queue reopens, and everything acknowledged before the crash arrives.
        restart_and_check(&config, &mock, &acked).await;
        // And the queue still works.
        let fwd = Forwarder::start(&config);
        let more = send_events(&reqwest::Client::new(), &fwd.url(), KEY, 99_000_000, 40, 20).await;
        assert_eq!(more.len(), 40);
        wait_delivered(&mock, &more).await;
        fwd.wait_drained().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn crash_before_apply() {
        crash_at("queue-before-apply").await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn crash_after_apply_before_flush() {
        crash_at("queue-after-apply").await;
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
