//! `kill -9` of the real forwarder, again and again, while a writer appends numbered lines to
//! a log file and rotates it (rename, then a new file), with an intake that refuses everything
//! meanwhile: each restart goes on from the checkpoints stored with the events. Then a last
//! start with a working intake: every line written must arrive, and none twice (nothing was
//! delivered before, so no delivery retry can explain a duplicate).

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;

const KEY: &str = "file-crash-intake-key-0001";
/// Kills, each once this many more lines were made durable.
const KILLS: usize = 4;
const PER_KILL: u64 = 3000;
/// Lines per write, and lines per file before it is rotated.
const PER_WRITE: usize = 40;
const PER_FILE: usize = 4000;

fn line(i: usize) -> String {
    format!("file crash line {i:08} {}", "y".repeat(80))
}

fn number(raw: &str) -> Option<usize> {
    raw.strip_prefix("file crash line ")?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

fn config(dir: &Path, intake_url: &str) -> PathBuf {
    let source = format!(
        r#"
[[source]]
type = "file"
paths = ["{}/app.log"]
read_from = "beginning"
intake_key_env = "FILE_TEST_KEY"
scan_interval_ms = 50
poll_interval_ms = 10
rotate_wait_ms = 200
"#,
        dir.display()
    );
    write_config(dir, intake_url, "", &source)
}

fn start(config: &Path) -> Forwarder {
    Forwarder::start_with_env(config, &[("FILE_TEST_KEY", KEY)])
}

/// Appends numbered lines to `dir/app.log` until `stop`, renaming it to `app.log.N` every
/// `PER_FILE` lines; returns how many lines it wrote.
fn writer(dir: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let log = dir.join("app.log");
        let mut file = std::fs::File::create(&log).unwrap();
        let mut i = 0;
        let mut rotations = 0;
        while !stop.load(Ordering::Relaxed) {
            let mut text = String::new();
            for n in i..i + PER_WRITE {
                text.push_str(&line(n));
                text.push('\n');
            }
            file.write_all(text.as_bytes()).unwrap();
            i += PER_WRITE;
            if i % PER_FILE == 0 {
                rotations += 1;
                std::fs::rename(&log, dir.join(format!("app.log.{rotations}"))).unwrap();
                file = std::fs::File::create(&log).unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        i
    })
}

async fn accepted(fwd: &Forwarder) -> u64 {
    let status = fwd.status().await;
    status["file_sources"][0]["accepted_events"]
        .as_u64()
        .unwrap_or_else(|| panic!("no accepted_events in {status}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_while_tailing_and_rotating_loses_no_line_and_reads_none_twice() {
    let dir = tempfile::tempdir().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let refusing = refusing_intake().await;
    let cfg = config(dir.path(), &refusing.url());
    let writing = writer(dir.path().to_path_buf(), stop.clone());
    for kill in 0..KILLS {
        let mut fwd = start(&cfg);
        let ok = wait_until_async(DEADLINE, || async { accepted(&fwd).await >= PER_KILL }).await;
        assert!(ok, "kill {kill}: too few lines read\n{}", fwd.log());
        fwd.kill9();
        assert!(!fwd.log().contains(KEY), "the intake key was logged");
    }
    stop.store(true, Ordering::Relaxed);
    let written = writing.join().expect("writer");
    assert!(
        refusing.events().is_empty(),
        "the refusing intake took events"
    );
    drop(refusing);

    let mock = start_mock().await;
    let fwd = start(&config(dir.path(), &mock.url()));
    let arrived = wait_until_async(DEADLINE * 2, || async {
        let have: std::collections::HashSet<usize> = mock
            .events()
            .iter()
            .filter_map(|e| number(&e.raw))
            .collect();
        have.len() >= written
    })
    .await;
    let mut seen: HashMap<usize, usize> = HashMap::new();
    for e in mock.events() {
        let n = number(&e.raw).unwrap_or_else(|| panic!("not a line of ours: {:?}", e.raw));
        assert_eq!(e.raw, line(n), "line {n} garbled");
        assert_eq!(e.intake_key, KEY);
        *seen.entry(n).or_default() += 1;
    }
    if !arrived {
        let missing: Vec<usize> = (0..written).filter(|n| !seen.contains_key(n)).collect();
        panic!(
            "{} of {written} lines never arrived (first {:?})\n{}",
            missing.len(),
            &missing[..missing.len().min(10)],
            fwd.log()
        );
    }
    fwd.wait_drained().await;
    let mut seen: HashMap<usize, usize> = HashMap::new();
    for e in mock.events() {
        *seen.entry(number(&e.raw).unwrap()).or_default() += 1;
    }
    let twice: Vec<(&usize, &usize)> = seen.iter().filter(|(_, c)| **c > 1).take(10).collect();
    assert!(twice.is_empty(), "lines read twice: {twice:?}");
    assert_eq!(seen.len(), written, "lines never written arrived");
    eprintln!("{written} lines written over {KILLS} kills, each arrived once");
}
