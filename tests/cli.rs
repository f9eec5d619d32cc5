//! The command line: the built-in default, `check`, `status`, the admin probes (`/health` is
//! liveness, `/ready` readiness), and the Python examples of the intake documentation run
//! unchanged against the local API.

mod common;

use common::*;
use std::process::Command;

const KEY: &str = "cli-test-intake-key-000001";

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
    for file in [
        "examples/quickstart.toml",
        "examples/syslog.toml",
        "examples/file.toml",
        "examples/stdin.toml",
        "packaging/config.toml",
    ] {
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
    let ready_file = dir.path().join("ready.json");
    // The built-in default listens on fixed ports (10080, 10081): in a network namespace of
    // its own, so that nothing else on the machine can hold them or be disturbed.
    let mut child = Command::new("unshare")
        .args(["--net", "--map-root-user", "sh", "-c"])
        .arg("ip link set lo up && exec \"$0\" run --ready-file \"$1\"")
        .arg(binary())
        .arg(&ready_file)
        .current_dir(dir.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let ready = wait_ready_file(&ready_file, &mut child);
    signal(child.id(), "TERM");
    let status = child.wait().unwrap();
    let log = log.join().unwrap();
    let ready = ready.unwrap_or_else(|| panic!("not ready:\n{log}"));
    assert_eq!(
        ready.admin,
        Some("127.0.0.1:10081".parse().unwrap()),
        "{ready:?}"
    );
    assert_eq!(ready.sources.len(), 1, "{ready:?}");
    assert_eq!(ready.sources[0].kind, "http");
    assert_eq!(ready.sources[0].listen, "127.0.0.1:10080".parse().unwrap());
    assert!(status.success(), "{status:?}\n{log}");
    assert!(!ready_file.exists(), "the ready file outlived the stop");
    assert!(log.contains("queue opened"), "{log}");
    assert!(log.contains("https://intake.sekoia.io/jsons"), "{log}");
    let queue = dir.path().join("sekoia-forwarder-data");
    assert!(queue.join("meta").join("db").exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&queue).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the queue directory must be private");
}

/// Under systemd (`Type=notify`): `READY=1` once up, `STOPPING=1` when the stop begins, on the
/// socket systemd names in `NOTIFY_SOCKET` (here one of the test's own).
#[tokio::test(flavor = "multi_thread")]
async fn systemd_is_told_ready_then_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    let mock = start_mock().await;
    let config = write_config(dir.path(), &mock.url(), "", "");
    let notify = socket_path.to_str().unwrap();
    let mut fwd = Forwarder::start_with_env(&config, &[("NOTIFY_SOCKET", notify)]);
    let mut message = [0u8; 256];
    let read = |message: &mut [u8]| {
        let n = socket.recv(message).expect("no notification");
        String::from_utf8_lossy(&message[..n]).into_owned()
    };
    // The ready file was written before systemd was told: the message is there already.
    assert_eq!(read(&mut message), "READY=1\n");
    assert!(fwd.terminate().success(), "{}", fwd.log());
    assert_eq!(read(&mut message), "STOPPING=1\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reads_a_stopped_queue() {
    let dir = tempfile::tempdir().unwrap();
    // An intake that refuses every request: events stay queued.
    let mock = refusing_intake().await;
    let config = write_config(dir.path(), &mock.url(), "", "");
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

/// GETs `path` from the forwarder's admin listener: the status and the JSON body.
async fn admin_get(fwd: &Forwarder, path: &str) -> (u16, serde_json::Value) {
    let answer = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap()
        .get(format!("http://{}{path}", fwd.admin))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", fwd.log()));
    let code = answer.status().as_u16();
    (code, answer.json().await.unwrap_or_default())
}

/// A full queue waiting out an intake outage is not broken: `/health` (liveness) stays 200,
/// so that a liveness probe does not restart it; `/ready` says events are refused now.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_is_alive_but_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let mock = refusing_intake().await;
    let config = write_config(dir.path(), &mock.url(), "", "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[queue]\n", "[queue]\nmax_bytes = 16777216\n");
    std::fs::write(&config, text).unwrap();
    let fwd = Forwarder::start(&config);
    assert_eq!(admin_get(&fwd, "/health").await.0, 200);
    let (code, body) = admin_get(&fwd, "/ready").await;
    assert_eq!((code, body["status"].as_str()), (200, Some("ok")), "{body}");
    // Fill the queue: 1,000 events a request until the source refuses.
    let client = reqwest::Client::new();
    let mut acked = Vec::new();
    let mut first = 0;
    loop {
        let batch: Vec<String> = (first..first + 1000).map(event).collect();
        first += 1000;
        if !post_jsons(&client, &fwd.url(), KEY, &batch).await {
            break;
        }
        acked.extend(batch);
        assert!(first < 1_000_000, "the queue never filled:\n{}", fwd.log());
    }
    let (code, body) = admin_get(&fwd, "/health").await;
    assert_eq!(code, 200, "liveness must not fail on a full queue: {body}");
    let (code, body) = admin_get(&fwd, "/ready").await;
    assert_eq!(
        (code, body["status"].as_str()),
        (503, Some("queue_full")),
        "{body}"
    );
    // The intake is back: the queue drains and the forwarder is ready again.
    mock.set_faults(FaultConfig::default());
    wait_delivered_from(&fwd, &mock, &acked).await;
    let ready = wait_until_async(DEADLINE, || async {
        admin_get(&fwd, "/ready").await.0 == 200
    })
    .await;
    assert!(ready, "never ready again:\n{}", fwd.log());
}

/// While it stops, the forwarder is alive (it is finishing requests on the wire) but not
/// ready.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopping_forwarder_is_alive_but_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let mock = start_mock().await;
    // Slow enough that the stop waits for the request on the wire.
    mock.set_faults(FaultConfig {
        delay_ms: 3000,
        ..FaultConfig::default()
    });
    let config = write_config(dir.path(), &mock.url(), "", "");
    let mut fwd = Forwarder::start(&config);
    let acked = send_events(&reqwest::Client::new(), &fwd.url(), KEY, 0, 10, 10).await;
    assert_eq!(acked.len(), 10);
    let on_the_wire = wait_until_async(DEADLINE, || async {
        fwd.status().await["delivery"]["in_flight"].as_u64() > Some(0)
    })
    .await;
    assert!(on_the_wire, "{}", fwd.log());
    signal(fwd.pid(), "TERM");
    let stopping = wait_until_async(DEADLINE, || async {
        admin_get(&fwd, "/ready").await.1["status"].as_str() == Some("stopping")
    })
    .await;
    assert!(stopping, "/ready never said stopping:\n{}", fwd.log());
    let (code, body) = admin_get(&fwd, "/ready").await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(admin_get(&fwd, "/health").await.0, 200);
    assert!(fwd.wait_exit().success(), "{}", fwd.log());
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
    let mock = start_mock().await;
    let (fwd, _dir) = forwarder_for(&mock, "", "");
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
