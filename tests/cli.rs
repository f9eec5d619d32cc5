//! The command line: the built-in default, `check`, `status`, and the Python examples of the
//! intake documentation run unchanged against the local API.

mod common;

use common::*;
use std::process::Command;

#[test]
fn check_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[queue]\npath = \"q\"\n\n[intake]\nbatch_max_evnts = 3\n",
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("line 5"), "{err}");
    assert!(err.contains("batch_max_evnts"), "{err}");
    assert!(err.contains("expected"), "{err}");
}

#[test]
fn check_accepts_the_shipped_configurations() {
    for file in ["examples/quickstart.toml", "packaging/config.toml"] {
        let out = Command::new(binary())
            .args(["check", "--config", file])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{file}: {err}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
    }
}

#[test]
fn runs_out_of_the_box_on_the_built_in_default() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(binary())
        .arg("run")
        .current_dir(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let mut seen = String::new();
    for line in lines.map_while(Result::ok) {
        seen.push_str(&line);
        seen.push('\n');
        if seen.contains("http source listening") && seen.contains("delivering to the intake") {
            break;
        }
    }
    assert!(seen.contains("addr=127.0.0.1:10080"), "{seen}");
    assert!(seen.contains("queue opened"), "{seen}");
    assert!(seen.contains("https://intake.sekoia.io/jsons"), "{seen}");
    signal(child.id(), "TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let queue = dir.path().join("sekoia-forwarder-data");
    assert!(queue.join("meta").join("db").exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&queue).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the queue directory must be private");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reads_a_stopped_queue() {
    let dir = tempfile::tempdir().unwrap();
    // An intake that refuses connections: events stay queued.
    let config = write_config(dir.path(), "http://127.0.0.1:9", "", "");
    let mut fwd = Forwarder::start(&config);
    let key = "status-test-intake-key-0001";
    let acked = send_events(&reqwest::Client::new(), &fwd.url(), key, 0, 30, 10).await;
    assert_eq!(acked.len(), 30);
    assert!(fwd.terminate().success());
    let queue_dir = dir.path().join("queue");
    let before = entries(&queue_dir);
    let (text, report) = run_json_command("status", &config);
    assert_eq!(report["queue"]["events"], 30, "{report}");
    assert!(!text.contains(key), "status printed the intake key");
    let (_, letters) = run_json_command("dead-letters", &config);
    assert_eq!(letters, serde_json::json!([]));
    // The commands close the queue: no generation made ahead of time is left behind.
    assert_eq!(entries(&queue_dir), before);
}

/// The names in a directory, sorted.
fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The Python `requests` examples of intake-api.md, unchanged but for the URL.
#[tokio::test(flavor = "multi_thread")]
async fn intake_documentation_examples_work_unchanged() {
    let mock = MockIntake::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &mock.url(), "", "");
    let fwd = Forwarder::start(&config);
    let url = fwd.url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg("tests/python/test_intake_examples.py")
            .env("FORWARDER_URL", url)
            .output()
            .expect("python3")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    // Everything the examples sent reaches the intake.
    let ok = mock.wait_for(|events| events.len() >= 10, DEADLINE).await;
    assert!(ok, "got {} events", mock.events().len());
    fwd.wait_drained().await;
}
