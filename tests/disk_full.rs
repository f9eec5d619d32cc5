//! A full disk: the forwarder refuses new events with 503 (the senders keep them), never
//! acknowledges what it could not store, does not crash, and delivers everything it did
//! acknowledge, and nothing else, once the intake is back.
//!
//! Two ways to fill it: the forwarder's own appends, which stop at the reserve
//! (`min_free_bytes`), and another process that takes the last byte, reserve included, so that
//! sled's own out-of-space path runs (appends refused, removals of delivered events failing).
//!
//! Needs root to mount a small tmpfs (CI runs as root). Without it the tests fail, unless
//! `SEKOIA_TEST_SKIP_DISK_FULL=1` says to skip them (and they say so).

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

const KEY: &str = "disk-full-intake-key-000001";

const SKIP_VAR: &str = "SEKOIA_TEST_SKIP_DISK_FULL";

struct Mount(std::path::PathBuf);

impl Mount {
    /// A tmpfs of `size` at `dir`; `None` only when the run opted out of these tests.
    fn tmpfs(dir: &Path, size: &str) -> Option<Mount> {
        if std::env::var(SKIP_VAR).as_deref() == Ok("1") {
            eprintln!("SKIPPED: {SKIP_VAR}=1");
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "cannot mount a tmpfs at {} (root is needed); set {SKIP_VAR}=1 to skip this test",
            dir.display()
        );
        Some(Mount(dir.to_owned()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// An event of about 190 bytes that does not compress much (its tail is pseudo-random hex),
/// stored plain (`chunk_compression = "none"`): `event(i)` would take too little disk to fill
/// it.
fn incompressible_event(i: usize) -> String {
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let tail: String = (0..180)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b"0123456789abcdef"[(x >> 60) as usize])
        })
        .collect();
    format!("event-{i:08} {tail}")
}

/// A configuration on `small` with the queue's own limit far above the disk, so that the disk
/// fills first, the given reserve and generation size.
fn config_on(
    small: &Path,
    url: &str,
    min_free_bytes: u64,
    generation_bytes: u64,
) -> std::path::PathBuf {
    let config = write_config(small, url, "", "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "generation_bytes = 131072\n",
        &format!(
            "generation_bytes = {generation_bytes}\nmax_bytes = 1073741824\n\
             min_free_bytes = {min_free_bytes}\nchunk_compression = \"none\"\n"
        ),
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// What the senders learnt.
#[derive(Default)]
struct Sends {
    acked: Vec<String>,
    unknown: Vec<String>,
    refused: usize,
}

impl Sends {
    /// Sends requests of 500 incompressible events from `*next` on until `refusals` of them
    /// were refused (or `limit` events were sent).
    async fn until_refused(&mut self, fwd: &Forwarder, next: &mut usize, refusals: usize) {
        let client = reqwest::Client::new();
        let mut refused = 0;
        let limit = *next + 2_000_000;
        while refused < refusals && *next < limit {
            let batch: Vec<String> = (*next..*next + 500).map(incompressible_event).collect();
            *next += 500;
            match post_jsons_outcome(&client, &fwd.url(), KEY, &batch).await {
                Sent::Acked => self.acked.extend(batch),
                Sent::Unknown => self.unknown.extend(batch),
                Sent::Refused => refused += 1,
            }
        }
        self.refused += refused;
        assert!(
            refused >= refusals,
            "the disk never filled ({next} events sent)"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_refuses_new_events_and_loses_none() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    let Some(_mount) = Mount::tmpfs(&small, "160m") else {
        return;
    };
    let mock = refusing_intake().await;
    let config = config_on(&small, &mock.url(), 50331648, 131072);
    let fwd = Forwarder::start(&config);
    let mut sends = Sends::default();
    let mut next = 0;
    sends.until_refused(&fwd, &mut next, 20).await;
    assert!(!sends.acked.is_empty());
    eprintln!(
        "{} events acknowledged before the disk was full",
        sends.acked.len()
    );
    // The intake comes back: everything acknowledged arrives, and the queue drains.
    mock.set_faults(FaultConfig::default());
    wait_delivered_from(&fwd, &mock, &sends.acked).await;
    fwd.wait_drained().await;
    assert_eq!(assert_received_only(&mock, &sends.acked, &sends.unknown), 0);
    // And once space is free again, new events are accepted.
    let client = reqwest::Client::new();
    let ok = wait_until_async(DEADLINE, || async {
        post_jsons(&client, &fwd.url(), KEY, &[event(99_999_999)]).await
    })
    .await;
    assert!(
        ok,
        "the forwarder never accepted events again:\n{}",
        fwd.log()
    );
}

/// Fills the file system holding `dir` to its last byte with a file of its own, as another
/// process would; returns the file.
fn fill_to_the_last_byte(dir: &Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("hog");
    let mut file = std::fs::File::create(&path).unwrap();
    for block in [1 << 20, 4096, 1] {
        let bytes = vec![0xA5u8; block];
        while file.write_all(&bytes).is_ok() {}
    }
    let st = rustix::fs::statvfs(dir).unwrap();
    assert_eq!(st.f_bavail, 0, "the file system is not full");
    path
}

/// Large events the intake refuses for good (400): dead letters, which the writer stores in the
/// meta database when the intake answers, whatever the free space.
fn poison_event(i: usize) -> String {
    let mut text = format!("poison-{i:04} ");
    while text.len() < 200_000 {
        text.push(' ');
        text.push_str(&incompressible_event(i * 1000 + text.len()));
    }
    text
}

/// The reserve at its minimum, and another process that takes the last byte: appends must be
/// refused, sled's own out-of-space path runs when the intake's answers are recorded (dead
/// letters to store), and once space is back everything acknowledged arrives.
#[tokio::test(flavor = "multi_thread")]
async fn a_disk_filled_by_another_process_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    let Some(_mount) = Mount::tmpfs(&small, "80m") else {
        return;
    };
    let mock = refusing_intake().await;
    // The smallest reserve the configuration allows, and one generation for everything: the
    // removals of delivered events are then writes to it (a delivered generation is deleted
    // whole, which needs no space).
    let config = config_on(&small, &mock.url(), 33554432, 1 << 30);
    let mut fwd = Forwarder::start(&config);
    let client = reqwest::Client::new();
    const POISON: usize = 20;
    for i in 0..POISON {
        assert!(post_jsons(&client, &fwd.url(), KEY, &[poison_event(i)]).await);
    }
    let mut sends = Sends::default();
    let mut next = 0;
    sends.until_refused(&fwd, &mut next, 5).await;
    assert!(!sends.acked.is_empty());
    // Another process takes every byte left, the reserve included.
    let hog = fill_to_the_last_byte(&small);
    sends.until_refused(&fwd, &mut next, 10).await;
    // The intake comes back while the disk is full and refuses the large events for good:
    // storing them as dead letters needs space that is not there.
    mock.set_faults(FaultConfig {
        reject_containing: Some("poison-".to_owned()),
        ..FaultConfig::default()
    });
    let failed = wait_until_async(DEADLINE, || async {
        fwd.log().contains("No space left on device")
    })
    .await;
    assert!(failed, "no write failed on the full disk:\n{}", fwd.log());
    // Space is given back.
    std::fs::remove_file(&hog).unwrap();
    // sled keeps an I/O error once it has hit one: a forwarder can recover, or end itself
    // (non-zero) for its supervisor to restart it, as systemd would and as done here.
    let mut exited = false;
    let recovered = wait_until_async(DEADLINE, || {
        exited = exited || !fwd.alive();
        let done = !exited && {
            let have: std::collections::HashSet<String> =
                mock.events().into_iter().map(|e| e.raw).collect();
            sends.acked.iter().all(|e| have.contains(e))
        };
        async move { exited || done }
    })
    .await;
    if exited {
        let log = fwd.log();
        assert!(log.contains("the queue writer stopped"), "{log}");
        eprintln!("the forwarder ended itself after the failed write; restarting it");
        fwd = Forwarder::start(&config);
    } else {
        assert!(
            recovered,
            "the forwarder neither recovered nor ended itself after sled failed a write \
             (a full disk): every later commit fails:\n{}",
            fwd.log()
        );
    }
    // Everything acknowledged arrives, and nothing else.
    wait_delivered_from(&fwd, &mock, &sends.acked).await;
    fwd.wait_drained().await;
    let dups = assert_received_only(&mock, &sends.acked, &sends.unknown);
    let letters: serde_json::Value = reqwest::get(format!("http://{}/dead-letters", fwd.admin))
        .await
        .expect("dead letters")
        .json()
        .await
        .expect("dead letters json");
    let letters = letters.as_array().expect("a list").len();
    assert_eq!(
        letters, POISON,
        "every refused event is kept as a dead letter"
    );
    eprintln!(
        "{} events acknowledged, {} requests refused, {dups} duplicates",
        sends.acked.len(),
        sends.refused
    );
    assert!(fwd.terminate().success(), "{}", fwd.log());
}
