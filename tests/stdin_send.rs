//! The stdin source and the `send` command through the real binary: lines piped into its
//! standard input or given as files, long lines, invalid UTF-8, an intake that is down or
//! refuses events; every line must reach the mock intake once, and `send`'s exit code and
//! words must say what happened.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use common::*;

const KEY: &str = "stdin-send-intake-key-0001";

fn lines(tag: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{tag} line {i:06}")).collect()
}

fn bytes_of(lines: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l.as_bytes());
        out.push(b'\n');
    }
    out
}

/// `got` holds each of `want` exactly once, and nothing else (batches of one lane may be
/// acknowledged out of order).
fn assert_once(got: &[String], want: &[String]) {
    let mut got = got.to_vec();
    let mut want = want.to_vec();
    got.sort();
    want.sort();
    assert_eq!(got.len(), want.len(), "events received vs sent");
    assert!(got == want, "the intake did not receive each line once");
}

fn raws(mock: &MockIntake) -> Vec<String> {
    mock.events().into_iter().map(|e| e.raw).collect()
}

/// What a `send` run printed, and how it ended.
struct Sent {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `sekoia-forwarder send ARGS` with the intake key in `SEND_KEY`, `input` on its
/// standard input, and `tmp` as its temporary directory; stdout and stderr are pipes (not a
/// terminal). Fails the test if it runs past the deadline.
fn send(args: &[&str], input: &[u8], tmp: &Path) -> Sent {
    send_with(args, Some(input), tmp)
}

/// [`send`]; with `None` the standard input stays open (and empty) until `send` ends.
fn send_with(args: &[&str], input: Option<&[u8]>, tmp: &Path) -> Sent {
    let mut child = Command::new(binary())
        .arg("send")
        .args(["--intake-key-env", "SEND_KEY"])
        .args(args)
        .env("SEND_KEY", KEY)
        .env("TMPDIR", tmp)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn send");
    let mut stdin = child.stdin.take().expect("stdin");
    let held = input.is_none();
    let input = input.unwrap_or_default().to_vec();
    // A pipe that `send` does not read (files given) must not block the test.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
        held.then_some(stdin)
    });
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let end = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("send did not end: {}", err.join().unwrap_or_default());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let _ = writer.join();
    let sent = Sent {
        code: status.code(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    };
    assert!(!sent.stderr.contains(KEY), "the intake key was printed");
    assert!(!sent.stdout.contains(KEY), "the intake key was printed");
    sent
}

async fn send_async(args: Vec<String>, input: Vec<u8>, tmp: PathBuf) -> Sent {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        send(&args, &input, &tmp)
    })
    .await
    .expect("send thread")
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn send_delivers_a_file_once_quietly_and_removes_its_private_queue() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let mut want = lines("file", 3000);
    let mut input = bytes_of(&want);
    // Not UTF-8: replaced, counted, sent.
    input.extend_from_slice(b"bad \xff\xfe end\n");
    want.push("bad \u{FFFD}\u{FFFD} end".into());
    // Over --max-event-bytes: truncated, sent once.
    let long = "L".repeat(2000);
    input.extend_from_slice(long.as_bytes());
    // The last line without a newline is an event too.
    input.extend_from_slice(b"\nlast line");
    let file = dir.path().join("backfill.log");
    std::fs::write(&file, &input).unwrap();
    let sent = send_async(
        vec![
            "--intake-url".into(),
            mock.url(),
            "--max-event-bytes".into(),
            "1000".into(),
            file.display().to_string(),
        ],
        Vec::new(),
        tmp.clone(),
    )
    .await;
    assert_eq!(sent.code, Some(0), "{}", sent.stderr);
    // Not a terminal: no progress bar, and nothing to say on success.
    assert!(sent.stdout.is_empty(), "{}", sent.stdout);
    assert!(sent.stderr.trim().is_empty(), "{}", sent.stderr);
    let got = raws(&mock);
    let truncated: Vec<&String> = got.iter().filter(|e| e.starts_with("LLL")).collect();
    assert_eq!(truncated.len(), 1);
    assert!(truncated[0].len() <= 1000, "{}", truncated[0].len());
    let rest: Vec<String> = got
        .iter()
        .filter(|e| !e.starts_with("LLL"))
        .cloned()
        .collect();
    want.push("last line".into());
    assert_once(&rest, &want);
    assert!(mock.events().iter().all(|e| e.intake_key == KEY));
    assert!(
        entries(&tmp).is_empty(),
        "private queue left: {:?}",
        entries(&tmp)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn send_reads_stdin_and_splits_long_lines() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let long: String = (0..1500)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let mut want = lines("piped", 500);
    want.push(long.clone());
    let sent = send_async(
        vec![
            "--intake-url".into(),
            mock.url(),
            "--max-event-bytes".into(),
            "256".into(),
            "--oversize".into(),
            "split".into(),
            "-".into(),
        ],
        bytes_of(&want),
        dir.path().to_owned(),
    )
    .await;
    assert_eq!(sent.code, Some(0), "{}", sent.stderr);
    let got = raws(&mock);
    let (piped, pieces): (Vec<String>, Vec<String>) =
        got.into_iter().partition(|e| e.starts_with("piped"));
    assert_once(&piped, &want[..500]);
    assert!(pieces.len() >= 6, "{} pieces", pieces.len());
    assert!(pieces.iter().all(|p| p.len() <= 256));
    // Pieces of one lane may come in batches out of order, but each is a slice of the line.
    assert_eq!(pieces.iter().map(String::len).sum::<usize>(), long.len());
    assert!(pieces.iter().all(|p| long.contains(p.as_str())));
}

#[tokio::test(flavor = "multi_thread")]
async fn send_with_the_intake_down_times_out_with_the_count_and_keeps_the_queue() {
    let mock = refusing_intake().await;
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let want = lines("later", 120);
    let sent = send_async(
        vec![
            "--intake-url".into(),
            mock.url(),
            "--timeout".into(),
            "2".into(),
        ],
        bytes_of(&want),
        tmp.clone(),
    )
    .await;
    assert_eq!(sent.code, Some(3), "{}", sent.stderr);
    assert!(
        sent.stderr.contains("120 events still queued"),
        "{}",
        sent.stderr
    );
    let kept = entries(&tmp);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        sent.stderr.contains(&kept[0].display().to_string()),
        "{}",
        sent.stderr
    );
    assert!(raws(&mock).is_empty());
    // The intake is back: the kept queue is delivered by a send that names it.
    mock.set_faults(FaultConfig::default());
    let sent = send_async(
        vec![
            "--intake-url".into(),
            mock.url(),
            "--queue".into(),
            kept[0].display().to_string(),
            "/dev/null".into(),
        ],
        Vec::new(),
        tmp.clone(),
    )
    .await;
    assert_eq!(sent.code, Some(0), "{}", sent.stderr);
    assert_once(&raws(&mock), &want);
}

#[tokio::test(flavor = "multi_thread")]
async fn send_says_when_the_intake_refused_events_for_good() {
    let mock = start_mock().await;
    mock.set_faults(FaultConfig {
        reject_containing: Some("POISON".into()),
        ..FaultConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let good = lines("good", 200);
    let mut all = good.clone();
    all.insert(77, "a POISON line".into());
    let sent = send_async(
        vec!["--intake-url".into(), mock.url()],
        bytes_of(&all),
        dir.path().to_owned(),
    )
    .await;
    assert_eq!(sent.code, Some(4), "{}", sent.stderr);
    assert!(
        sent.stderr.contains("1 refused for good"),
        "{}",
        sent.stderr
    );
    assert_once(&raws(&mock), &good);
    // The dead letter stays in the kept queue, where `dead-letters` can show it.
    assert_eq!(entries(dir.path()).len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn send_refuses_the_queue_of_a_running_forwarder() {
    let mock = start_mock().await;
    let (fwd, dir) = forwarder_for(&mock, "", "");
    let queue = dir.path().join("queue");
    let sent = send_async(
        vec![
            "--intake-url".into(),
            mock.url(),
            "--queue".into(),
            queue.display().to_string(),
        ],
        bytes_of(&lines("x", 3)),
        dir.path().to_owned(),
    )
    .await;
    assert_eq!(sent.code, Some(1), "{}", sent.stderr);
    assert!(sent.stderr.contains("in use"), "{}", sent.stderr);
    assert!(raws(&mock).is_empty());
    assert_eq!(fwd.status().await["queue"]["events"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn stdin_source_lines_arrive_once_and_the_forwarder_keeps_running_after_eof() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &mock.url(),
        "",
        r#"
[[source]]
type = "stdin"
intake_key_env = "STDIN_TEST_KEY"
max_event_bytes = 300
oversize = "split"
"#,
    );
    let mut fwd = Forwarder::start_with_stdin(&cfg, &[("STDIN_TEST_KEY", KEY)], Stdio::piped());
    let mut stdin = fwd.take_stdin().expect("stdin pipe");
    let first = lines("first", 1000);
    stdin.write_all(&bytes_of(&first)).unwrap();
    // Read and delivered while the pipe stays open (a `tail -f`).
    let ok = wait_until_async(DEADLINE, || async { mock.events().len() >= 1000 }).await;
    assert!(ok, "{}", fwd.log());
    let mut more = b"bad \xff end\n".to_vec();
    more.extend_from_slice(&"x".repeat(700).into_bytes());
    more.extend_from_slice(b"\nno newline at the end");
    stdin.write_all(&more).unwrap();
    drop(stdin);
    let ok = wait_until_async(DEADLINE, || async {
        fwd.status().await["stdin_sources"][0]["ended"] == 1
    })
    .await;
    assert!(ok, "{}", fwd.log());
    fwd.wait_drained().await;
    let got = raws(&mock);
    let (xs, rest): (Vec<String>, Vec<String>) = got.into_iter().partition(|e| e.starts_with('x'));
    let mut want = first.clone();
    want.push("bad \u{FFFD} end".into());
    want.push("no newline at the end".into());
    assert_once(&rest, &want);
    assert_eq!(xs.iter().map(String::len).sum::<usize>(), 700);
    assert!(xs.len() >= 3 && xs.iter().all(|x| x.len() <= 300), "{xs:?}");
    let stats = fwd.status().await["stdin_sources"][0].clone();
    assert_eq!(stats["listen"], "stdin", "{stats}");
    assert_eq!(stats["invalid_utf8_events"], 1, "{stats}");
    assert_eq!(stats["split_pieces"], xs.len(), "{stats}");
    assert_eq!(stats["accepted_events"], 1002 + xs.len(), "{stats}");
    // The end of stdin ends the source, not the forwarder: its other sources still take events.
    assert!(fwd.alive(), "{}", fwd.log());
    let client = reqwest::Client::new();
    let acked = send_events(&client, &fwd.url(), KEY, 0, 5, 5).await;
    assert_eq!(acked.len(), 5);
    let ok = wait_until_async(DEADLINE, || async {
        mock.events().len() >= 1002 + xs.len() + 5
    })
    .await;
    assert!(ok, "{}", fwd.log());
    assert_eq!(fwd.terminate().code(), Some(0), "{}", fwd.log());
    assert!(!fwd.log().contains(KEY), "the intake key was logged");
    assert!(
        fwd.log().contains("standard input is read to its end"),
        "{}",
        fwd.log()
    );
}

/// A full queue stops the reading of stdin: the pipe fills and its writer blocks, nothing is
/// dropped; once the intake is back every line it wrote arrives, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_blocks_the_stdin_writer_and_loses_nothing() {
    let mock = refusing_intake().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &mock.url(),
        "",
        r#"
[[source]]
type = "stdin"
intake_key_env = "STDIN_TEST_KEY"
"#,
    );
    // The least max_bytes takes (16 MiB), less than what is written.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[queue]\n", "[queue]\nmax_bytes = 16777216\n");
    std::fs::write(&cfg, text).unwrap();
    let mut fwd = Forwarder::start_with_stdin(&cfg, &[("STDIN_TEST_KEY", KEY)], Stdio::piped());
    let mut stdin = fwd.take_stdin().expect("stdin pipe");
    // 60,000 lines of ~400 bytes: 24 MB.
    const LINES: usize = 60_000;
    let pad = "p".repeat(380);
    let writer = std::thread::spawn(move || {
        let mut out = std::io::BufWriter::new(&mut stdin);
        for i in 0..LINES {
            writeln!(out, "line {i:06} {pad}").unwrap();
        }
        out.flush().unwrap();
    });
    let full = wait_until_async(DEADLINE, || async {
        fwd.status().await["queue"]["full"] == true
    })
    .await;
    assert!(full, "the queue never filled:\n{}", fwd.log());
    assert!(!writer.is_finished(), "the writer was not pushed back");
    // The source says it waits once its next batch is refused, a moment after the queue
    // filled.
    let waited = wait_until_async(DEADLINE, || async {
        fwd.status().await["stdin_sources"][0]["queue_full_waits"].as_u64() > Some(0)
    })
    .await;
    assert!(waited, "{}", fwd.status().await);
    mock.set_faults(FaultConfig::default());
    let all = wait_until_async(std::time::Duration::from_secs(180), || async {
        mock.stats().accepted_events >= LINES as u64
    })
    .await;
    assert!(
        all,
        "{} of {LINES}:\n{}",
        mock.stats().accepted_events,
        fwd.log()
    );
    writer.join().unwrap();
    let mut seen = vec![0u32; LINES];
    for e in mock.events() {
        let n: usize = e.raw[5..11].parse().unwrap();
        seen[n] += 1;
    }
    let missing = seen.iter().filter(|&&c| c == 0).count();
    let twice = seen.iter().filter(|&&c| c > 1).count();
    assert_eq!((missing, twice), (0, 0), "lines missing / sent twice");
}

#[tokio::test(flavor = "multi_thread")]
async fn send_stopped_by_its_timeout_before_the_end_of_its_input_is_not_a_success() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let url = mock.url();
    let tmp = dir.path().to_owned();
    let sent = tokio::task::spawn_blocking(move || {
        send_with(&["--intake-url", &url, "--timeout", "1"], None, &tmp)
    })
    .await
    .unwrap();
    assert_eq!(sent.code, Some(3), "{}", sent.stderr);
    assert!(
        sent.stderr
            .contains("the timeout passed before the end of the input"),
        "{}",
        sent.stderr
    );
}

/// On a terminal `send` shows a progress bar and a summary (`script` gives it a pseudo
/// terminal); the test is skipped where util-linux's `script` is missing.
#[tokio::test(flavor = "multi_thread")]
async fn send_on_a_terminal_shows_a_progress_bar() {
    let Some(script) = find_program("script", &["/usr/bin/script"]) else {
        eprintln!("skipped: no `script` program for a pseudo terminal");
        return;
    };
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lines.log");
    let want = lines("tty", 500);
    std::fs::write(&file, bytes_of(&want)).unwrap();
    let command = format!(
        "{} send --intake-key-env SEND_KEY --intake-url {} {}",
        binary(),
        mock.url(),
        file.display()
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new(script)
            .args(["-qec", &command, "/dev/null"])
            .env("SEND_KEY", KEY)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("script")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("events acknowledged"),
        "no progress bar: {text}"
    );
    assert!(
        text.contains("500 events read, 500 acknowledged by the intake"),
        "{text}"
    );
    assert!(!text.contains(KEY), "the intake key was printed");
    assert_once(&raws(&mock), &want);
}

/// SIGINT (or SIGTERM) stops a `send` that waits for an intake that is down: exit 3 with the
/// count, the queue kept, not a death by the signal.
#[tokio::test(flavor = "multi_thread")]
async fn send_interrupted_says_how_many_are_still_queued() {
    let mock = refusing_intake().await;
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(binary())
        .args(["send", "--intake-key-env", "SEND_KEY", "--intake-url"])
        .arg(mock.url())
        .env("SEND_KEY", KEY)
        .env("TMPDIR", dir.path())
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn send");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(&bytes_of(&lines("int", 40))).unwrap();
    drop(stdin);
    // A request refused: the lines are in the queue (and the signal handlers installed).
    let tried = wait_until_async(DEADLINE, || async { mock.stats().requests > 0 }).await;
    assert!(tried, "no request reached the intake");
    signal(child.id(), "INT");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().expect("wait"))
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("interrupted: 40 events still queued"),
        "{stderr}"
    );
    let kept = entries(dir.path());
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(stderr.contains(&kept[0].display().to_string()), "{stderr}");
}

/// A forwarder whose standard input is still open (a `tail -f` that never ends) stops on
/// SIGTERM as any other: the blocked read does not hold the process.
#[tokio::test(flavor = "multi_thread")]
async fn a_forwarder_reading_an_open_stdin_stops_cleanly() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &mock.url(),
        "",
        "\n[[source]]\ntype = \"stdin\"\nintake_key_env = \"STDIN_TEST_KEY\"\n",
    );
    let mut fwd = Forwarder::start_with_stdin(&cfg, &[("STDIN_TEST_KEY", KEY)], Stdio::piped());
    let mut stdin = fwd.take_stdin().expect("stdin pipe");
    stdin.write_all(&bytes_of(&lines("open", 10))).unwrap();
    let ok = wait_until_async(DEADLINE, || async { mock.events().len() >= 10 }).await;
    assert!(ok, "{}", fwd.log());
    assert_eq!(fwd.terminate().code(), Some(0), "{}", fwd.log());
    assert_once(&raws(&mock), &lines("open", 10));
    drop(stdin);
}

/// `--config` brings the intake's settings, never the forwarder's queue directory.
#[tokio::test(flavor = "multi_thread")]
async fn send_takes_the_intake_from_the_config_but_not_its_queue() {
    let mock = start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &mock.url(), "", "");
    let sent = send_async(
        vec!["--config".into(), cfg.display().to_string()],
        bytes_of(&lines("cfg", 25)),
        dir.path().to_owned(),
    )
    .await;
    assert_eq!(sent.code, Some(0), "{}", sent.stderr);
    assert_once(&raws(&mock), &lines("cfg", 25));
    assert!(
        !dir.path().join("queue").exists(),
        "send used the configuration's queue"
    );
}

/// kill -9 of a forwarder reading its standard input, with the intake refusing everything (so
/// nothing was delivered, and no delivery retry can explain a duplicate): a restart without
/// the stdin source delivers every line the source had counted durable before the kill, as
/// a prefix of the input (the source stores lines in order), each once.
#[tokio::test(flavor = "multi_thread")]
async fn kill9_while_reading_stdin_loses_nothing_it_made_durable() {
    let mock = refusing_intake().await;
    let dir = tempfile::tempdir().unwrap();
    let stdin_source = "\n[[source]]\ntype = \"stdin\"\nintake_key_env = \"STDIN_TEST_KEY\"\n";
    let cfg = write_config(dir.path(), &mock.url(), "", stdin_source);
    let mut fwd = Forwarder::start_with_stdin(&cfg, &[("STDIN_TEST_KEY", KEY)], Stdio::piped());
    let mut stdin = fwd.take_stdin().expect("stdin pipe");
    const LINES: usize = 200_000;
    let writer = std::thread::spawn(move || {
        let mut out = std::io::BufWriter::new(&mut stdin);
        for i in 0..LINES {
            // The pipe breaks at the kill: the writer stops there.
            if writeln!(out, "crash line {i:07} {}", "c".repeat(60)).is_err() {
                return;
            }
        }
        let _ = out.flush();
    });
    let some = wait_until_async(DEADLINE, || async {
        fwd.status().await["stdin_sources"][0]["accepted_events"].as_u64() >= Some(20_000)
    })
    .await;
    assert!(some, "the stdin source stored too little:\n{}", fwd.log());
    let durable = fwd.status().await["stdin_sources"][0]["accepted_events"]
        .as_u64()
        .unwrap() as usize;
    fwd.kill9();
    writer.join().unwrap();
    // The same queue, no stdin source, the intake back.
    let cfg = write_config(dir.path(), &mock.url(), "", "");
    mock.set_faults(FaultConfig::default());
    let fwd = Forwarder::start(&cfg);
    fwd.wait_drained().await;
    let mut seen = vec![0u32; LINES];
    for e in mock.events() {
        let n: usize = e.raw["crash line ".len().."crash line ".len() + 7]
            .parse()
            .unwrap();
        seen[n] += 1;
    }
    let delivered = seen.iter().filter(|&&c| c > 0).count();
    assert!(
        delivered >= durable,
        "{delivered} lines delivered, {durable} were durable before the kill"
    );
    assert!(
        seen[..delivered].iter().all(|&c| c == 1) && seen[delivered..].iter().all(|&c| c == 0),
        "not a prefix of the input, each once"
    );
}

/// `send --queue DIR FILE` killed with SIGKILL while it delivers to a slow intake: a second
/// `send --queue DIR` delivers what the first left queued. Across both runs the intake gets a
/// prefix of the file's lines, each at least once; a line arrives twice only from a batch the
/// first run had on the wire (sent, its answer lost with the process): at most twice, and no
/// more such lines than `max_in_flight` (4) batches of `batch_max_events` (10,000) hold. (Which
/// lines those are cannot be told from here: the kernel still hands the intake what the killed
/// process had written to its sockets.)
#[tokio::test(flavor = "multi_thread")]
async fn send_killed_with_sigkill_leaves_its_queue_for_the_next_send() {
    let mock = start_mock().await;
    mock.set_faults(FaultConfig {
        delay_ms: 300,
        ..FaultConfig::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let queue = dir.path().join("queue");
    let input = dir.path().join("input.log");
    const LINES: usize = 60_000;
    let want = lines("killed", LINES);
    std::fs::write(&input, bytes_of(&want)).unwrap();
    let mut child = Command::new(binary())
        .args(["send", "--intake-key-env", "SEND_KEY", "--intake-url"])
        .arg(mock.url())
        .arg("--queue")
        .arg(&queue)
        .arg(&input)
        .env("SEND_KEY", KEY)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn send");
    let some = wait_until_async(DEADLINE, || async {
        mock.stats().accepted_events >= 10_000
    })
    .await;
    assert!(some, "send delivered nothing");
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");

    mock.set_faults(FaultConfig::default());
    let sent = send_async(
        vec![
            "--intake-url".into(),
            mock.url(),
            "--queue".into(),
            queue.display().to_string(),
            "/dev/null".into(),
        ],
        Vec::new(),
        dir.path().to_path_buf(),
    )
    .await;
    assert_eq!(sent.code, Some(0), "{}", sent.stderr);
    let mut seen = vec![0u32; LINES];
    for raw in raws(&mock) {
        let n: usize = raw["killed line ".len()..].parse().unwrap();
        seen[n] += 1;
    }
    let delivered = seen.iter().filter(|&&c| c > 0).count();
    assert!(delivered >= 10_000, "{delivered} delivered");
    assert!(
        seen[delivered..].iter().all(|&c| c == 0) && seen[..delivered].iter().all(|&c| c > 0),
        "not a prefix of the file's lines"
    );
    let twice = seen.iter().filter(|&&c| c == 2).count();
    assert!(seen.iter().all(|&c| c <= 2), "a line arrived three times");
    assert!(twice <= 4 * 10_000, "{twice} lines arrived twice");
    eprintln!("{delivered} of {LINES} lines delivered, {twice} twice");
}
