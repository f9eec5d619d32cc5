//! The file source through the real binary: files written by a real writer (this test, as an
//! application would: appends of whole lines), rotated by rename and by copytruncate, lines
//! that are long, not UTF-8 or span several lines, files that come and go; every line must
//! reach the mock intake once, in order per file.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use common::*;

const KEY: &str = "file-source-intake-key-0001";

/// A configuration with one file source on `pattern` (plus `extra` keys) and the queue under
/// `dir`.
fn config(dir: &Path, intake_url: &str, pattern: &str, extra: &str) -> PathBuf {
    let source = format!(
        r#"
[[source]]
type = "file"
paths = ["{pattern}"]
intake_key_env = "FILE_TEST_KEY"
scan_interval_ms = 100
poll_interval_ms = 20
rotate_wait_ms = 300
{extra}
"#
    );
    write_config(dir, intake_url, "", &source)
}

fn start(config: &Path) -> Forwarder {
    Forwarder::start_with_env(config, &[("FILE_TEST_KEY", KEY)])
}

fn append(path: &Path, lines: &[String]) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let mut text = String::new();
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    f.write_all(text.as_bytes()).unwrap();
}

fn lines(tag: &str, from: usize, n: usize) -> Vec<String> {
    (from..from + n)
        .map(|i| format!("{tag} line {i:06}"))
        .collect()
}

/// Waits until the mock received exactly `want` (in this order, as a subsequence per tag is
/// checked by the caller), and no more for a moment.
async fn wait_events(fwd: &Forwarder, mock: &MockIntake, n: usize) -> Vec<String> {
    let ok = wait_until_async(DEADLINE, || async { mock.events().len() >= n }).await;
    let got: Vec<String> = mock.events().into_iter().map(|e| e.raw).collect();
    assert!(
        ok,
        "{} of {n} events arrived: {:?}\n{}",
        got.len(),
        got.last(),
        fwd.log()
    );
    got
}

async fn file_stats(fwd: &Forwarder) -> serde_json::Value {
    fwd.status().await["file_sources"][0].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn lines_of_existing_and_new_files_arrive_once_in_order() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    append(&logs.join("a.log"), &lines("a", 0, 100));
    append(&logs.join("skip.txt"), &lines("skip", 0, 5));
    let pattern = format!("{}/*.log", logs.display());
    let cfg = config(
        dir.path(),
        &mock.url(),
        &pattern,
        r#"read_from = "beginning""#,
    );
    let fwd = start(&cfg);
    append(&logs.join("a.log"), &lines("a", 100, 100));
    // A file that appears later is read from its start.
    append(&logs.join("b.log"), &lines("b", 0, 50));
    let got = wait_events(&fwd, &mock, 250).await;
    let a: Vec<&String> = got.iter().filter(|l| l.starts_with("a ")).collect();
    let b: Vec<&String> = got.iter().filter(|l| l.starts_with("b ")).collect();
    assert_eq!(a, lines("a", 0, 200).iter().collect::<Vec<_>>());
    assert_eq!(b, lines("b", 0, 50).iter().collect::<Vec<_>>());
    assert_eq!(got.len(), 250, "nothing else (skip.txt is not matched)");
    assert!(mock.events().iter().all(|e| e.intake_key == KEY));
    let stats = file_stats(&fwd).await;
    assert_eq!(stats["accepted_events"], 250, "{stats}");
    assert_eq!(stats["files_opened"], 2, "{stats}");
    assert!(!fwd.log().contains(KEY), "the intake key was logged");
    // `status` (text) has a line for the source, from what the running forwarder reports.
    let report: sekoia_forwarder::admin::StatusReport =
        serde_json::from_value(fwd.status().await).unwrap();
    let text = sekoia_forwarder::admin::status_text(&report);
    assert!(
        text.lines().any(|l| l.starts_with("source       file ")
            && l.contains(&pattern)
            && l.contains(": 250 events, 2 files read")),
        "{text}"
    );
    assert!(text.contains("source       http "), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn read_from_end_skips_the_past_once_and_a_restart_loses_nothing() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, &lines("old", 0, 20));
    let pattern = log.display().to_string();
    let cfg = config(dir.path(), &mock.url(), &pattern, "");
    let mut fwd = start(&cfg);
    // Once the file has its checkpoint (at its end), new lines are read.
    let ok = wait_until_async(DEADLINE, || async {
        file_stats(&fwd).await["files_opened"] == 1
    })
    .await;
    assert!(ok, "{}", fwd.log());
    append(&log, &lines("new", 0, 10));
    let got = wait_events(&fwd, &mock, 10).await;
    assert_eq!(got, lines("new", 0, 10));
    fwd.wait_drained().await;
    assert_eq!(fwd.terminate().code(), Some(0), "{}", fwd.log());
    // Written while the forwarder is stopped: read at the next start (the first start is
    // the only one that skips what files hold).
    append(&log, &lines("while-stopped", 0, 10));
    let fwd = start(&cfg);
    append(&log, &lines("after", 0, 5));
    let got = wait_events(&fwd, &mock, 25).await;
    let mut want = lines("new", 0, 10);
    want.extend(lines("while-stopped", 0, 10));
    want.extend(lines("after", 0, 5));
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread")]
async fn rename_rotation_reads_the_old_file_to_its_end_then_lets_it_go() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, &[]);
    let cfg = config(
        dir.path(),
        &mock.url(),
        &log.display().to_string(),
        r#"read_from = "beginning""#,
    );
    let fwd = start(&cfg);
    // As logrotate's default (create) and an application that reopens on a signal: the old
    // file is renamed, the writer still writes a little to it, then to a new file.
    let mut old = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    for i in 0..300 {
        writeln!(old, "r line {i:06}").unwrap();
    }
    std::fs::rename(&log, dir.path().join("app.log.1")).unwrap();
    for i in 300..400 {
        writeln!(old, "r line {i:06}").unwrap();
    }
    drop(old);
    append(&log, &lines("r", 400, 100));
    let got = wait_events(&fwd, &mock, 500).await;
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, lines("r", 0, 500), "every line once");
    let ok = wait_until_async(DEADLINE, || async {
        let s = file_stats(&fwd).await;
        s["files_released"] == 1 && s["open_files"] == 1
    })
    .await;
    assert!(ok, "{}\n{}", file_stats(&fwd).await, fwd.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn copytruncate_is_read_again_from_the_start() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, &lines("before", 0, 50));
    let cfg = config(
        dir.path(),
        &mock.url(),
        &log.display().to_string(),
        r#"read_from = "beginning""#,
    );
    let fwd = start(&cfg);
    wait_events(&fwd, &mock, 50).await;
    // What logrotate's copytruncate does: copy, then truncate in place.
    std::fs::copy(&log, dir.path().join("app.log.1")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&log, &lines("after", 0, 5));
    let got = wait_events(&fwd, &mock, 55).await;
    assert_eq!(&got[50..], lines("after", 0, 5));
    assert_eq!(file_stats(&fwd).await["truncations"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn multiline_events_long_lines_and_invalid_utf8() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let cfg = config(
        dir.path(),
        &mock.url(),
        &log.display().to_string(),
        r#"read_from = "beginning"
max_event_bytes = 1000
multiline_start = '^\d{4}-\d\d-\d\d '
multiline_timeout_ms = 200"#,
    );
    let mut f = std::fs::File::create(&log).unwrap();
    f.write_all(b"2024-01-01 first\n  at a()\n  at b()\n2024-01-01 second\n")
        .unwrap();
    f.write_all(b"2024-01-01 bad \xff\xfe bytes\n").unwrap();
    f.write_all(format!("2024-01-01 {}\n", "L".repeat(3000)).as_bytes())
        .unwrap();
    // The last event has no line after it: the timeout sends it.
    f.write_all(b"2024-01-01 last\n  trailing\n").unwrap();
    drop(f);
    let fwd = start(&cfg);
    let got = wait_events(&fwd, &mock, 5).await;
    assert_eq!(got[0], "2024-01-01 first\n  at a()\n  at b()");
    assert_eq!(got[1], "2024-01-01 second");
    assert_eq!(got[2], "2024-01-01 bad \u{fffd}\u{fffd} bytes");
    assert!(
        got[3].starts_with("2024-01-01 LLLL") && got[3].len() <= 1000,
        "{}",
        got[3].len()
    );
    assert!(
        got[3].ends_with("[truncated by sekoia-forwarder: 3011 bytes]"),
        "{}",
        &got[3][900..]
    );
    assert_eq!(got[4], "2024-01-01 last\n  trailing");
    let stats = file_stats(&fwd).await;
    assert_eq!(stats["invalid_utf8_events"], 1, "{stats}");
    assert_eq!(stats["truncated_events"], 1, "{stats}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_rotated_while_stopped_is_read_to_its_end_from_its_checkpoint() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    append(&log, &lines("one", 0, 10));
    let cfg = config(
        dir.path(),
        &mock.url(),
        &log.display().to_string(),
        r#"read_from = "beginning""#,
    );
    let mut fwd = start(&cfg);
    wait_events(&fwd, &mock, 10).await;
    fwd.wait_drained().await;
    assert_eq!(fwd.terminate().code(), Some(0), "{}", fwd.log());
    // While stopped: more lines, then rotation (the old file is no longer matched), and a
    // new file; and a file read before that is deleted.
    append(&log, &lines("one", 10, 10));
    std::fs::rename(&log, dir.path().join("app.log.1")).unwrap();
    append(&log, &lines("two", 0, 5));
    let fwd = start(&cfg);
    let got = wait_events(&fwd, &mock, 25).await;
    let one: Vec<&String> = got.iter().filter(|l| l.starts_with("one ")).collect();
    assert_eq!(one, lines("one", 0, 20).iter().collect::<Vec<_>>());
    let two: Vec<&String> = got.iter().filter(|l| l.starts_with("two ")).collect();
    assert_eq!(two, lines("two", 0, 5).iter().collect::<Vec<_>>());
    assert_eq!(got.len(), 25);
    let ok = wait_until_async(DEADLINE, || async {
        file_stats(&fwd).await["files_released"] == 1
    })
    .await;
    assert!(ok, "the rotated file is let go of\n{}", fwd.log());
}
