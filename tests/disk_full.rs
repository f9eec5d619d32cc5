//! A full disk: the forwarder refuses new events with 503 (the senders keep them), never
//! acknowledges what it could not store, does not crash, and delivers everything it did
//! acknowledge once the intake is back.
//!
//! Needs root to mount a small tmpfs (CI runs as root); elsewhere it says so and returns.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

const KEY: &str = "disk-full-intake-key-000001";

struct Mount(std::path::PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> Option<Mount> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| Mount(dir.to_owned()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// An event of about 190 bytes that does not compress (its tail is pseudo-random hex): the
/// queue stores chunks lz4-compressed, and `event(i)` would take too little disk to fill it.
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

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_refuses_new_events_and_loses_none() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_mount) = Mount::tmpfs(&dir.path().join("small"), "160m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
        return;
    };
    let mock = MockIntake::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = mock.url();
    mock.shutdown().await;
    let small = dir.path().join("small");
    // max_bytes is far above the disk: the disk fills before the queue's own limit.
    let config = write_config(&small, &url, "", "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[queue]\n",
        "[queue]\nmax_bytes = 1073741824\nmin_free_bytes = 50331648\n",
    );
    std::fs::write(&config, text).unwrap();
    let fwd = Forwarder::start(&config);
    let client = reqwest::Client::new();
    let mut acked = Vec::new();
    let mut refused = 0;
    let mut i = 0;
    while refused < 20 && i < 2_000_000 {
        let batch: Vec<String> = (i..i + 500).map(incompressible_event).collect();
        i += 500;
        let answer = client
            .post(format!("{}/jsons", fwd.url()))
            .header("X-SEKOIAIO-INTAKE-KEY", KEY)
            .json(&batch)
            .send()
            .await
            .expect("the forwarder must keep answering when the disk is full");
        match answer.status().as_u16() {
            200 => acked.extend(batch),
            503 => {
                assert!(answer.headers().contains_key("retry-after"));
                refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(refused >= 20, "the disk never filled ({i} events sent)");
    assert!(!acked.is_empty());
    eprintln!(
        "{} events acknowledged before the disk was full",
        acked.len()
    );
    // The intake comes back: everything acknowledged arrives, and the queue drains.
    let mock = MockIntake::start(url.trim_start_matches("http://").parse().unwrap())
        .await
        .unwrap();
    wait_delivered_from(&fwd, &mock, &acked).await;
    fwd.wait_drained().await;
    assert_eq!(assert_all_delivered(&mock, &acked), 0);
    // And once space is free again, new events are accepted.
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
