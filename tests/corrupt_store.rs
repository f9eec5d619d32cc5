//! A damaged sled file (torn sector, bit rot: sled's own checksums fail, or sled panics) must
//! not stop the forwarder: the damaged generation is moved aside whole and counted, everything
//! else flows, and `salvage` puts back what can still be read. Through the real binary.
//!
//! The damage is deterministic: a fixed byte pattern over a fixed region of the file. A few
//! KiB at a random offset do not make sled fail reliably: sled's log is append-only, so much
//! of a database file holds superseded page versions, and damage there goes unnoticed; damage
//! that sled reads as a torn tail is dropped silently at open (a limit of sled, see
//! docs/reliability.md). Overwriting the first 64 KiB (the first segment, which the snapshot
//! made when the generation was created points into) and the whole second half of a
//! generation's `db` file makes sled fail every time, at open ("Read corrupted data") or with
//! a panic ("tried to serialize Uninitialized"), the two failures seen in the field. The same
//! damage is done to `meta/db`.

mod common;

use std::collections::HashSet;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const KEY: &str = "corrupt-store-intake-key-0001";

/// Overwrites `len` bytes of `file` from `offset` with a fixed pattern.
fn damage(file: &Path, offset: u64, len: u64) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .expect("open the file to damage");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let pattern: Vec<u8> = (0..len).map(|i| (i * 7 + 13) as u8).collect();
    f.write_all(&pattern).expect("damage");
    f.sync_all().expect("sync");
}

/// Overwrites the first 64 KiB and the second half of a generation's `db` file (see the
/// module's comment).
fn damage_generation(dir: &Path) {
    let db = dir.join("db");
    let size = std::fs::metadata(&db).expect("db file").len();
    let start = size / 2 / 4096 * 4096;
    damage(&db, 0, 64 * 1024);
    damage(&db, start, size - start);
}

fn generations(queue: &Path) -> Vec<PathBuf> {
    let mut gens: Vec<PathBuf> = std::fs::read_dir(queue)
        .expect("queue dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.starts_with("gen-") && !name.contains('.')
        })
        .collect();
    gens.sort();
    gens
}

/// A configuration with generations of `generation_bytes`, and a mock that answers 503 to
/// everything until told otherwise (so that the events stay queued).
async fn setup(generation_bytes: u64) -> (tempfile::TempDir, PathBuf, MockIntake) {
    let dir = tempfile::tempdir().unwrap();
    let mock = start_mock().await;
    hold(&mock);
    let config = write_config(dir.path(), &mock.url(), "", "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "generation_bytes = 131072",
        &format!("generation_bytes = {generation_bytes}"),
    );
    std::fs::write(&config, text).unwrap();
    (dir, config, mock)
}

fn hold(mock: &MockIntake) {
    mock.set_faults(FaultConfig {
        key_status: [(KEY.to_owned(), 503)].into_iter().collect(),
        ..FaultConfig::default()
    });
}

fn release(mock: &MockIntake) {
    mock.set_faults(FaultConfig::default());
}

/// Queues `n` events (first `first`) with delivery held, then stops the forwarder.
async fn queue_events(config: &Path, first: usize, n: usize) -> Vec<String> {
    let mut fwd = Forwarder::start(config);
    let client = reqwest::Client::new();
    let acked = send_events(&client, &fwd.url(), KEY, first, n, 1000).await;
    assert_eq!(acked.len(), n, "every event queued:\n{}", fwd.log());
    assert!(fwd.terminate().success());
    acked
}

fn status_offline(config: &Path) -> serde_json::Value {
    run_json_command("status", config).1
}

fn corrupt_list(status: &serde_json::Value) -> Vec<serde_json::Value> {
    status["queue"]["corrupt_generations"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

async fn metric(fwd: &Forwarder, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{}/metrics", fwd.admin))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// New events sent to a running forwarder reach the mock.
async fn new_events_flow(fwd: &Forwarder, mock: &MockIntake, first: usize) -> Vec<String> {
    let client = reqwest::Client::new();
    let acked = send_events(&client, &fwd.url(), KEY, first, 500, 100).await;
    assert_eq!(acked.len(), 500, "new events accepted:\n{}", fwd.log());
    wait_delivered_from(fwd, mock, &acked).await;
    acked
}

/// Runs `sekoia-forwarder salvage --config CONFIG ARGS...`, checks that it succeeded, and
/// returns what it printed.
fn salvage(config: &Path, args: &[&str]) -> String {
    let out = Command::new(binary())
        .args(["salvage", "--config"])
        .arg(config)
        .args(args)
        .output()
        .expect("salvage");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_active_generation_is_moved_aside_and_new_events_flow() {
    let (dir, config, mock) = setup(64 * 1024 * 1024).await;
    let queue = dir.path().join("queue");
    queue_events(&config, 0, 10_000).await;
    let gens = generations(&queue);
    assert_eq!(gens.len(), 1, "one generation, the active one: {gens:?}");
    damage_generation(&gens[0]);

    // `status` on the stopped forwarder opens the queue: it must not panic, and says what
    // was moved aside.
    let status = status_offline(&config);
    let corrupt = corrupt_list(&status);
    assert_eq!(corrupt.len(), 1, "{status}");
    assert_eq!(corrupt[0]["generation"], 1, "{status}");
    assert!(!gens[0].exists(), "the damaged generation was moved");
    assert!(Path::new(corrupt[0]["dir"].as_str().unwrap()).exists());

    let fwd = Forwarder::start(&config);
    release(&mock);
    new_events_flow(&fwd, &mock, 100_000).await;
    let status = fwd.status().await;
    assert_eq!(corrupt_list(&status).len(), 1, "{status}");
    assert_eq!(
        metric(&fwd, "sekoia_forwarder_queue_corrupt_generations").await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_sealed_generation_is_moved_aside_and_the_rest_is_delivered_then_salvaged() {
    let (dir, config, mock) = setup(1024 * 1024).await;
    let queue = dir.path().join("queue");
    let acked = queue_events(&config, 0, 12_000).await;
    let gens = generations(&queue);
    assert!(
        gens.len() >= 3,
        "sealed generations behind the damaged one: {gens:?}"
    );
    damage_generation(&gens[0]);

    let mut fwd = Forwarder::start(&config);
    release(&mock);
    // Everything of the intact generations is delivered; the damaged one is moved aside.
    fwd.wait_drained().await;
    let status = fwd.status().await;
    let corrupt = corrupt_list(&status);
    assert_eq!(corrupt.len(), 1, "{status}\n{}", fwd.log());
    let known = corrupt[0]["events"]
        .as_u64()
        .expect("counted from its summary");
    assert!(known > 0, "{status}");
    let sent: HashSet<&str> = acked.iter().map(|s| s.as_str()).collect();
    let got: HashSet<String> = mock.events().into_iter().map(|e| e.raw).collect();
    assert!(
        got.iter().all(|e| sent.contains(e.as_str())),
        "only what was sent"
    );
    assert_eq!(
        got.len() as u64 + known,
        acked.len() as u64,
        "every event of the intact generations delivered, the damaged one's counted"
    );
    assert!(fwd.log().contains("damaged queue generation moved aside"));
    assert_eq!(
        metric(&fwd, "sekoia_forwarder_queue_corrupt_events").await,
        Some(known as f64)
    );
    new_events_flow(&fwd, &mock, 100_000).await;
    assert!(fwd.terminate().success());

    // salvage: reads what it still can back into the queue, and says how much.
    let text = salvage(&config, &[]);
    let recovered = number_before(&text, " events").expect("recovered count");
    let lost = number_before(&text, " events could not").expect("lost count");
    assert_eq!(recovered + lost, known, "{text}");

    let before = mock.events().len();
    let fwd = Forwarder::start(&config);
    fwd.wait_drained().await;
    let got: HashSet<String> = mock.events().into_iter().map(|e| e.raw).collect();
    assert!(
        got.len() as u64 >= before as u64 + recovered,
        "the recovered events reached the intake ({recovered} recovered)"
    );
    let mut fwd = fwd;
    assert!(fwd.terminate().success());
    let status = status_offline(&config);
    assert_eq!(status["queue"]["events"], 0, "{status}");
    eprintln!("salvage said: {text}");
}

/// The first number in `text` after `recovered ` (for `what` = " events") or before `what`.
fn number_before(text: &str, what: &str) -> Option<u64> {
    let end = text.find(what)?;
    let digits: String = text[..end]
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.chars().rev().collect::<String>().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_meta_database_is_moved_aside_and_the_lane_map_rebuilt() {
    let (dir, config, mock) = setup(131072).await;
    let queue = dir.path().join("queue");
    let acked = queue_events(&config, 0, 3_000).await;
    damage_generation(&queue.join("meta"));

    let status = status_offline(&config);
    assert_eq!(status["queue"]["events"], 3_000, "{status}");
    assert!(queue.join("meta.corrupt").exists(), "{status}");
    assert_eq!(corrupt_list(&status).len(), 1, "{status}");

    let fwd = Forwarder::start(&config);
    release(&mock);
    wait_delivered_from(&fwd, &mock, &acked).await;
    new_events_flow(&fwd, &mock, 100_000).await;
    fwd.wait_drained().await;
}

/// `salvage` on a moved-aside generation that sled can still read: every chunk goes back
/// into the queue and reaches the intake. (The damage of the tests above leaves sled unable to
/// open the generation at all, so here an intact sealed generation is renamed as the forwarder
/// would have moved it aside, with its note, to check what salvage puts back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salvage_puts_what_it_reads_back_into_the_queue_and_it_is_delivered() {
    let (dir, config, mock) = setup(131072).await;
    let queue = dir.path().join("queue");
    let acked = queue_events(&config, 0, 3_000).await;
    let gens = generations(&queue);
    assert!(gens.len() >= 2, "{gens:?}");
    let aside = gens[0].with_extension("corrupt");
    std::fs::rename(&gens[0], &aside).unwrap();
    let note = serde_json::json!({"generation": 1, "events": null, "bytes": null,
        "disk_bytes": 0, "reason": "test", "moved_at_ms": 0});
    std::fs::write(aside.join("moved-aside.json"), note.to_string()).unwrap();
    let status = status_offline(&config);
    assert_eq!(corrupt_list(&status).len(), 1, "{status}");
    let in_the_rest = status["queue"]["events"].as_u64().unwrap();

    let text = salvage(&config, &["1"]);
    let recovered = number_before(&text, " events").expect("recovered count");
    assert_eq!(recovered + in_the_rest, 3_000, "{text}");
    assert!(text.contains("0 reads failed"), "{text}");
    assert!(queue
        .join(gens[0].file_name().unwrap())
        .with_extension("salvaged")
        .exists());
    let status = status_offline(&config);
    assert_eq!(status["queue"]["events"], 3_000, "{status}");
    assert_eq!(corrupt_list(&status).len(), 0, "{status}");

    let fwd = Forwarder::start(&config);
    release(&mock);
    wait_delivered_from(&fwd, &mock, &acked).await;
    let sent: HashSet<&str> = acked.iter().map(|s| s.as_str()).collect();
    assert!(mock.events().iter().all(|e| sent.contains(e.raw.as_str())));
}

/// The dead letters of a moved-aside meta database are put back by `salvage`. (Damage that
/// sled detects in a meta database this small also leaves it unreadable, so here an intact
/// meta database is moved aside as the forwarder would have, to check what salvage restores.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salvage_restores_the_dead_letters_of_a_moved_aside_meta_database() {
    let (dir, config, mock) = setup(131072).await;
    let queue = dir.path().join("queue");
    mock.set_faults(FaultConfig {
        reject_containing: Some("poison".into()),
        ..FaultConfig::default()
    });
    let fwd = Forwarder::start(&config);
    let client = reqwest::Client::new();
    let poison: Vec<String> = (0..5).map(|i| format!("poison-{i}")).collect();
    assert!(post_jsons(&client, &fwd.url(), KEY, &poison).await);
    fwd.wait_drained().await;
    let mut fwd = fwd;
    assert!(fwd.terminate().success());
    let (_, letters) = run_json_command("dead-letters", &config);
    assert_eq!(letters.as_array().map(Vec::len), Some(5), "{letters}");

    std::fs::rename(queue.join("meta"), queue.join("meta.corrupt")).unwrap();

    let text = salvage(&config, &[]);
    assert!(text.contains("recovered 5 dead letters"), "{text}");
    assert!(queue.join("meta.salvaged").exists());
    let (_, letters) = run_json_command("dead-letters", &config);
    let events: HashSet<&str> = letters
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["event"].as_str())
        .collect();
    assert_eq!(events, poison.iter().map(|s| s.as_str()).collect());
}
