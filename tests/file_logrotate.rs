//! The file source with the rotator every Linux host runs: logrotate itself (Debian's package,
//! run by the test with its own state file), in both of its modes, while a writer appends
//! numbered lines to the file it holds open, as a daemon does. Every line written must reach
//! the mock intake exactly once.
//!
//! - `create` (rename, then a new file): the writer keeps writing to the renamed file until it
//!   is told to reopen its log (what a `postrotate` script's signal does), some time after the
//!   rotation; the renamed file is read to its end and let go of, the new one read from its
//!   start; nothing is lost or read twice.
//! - `copytruncate`: the file is copied, then truncated in place; the source sees it shrink and
//!   reads it again from its start. What a writer adds between logrotate's copy and its
//!   truncation is in the copy only (logrotate's manual says so), so the writer pauses while
//!   logrotate runs, as an application that cannot reopen its log is told to.
//!
//! Under CI a missing logrotate fails the test (`.ci/run` installs it); elsewhere it is
//! skipped, saying so.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const KEY: &str = "file-logrotate-intake-key-01";
const ROTATIONS: usize = 4;
/// Lines written between two rotations (at least).
const PER_ROTATION: usize = 2000;

fn logrotate() -> Option<PathBuf> {
    let found = [
        "/usr/sbin/logrotate",
        "/sbin/logrotate",
        "/usr/bin/logrotate",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "logrotate is needed under CI (.ci/run installs it)"
        );
        eprintln!("SKIPPED: logrotate is not installed");
    }
    found
}

fn line(i: usize) -> String {
    format!("logrotate line {i:07} {}", "r".repeat(60))
}

fn number(raw: &str) -> Option<usize> {
    raw.strip_prefix("logrotate line ")?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// What the test tells the writer.
#[derive(Default)]
struct Control {
    /// Held by the test while the writer must not write (copytruncate).
    pause: Mutex<()>,
    /// Reopen the log (after a rotation by rename, as `postrotate` would ask).
    reopen: AtomicBool,
    stop: AtomicBool,
    /// Lines written so far.
    written: AtomicUsize,
}

/// Appends numbered lines, 20 a write, to `log`, which it holds open (`O_APPEND`) and reopens
/// only when told to; until told to stop.
fn writer(log: PathBuf, control: Arc<Control>) -> std::thread::JoinHandle<()> {
    let open = move |log: &Path| std::fs::OpenOptions::new().append(true).open(log).unwrap();
    std::thread::spawn(move || {
        let mut file = open(&log);
        while !control.stop.load(Ordering::Relaxed) {
            let writing = control.pause.lock().unwrap();
            if control.reopen.swap(false, Ordering::Relaxed) {
                file = open(&log);
            }
            let i = control.written.load(Ordering::Relaxed);
            let mut text = String::new();
            for n in i..i + 20 {
                text.push_str(&line(n));
                text.push('\n');
            }
            file.write_all(text.as_bytes()).unwrap();
            control.written.store(i + 20, Ordering::Relaxed);
            drop(writing);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    })
}

fn rotate(logrotate: &Path, dir: &Path, mode: &str) {
    let conf = dir.join("logrotate.conf");
    std::fs::write(
        &conf,
        format!(
            "{}/logs/app.log {{\n    rotate 10\n    {mode}\n    missingok\n}}\n",
            dir.display()
        ),
    )
    .unwrap();
    let out = Command::new(logrotate)
        .arg("--force")
        .arg("--state")
        .arg(dir.join("logrotate.state"))
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "logrotate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn rotated_while_written(mode: &str) {
    let Some(logrotate) = logrotate() else {
        return;
    };
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("logs")).unwrap();
    let log = dir.path().join("logs/app.log");
    std::fs::write(&log, "").unwrap();
    let source = format!(
        r#"
[[source]]
type = "file"
paths = ["{}"]
read_from = "beginning"
intake_key_env = "FILE_TEST_KEY"
scan_interval_ms = 50
poll_interval_ms = 10
rotate_wait_ms = 300
"#,
        log.display()
    );
    let config = write_config(dir.path(), &mock.url(), "", &source);
    let fwd = Forwarder::start_with_env(&config, &[("FILE_TEST_KEY", KEY)]);
    let control = Arc::new(Control::default());
    let w = writer(log.clone(), control.clone());
    let written = |n: usize| {
        let control = control.clone();
        async move {
            let wrote = wait_until_async(DEADLINE, || async {
                control.written.load(Ordering::Relaxed) >= n
            })
            .await;
            assert!(wrote, "the writer is stuck");
        }
    };
    for r in 1..=ROTATIONS {
        written(r * PER_ROTATION).await;
        if mode == "copytruncate" {
            // What the writer adds between the copy and the truncation is lost by
            // copytruncate itself; and so is what the source had not read yet.
            let paused = control.pause.lock().unwrap();
            let upto = control.written.load(Ordering::Relaxed);
            let caught_up = tokio::task::block_in_place(|| {
                wait_until(DEADLINE, || mock.events().len() >= upto)
            });
            assert!(caught_up, "the source did not catch up\n{}", fwd.log());
            rotate(&logrotate, dir.path(), mode);
            drop(paused);
        } else {
            rotate(&logrotate, dir.path(), mode);
            // The writer goes on in the renamed file for a while, then reopens.
            let now = control.written.load(Ordering::Relaxed);
            written(now + 200).await;
            control.reopen.store(true, Ordering::Relaxed);
        }
    }
    control.stop.store(true, Ordering::Relaxed);
    w.join().unwrap();
    let total = control.written.load(Ordering::Relaxed);
    let all = wait_until_async(DEADLINE, || async { mock.events().len() >= total }).await;
    let events = mock.events();
    assert!(
        all,
        "{} of {total} lines arrived\n{}",
        events.len(),
        fwd.log()
    );
    let mut seen = vec![0u32; total];
    for e in &events {
        let n = number(&e.raw).unwrap_or_else(|| panic!("not a line of the test: {}", e.raw));
        seen[n] += 1;
    }
    let missing: Vec<_> = (0..total).filter(|&i| seen[i] == 0).collect();
    let twice: Vec<_> = (0..total).filter(|&i| seen[i] > 1).collect();
    assert!(missing.is_empty(), "missing lines: {missing:?}");
    assert!(twice.is_empty(), "lines read twice: {twice:?}");
    // Every rotated file is let go of (rename), or the truncations were seen (copytruncate).
    let status = fwd.status().await["file_sources"][0].clone();
    match mode {
        "copytruncate" => assert_eq!(status["truncations"], ROTATIONS as u64, "{status}"),
        _ => {
            let released = wait_until_async(DEADLINE, || async {
                fwd.status().await["file_sources"][0]["files_released"].as_u64()
                    == Some(ROTATIONS as u64)
            })
            .await;
            assert!(released, "{}", fwd.status().await["file_sources"][0]);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn logrotate_create_loses_and_repeats_nothing() {
    rotated_while_written("create").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn logrotate_copytruncate_is_followed() {
    rotated_while_written("copytruncate").await;
}

/// Polls `f` until it holds or `deadline` passes (blocking: the test holds a lock meanwhile).
fn wait_until(deadline: Duration, f: impl Fn() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}
