//! The syslog source with senders no one here wrote: util-linux `logger` over UDP, TCP
//! (newline and octet-counted framing, RFC 3164 and RFC 5424), through the real binary to
//! the mock intake.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const KEY: &str = "syslog-test-intake-key-0001";

/// A forwarder with a UDP and a TCP syslog source (ephemeral ports), key from the environment.
fn syslog_forwarder(mock: &MockIntake, extra: &str) -> (Forwarder, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let sources = format!(
        r#"
[[source]]
type = "syslog"
listen = "udp://127.0.0.1:0"
intake_key_env = "SYSLOG_TEST_KEY"
{extra}

[[source]]
type = "syslog"
listen = "tcp://127.0.0.1:0"
intake_key_env = "SYSLOG_TEST_KEY"
{extra}
"#
    );
    let config = write_config(dir.path(), &mock.url(), "", &sources);
    let fwd = Forwarder::start_with_env(&config, &[("SYSLOG_TEST_KEY", KEY)]);
    (fwd, dir)
}

/// Runs `logger` with `args`, sending `lines` (one message each) on its standard input.
fn logger(args: &[&str], lines: &[String]) {
    let mut child = Command::new("logger")
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("logger (util-linux) is needed");
    {
        let mut stdin = child.stdin.take().unwrap();
        for line in lines {
            writeln!(stdin, "{line}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "logger {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until the mock has an event containing each of `texts`; returns those events.
async fn wait_for_texts(
    mock: &MockIntake,
    fwd: &Forwarder,
    texts: &[String],
) -> Vec<ReceivedEvent> {
    let found = wait_until_async(DEADLINE, || async {
        let events = mock.events();
        texts
            .iter()
            .all(|t| events.iter().any(|e| e.raw.contains(t.as_str())))
    })
    .await;
    let events = mock.events();
    assert!(
        found,
        "not all of {} messages arrived ({} events):\n{}",
        texts.len(),
        events.len(),
        fwd.log()
    );
    events
}

fn texts(tag: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{tag} message {i:04}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn logger_over_tcp_in_both_framings_and_both_formats() {
    let mock = start_mock().await;
    let (fwd, _dir) = syslog_forwarder(&mock, "");
    let port = fwd.syslog("tcp").port().to_string();
    let cases: [(&str, &[&str]); 4] = [
        ("lines-3164", &["--rfc3164"]),
        ("lines-5424", &["--rfc5424"]),
        ("counted-3164", &["--rfc3164", "--octet-count"]),
        ("counted-5424", &["--rfc5424", "--octet-count"]),
    ];
    let mut all = Vec::new();
    for (tag, format) in cases {
        let lines = texts(tag, 50);
        let mut args = vec!["--tcp", "--server", "127.0.0.1", "--port", &port];
        args.extend_from_slice(format);
        args.extend_from_slice(&["--tag", "sftest", "--priority", "local3.warning"]);
        logger(&args, &lines);
        all.extend(lines);
    }
    let events = wait_for_texts(&mock, &fwd, &all).await;
    assert_eq!(events.len(), all.len(), "each message once");
    for e in &events {
        assert_eq!(e.intake_key, KEY);
        // <156> = local3 (19) * 8 + warning (4); forwarded raw, without its newline.
        assert!(e.raw.starts_with("<156>"), "{:?}", e.raw);
        assert!(
            !e.raw.ends_with('\n') && !e.raw.contains('\0'),
            "{:?}",
            e.raw
        );
        assert!(e.raw.contains("sftest"), "{:?}", e.raw);
    }
    let rfc5424 = events
        .iter()
        .filter(|e| e.raw.starts_with("<156>1 "))
        .count();
    assert_eq!(
        rfc5424, 100,
        "the RFC 5424 messages keep their version field"
    );
    let status = fwd.status().await;
    let tcp = status["syslog_sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["listen"].as_str().unwrap().starts_with("tcp://"))
        .unwrap()
        .clone();
    assert_eq!(tcp["accepted_events"], 200, "{status}");
    assert_eq!(tcp["connections"], 4, "{status}");
    assert_eq!(tcp["framing_errors"], 0, "{status}");
    assert!(!fwd.log().contains(KEY), "the intake key was logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn logger_over_udp() {
    let mock = start_mock().await;
    let (fwd, _dir) = syslog_forwarder(&mock, "");
    let port = fwd.syslog("udp").port().to_string();
    let lines = texts("udp", 100);
    logger(
        &[
            "--udp",
            "--server",
            "127.0.0.1",
            "--port",
            &port,
            "--rfc5424",
        ],
        &lines,
    );
    // Loopback with a 4 MiB receive buffer drops nothing of 100 small datagrams.
    let events = wait_for_texts(&mock, &fwd, &lines).await;
    assert_eq!(events.len(), 100);
    assert!(events.iter().all(|e| e.intake_key == KEY));
    let text = fwd.metrics().await;
    let udp = format!("listen=\"udp://{}\"", fwd.syslog("udp"));
    for line in [
        format!("sekoia_forwarder_syslog_datagrams_total{{{udp}}} 100"),
        format!("sekoia_forwarder_syslog_accepted_events_total{{{udp}}} 100"),
        format!("sekoia_forwarder_syslog_kernel_dropped_datagrams_total{{{udp}}} 0"),
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn long_messages_are_truncated_or_split_never_dropped() {
    let long = "L".repeat(300_000);
    for (oversize, want_events) in [("truncate", 1), ("split", 2)] {
        let mock = start_mock().await;
        let (fwd, _dir) = syslog_forwarder(&mock, &format!("oversize = \"{oversize}\""));
        let port = fwd.syslog("tcp").port().to_string();
        let message = format!("<13>{long} end");
        // logger caps its own messages; a raw octet-counted frame is what a relay sends.
        let frame = format!("{} {message}", message.len());
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port.parse().unwrap())).unwrap();
        tcp.write_all(frame.as_bytes()).unwrap();
        tcp.write_all(b"6 <13>ok").unwrap();
        drop(tcp);
        let ok = wait_for_texts(&mock, &fwd, &["<13>ok".to_owned()]).await;
        let events: Vec<_> = ok.iter().filter(|e| e.raw != "<13>ok").collect();
        assert_eq!(events.len(), want_events, "{oversize}");
        assert!(events.iter().all(|e| e.raw.len() <= 250_000), "{oversize}");
        match oversize {
            "truncate" => assert!(
                events[0].raw.ends_with(&format!(
                    "[truncated by sekoia-forwarder: {} bytes]",
                    message.len()
                )),
                "{}",
                &events[0].raw[events[0].raw.len() - 80..]
            ),
            _ => assert_eq!(
                events.iter().map(|e| e.raw.as_str()).collect::<String>(),
                message
            ),
        }
    }
}

/// `oversize = "dead_letter"`: a message over the limit is not sent; its first bytes (marked
/// with its length) are kept in the dead letters with the reason, and counted; the messages
/// around it flow on.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_message_can_be_kept_as_a_dead_letter_instead() {
    let mock = start_mock().await;
    let (fwd, _dir) = syslog_forwarder(&mock, "oversize = \"dead_letter\"");
    let port = fwd.syslog("tcp").port();
    let message = format!("<13>{} end", "D".repeat(300_000));
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.write_all(b"9 <13>first").unwrap();
    tcp.write_all(format!("{} {message}", message.len()).as_bytes())
        .unwrap();
    tcp.write_all(b"6 <13>ok").unwrap();
    drop(tcp);
    let events = wait_for_texts(&mock, &fwd, &["<13>first".to_owned(), "<13>ok".to_owned()]).await;
    assert_eq!(events.len(), 2, "only the short messages are sent");
    let letters: serde_json::Value = reqwest::get(format!("http://{}/dead-letters", fwd.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let letters = letters.as_array().expect("a list of dead letters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter["status"], 413, "{letter}");
    let reason = letter["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("{} bytes", message.len())),
        "{reason}"
    );
    let kept = letter["event"].as_str().unwrap();
    assert!(kept.starts_with("<13>DDDD"), "{}", &kept[..40]);
    assert!(kept.len() <= 250_000);
    assert!(
        kept.ends_with(&format!(
            "[truncated by sekoia-forwarder: {} bytes]",
            message.len()
        )),
        "{}",
        &kept[kept.len() - 80..]
    );
    let status = fwd.status().await;
    let tcp_source = status["syslog_sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["listen"].as_str().unwrap().starts_with("tcp://"))
        .unwrap()
        .clone();
    assert_eq!(tcp_source["dead_lettered_events"], 1, "{tcp_source}");
    assert_eq!(tcp_source["accepted_events"], 2, "{tcp_source}");
    assert_eq!(status["queue"]["dead_letters"], 1, "{status}");
}

#[test]
fn a_syslog_source_without_a_key_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "http://127.0.0.1:9",
        "",
        "\n[[source]]\ntype = \"syslog\"\nlisten = \"tcp://127.0.0.1:0\"\nintake_key_env = \"NO_SUCH_VARIABLE_SET\"\n",
    );
    let out = Command::new(binary())
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("NO_SUCH_VARIABLE_SET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NO_SUCH_VARIABLE_SET"), "{err}");
    assert!(err.contains("tcp://127.0.0.1:0"), "{err}");
}

/// A full queue stops the reading: the TCP sender is pushed back by the kernel (its writes
/// block) instead of losing messages, and once the intake is back every message it wrote
/// arrives, once.
/// [`syslog_forwarder`] on a small queue (16 MiB, the least `max_bytes` takes).
fn small_queue_forwarder(mock: &MockIntake, extra: &str) -> (Forwarder, tempfile::TempDir) {
    let (mut fwd, dir) = syslog_forwarder(mock, extra);
    fwd.terminate();
    let config = dir.path().join("forwarder.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[queue]\n", "[queue]\nmax_bytes = 16777216\n");
    std::fs::write(&config, text).unwrap();
    let fwd = Forwarder::start_with_env(&config, &[("SYSLOG_TEST_KEY", KEY)]);
    (fwd, dir)
}

/// Senders of `lines` numbered lines of ~400 bytes each over `connections` TCP connections
/// (`<13>line CCC NNNNNN ...`). Each stops at its first failed write (a test that stops the
/// forwarder closes their connections) and says so in its result.
fn tcp_senders(
    addr: std::net::SocketAddr,
    connections: usize,
    lines: usize,
) -> Vec<std::thread::JoinHandle<std::io::Result<()>>> {
    let pad = "p".repeat(376);
    (0..connections)
        .map(|c| {
            let pad = pad.clone();
            std::thread::spawn(move || {
                let mut tcp = std::io::BufWriter::new(std::net::TcpStream::connect(addr)?);
                for i in 0..lines {
                    writeln!(tcp, "<13>line {c:03} {i:06} {pad}")?;
                }
                tcp.flush()
            })
        })
        .collect()
}

/// Waits until the queue is full and the TCP source stopped reading for it (it says so once
/// its next batch is refused, a moment after the queue filled).
async fn wait_full(fwd: &Forwarder) {
    let full = wait_until_async(DEADLINE, || async {
        fwd.status().await["queue"]["full"] == true
    })
    .await;
    assert!(full, "the queue never filled:\n{}", fwd.log());
    let waited = wait_until_async(DEADLINE, || async {
        fwd.status().await["syslog_sources"][1]["queue_full_waits"].as_u64() > Some(0)
    })
    .await;
    assert!(waited, "{}", fwd.status().await);
}

/// With the intake back, waits for every line of [`tcp_senders`] and asserts each arrived
/// exactly once.
async fn all_arrive_once(
    mock: &MockIntake,
    fwd: &Forwarder,
    senders: Vec<std::thread::JoinHandle<std::io::Result<()>>>,
    connections: usize,
    lines: usize,
) {
    mock.set_faults(FaultConfig::default());
    let total = (connections * lines) as u64;
    let all = wait_until_async(Duration::from_secs(180), || async {
        mock.stats().accepted_events >= total
    })
    .await;
    assert!(
        all,
        "{} of {total}:\n{}",
        mock.stats().accepted_events,
        fwd.log()
    );
    for s in senders {
        s.join().unwrap().expect("a sender's write failed");
    }
    let mut seen = vec![0u32; connections * lines];
    for e in &mock.events() {
        let c: usize = e.raw[9..12].parse().unwrap();
        let n: usize = e.raw[13..19].parse().unwrap();
        seen[c * lines + n] += 1;
    }
    let missing = seen.iter().filter(|&&c| c == 0).count();
    let twice = seen.iter().filter(|&&c| c > 1).count();
    assert_eq!((missing, twice), (0, 0), "lines missing / sent twice");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_pushes_a_tcp_sender_back_and_loses_nothing() {
    let mock = refusing_intake().await;
    let (fwd, _dir) = small_queue_forwarder(&mock, "");
    // 60,000 lines of ~400 bytes: 24 MB, more than the queue holds.
    let senders = tcp_senders(fwd.syslog("tcp"), 1, 60_000);
    wait_full(&fwd).await;
    assert!(!senders[0].is_finished(), "the sender was not pushed back");
    // The intake is back: the sender gets through, and nothing it wrote is missing.
    all_arrive_once(&mock, &fwd, senders, 1, 60_000).await;
}

/// The connections of a source together hold at most `max_buffered_bytes` of messages read
/// and not yet durable: with the queue full, 40 connections would each hold two batches (up
/// to 16 MB together) without it.
#[tokio::test(flavor = "multi_thread")]
async fn many_connections_together_hold_at_most_max_buffered_bytes() {
    const BUDGET: u64 = 1 << 20;
    let mock = refusing_intake().await;
    let (fwd, _dir) = small_queue_forwarder(&mock, &format!("max_buffered_bytes = {BUDGET}"));
    // 40 x 1,500 lines of ~400 bytes: 24 MB, more than the queue holds.
    let senders = tcp_senders(fwd.syslog("tcp"), 40, 1500);
    wait_full(&fwd).await;
    let waited = wait_until_async(DEADLINE, || async {
        fwd.status().await["syslog_sources"][1]["budget_waits"].as_u64() > Some(0)
    })
    .await;
    let status = fwd.status().await;
    assert!(waited, "no connection ran out of room: {status}");
    let held = status["syslog_sources"][1]["buffered_bytes"].as_u64();
    assert!(held > Some(0) && held <= Some(BUDGET), "{status}");
    all_arrive_once(&mock, &fwd, senders, 40, 1500).await;
    let status = fwd.status().await;
    let s = &status["syslog_sources"][1];
    assert!(
        s["buffered_bytes_peak"].as_u64() <= Some(BUDGET),
        "{status}"
    );
    assert_eq!(s["buffered_bytes"].as_u64(), Some(0), "{status}");
}

/// A stop while the queue is full cannot store what a connection read: its batches in flight
/// (refused, waiting for room) and what it read after them. All of it is said, with how many
/// messages (never lost silently), and what the queue had made durable still arrives after a
/// restart: the lines 0..N, each once (none lost before what was lost at the stop).
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_on_a_full_queue_says_what_it_could_not_store() {
    // Every line of `tcp_senders` is 396 bytes once its newline is cut.
    const LINE: u64 = 396;
    let mock = refusing_intake().await;
    let (mut fwd, dir) = small_queue_forwarder(&mock, "");
    let _senders = tcp_senders(fwd.syslog("tcp"), 1, 60_000);
    wait_full(&fwd).await;
    // The connection waits for room with what it read: it reads no more meanwhile.
    let status = fwd.status().await;
    let held = status["syslog_sources"][1]["buffered_bytes"]
        .as_u64()
        .unwrap_or(0)
        / LINE;
    assert!(held > 0, "nothing read was waiting for room: {status}");
    let exit = fwd.terminate();
    let log = fwd.log();
    assert!(exit.success(), "{exit:?}:\n{log}");
    let said: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("but not stored"))
        .map(|l| {
            let n = l
                .split("events=")
                .nth(1)
                .or_else(|| l.split("messages=").nth(1))
                .unwrap_or_default();
            n.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap_or(0)
        })
        .collect();
    assert!(!said.is_empty(), "nothing said of what was lost:\n{log}");
    assert!(said.iter().all(|&n| n > 0), "{said:?}:\n{log}");
    let lost: u64 = said.iter().sum();
    // What was held is said; at most the batches in flight and one being read, each of at
    // most 4,000 lines (a lone connection's) or 1 MiB.
    let batch = 4000.min((1 << 20) / LINE + 1);
    assert!(
        (held..=3 * batch).contains(&lost),
        "{lost} said, {held} held:\n{log}"
    );
    // What was durable arrives: the lines 0..N, each once.
    mock.set_faults(FaultConfig::default());
    let config = dir.path().join("forwarder.toml");
    let fwd = Forwarder::start_with_env(&config, &[("SYSLOG_TEST_KEY", KEY)]);
    let drained = wait_until_async(Duration::from_secs(180), || async {
        fwd.status().await["queue"]["events"].as_u64() == Some(0)
    })
    .await;
    assert!(drained, "the queue did not drain:\n{}", fwd.log());
    let mut seen: Vec<usize> = mock
        .events()
        .iter()
        .map(|e| e.raw[13..19].parse().unwrap())
        .collect();
    seen.sort_unstable();
    assert!(!seen.is_empty());
    let prefix: Vec<usize> = (0..seen.len()).collect();
    assert_eq!(seen, prefix, "not the lines 0..N once each");
}

/// Bytes that are not UTF-8 are forwarded with U+FFFD in their place (JSON carries text) and
/// counted; the rest of the message is kept as sent.
#[tokio::test(flavor = "multi_thread")]
async fn invalid_utf8_is_replaced_and_counted() {
    let mock = start_mock().await;
    let (fwd, _dir) = syslog_forwarder(&mock, "");
    let mut tcp = std::net::TcpStream::connect(fwd.syslog("tcp")).unwrap();
    tcp.write_all(b"<13>bad \xff\xfe bytes\n<13>good \xc3\xa9\n")
        .unwrap();
    drop(tcp);
    let events = wait_for_texts(&mock, &fwd, &["bytes".to_owned(), "good".to_owned()]).await;
    let raws: Vec<&str> = events.iter().map(|e| e.raw.as_str()).collect();
    assert!(raws.contains(&"<13>bad \u{fffd}\u{fffd} bytes"), "{raws:?}");
    assert!(raws.contains(&"<13>good é"), "{raws:?}");
    let status = fwd.status().await;
    assert_eq!(
        status["syslog_sources"][1]["invalid_utf8_events"], 1,
        "{status}"
    );
}
