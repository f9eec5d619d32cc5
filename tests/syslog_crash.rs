//! `kill -9` of the real forwarder while a TCP syslog sender streams numbered messages to it
//! over one connection, with an intake that refuses everything (503) or answers slowly: a
//! backlog in the queue. `/status` says how many messages the syslog source had made durable
//! (`accepted_events`, in the order they were sent) before the kill; after a restart on the
//! same configuration and queue, with a fresh mock intake, every one of those must reach the
//! intake, none twice, and nothing that was not sent.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;

use common::*;

const KEY: &str = "syslog-crash-intake-key-0001";
/// Messages accepted before the kill, at least.
const BEFORE_KILL: u64 = 3000;
/// Messages per write of the sender.
const PER_WRITE: usize = 50;

fn message(i: usize) -> String {
    format!(
        "<13>1 - host crashtest - - - syslog crash message {i:08} {}",
        "x".repeat(100)
    )
}

/// The number of one of our messages.
fn number(raw: &str) -> Option<usize> {
    raw.split("syslog crash message ")
        .nth(1)?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// Writes the configuration (the same queue under `dir` every time) for `intake_url`.
fn config(dir: &Path, intake_url: &str, intake_extra: &str) -> std::path::PathBuf {
    let source = r#"
[[source]]
type = "syslog"
listen = "tcp://127.0.0.1:0"
intake_key_env = "SYSLOG_TEST_KEY"
"#;
    write_config(dir, intake_url, intake_extra, source)
}

fn start(config: &Path) -> Forwarder {
    Forwarder::start_with_env(config, &[("SYSLOG_TEST_KEY", KEY)])
}

/// Streams numbered messages to `addr` over one connection, octet-counted or one per line,
/// until a write fails (the forwarder is gone); returns how many it handed to the socket.
fn stream_until_broken(addr: SocketAddr, octet_counted: bool) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut tcp = TcpStream::connect(addr).expect("connect to the syslog source");
        let mut i = 0;
        loop {
            let mut chunk = String::new();
            for n in i..i + PER_WRITE {
                let m = message(n);
                if octet_counted {
                    chunk.push_str(&format!("{} {m}", m.len()));
                } else {
                    chunk.push_str(&m);
                    chunk.push('\n');
                }
            }
            if tcp.write_all(chunk.as_bytes()).is_err() {
                return i;
            }
            i += PER_WRITE;
        }
    })
}

async fn accepted(fwd: &Forwarder) -> u64 {
    let status = fwd.status().await;
    status["syslog_sources"][0]["accepted_events"]
        .as_u64()
        .unwrap_or_else(|| panic!("no accepted_events in {status}"))
}

/// Waits until the source has accepted at least `BEFORE_KILL` messages; returns how many it
/// had (every one of them durable: the count only grows, in the order they were sent).
async fn wait_accepted(fwd: &Forwarder) -> u64 {
    let seen_accepted = std::cell::Cell::new(0);
    let ok = wait_until_async(DEADLINE, || async {
        seen_accepted.set(accepted(fwd).await);
        seen_accepted.get() >= BEFORE_KILL
    })
    .await;
    let durable = seen_accepted.get();
    assert!(ok, "only {durable} messages accepted:\n{}", fwd.log());
    durable
}

/// Kills the forwarder once its source has accepted `BEFORE_KILL` messages; restarts it with a
/// fresh intake and checks what arrives. `first_intake` is the intake during the kill.
async fn kill_while_streaming(first_intake: MockIntake, octet_counted: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut fwd = start(&config(dir.path(), &first_intake.url(), ""));
    let sender = stream_until_broken(fwd.syslog("tcp"), octet_counted);
    let durable = wait_accepted(&fwd).await;
    // Nothing may happen between the last look and the kill that would lower the count: it
    // only grows, so every message below `durable` is durable now.
    fwd.kill9();
    let sent = sender.join().expect("sender");
    assert!(
        sent as u64 >= durable,
        "{durable} accepted but only {sent} sent"
    );
    let first_log = fwd.log();
    assert!(!first_log.contains(KEY), "the intake key was logged");
    let delivered_before: Vec<ReceivedEvent> = first_intake.events();
    drop(first_intake);

    // The same configuration and queue, with an intake that works.
    let mock = start_mock().await;
    let fwd = start(&config(dir.path(), &mock.url(), ""));
    let before: std::collections::HashSet<usize> = delivered_before
        .iter()
        .filter_map(|e| number(&e.raw))
        .collect();
    let want: Vec<usize> = (0..durable as usize)
        .filter(|n| !before.contains(n))
        .collect();
    let arrived = wait_until_async(DEADLINE, || async {
        let have: std::collections::HashSet<usize> = mock
            .events()
            .iter()
            .filter_map(|e| number(&e.raw))
            .collect();
        want.iter().all(|n| have.contains(n))
    })
    .await;
    let events = mock.events();
    let mut seen: HashMap<usize, usize> = HashMap::new();
    for e in &events {
        assert_eq!(e.intake_key, KEY);
        let n = number(&e.raw).unwrap_or_else(|| panic!("not a message of ours: {:?}", e.raw));
        assert_eq!(e.raw, message(n), "message {n} garbled");
        *seen.entry(n).or_default() += 1;
    }
    if !arrived {
        let missing: Vec<&usize> = want.iter().filter(|n| !seen.contains_key(n)).collect();
        panic!(
            "{} of the {durable} messages accepted before the kill never arrived (first {:?}; {} \
             delivered before the kill, {} after)\nbefore the kill:\n{first_log}\nafter:\n{}",
            missing.len(),
            missing.first(),
            before.len(),
            events.len(),
            fwd.log()
        );
    }
    fwd.wait_drained().await;
    // Everything is delivered now: count again.
    let events = mock.events();
    let mut seen: HashMap<usize, usize> = HashMap::new();
    for e in &events {
        *seen.entry(number(&e.raw).unwrap()).or_default() += 1;
    }
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    assert_eq!(duplicates, 0, "duplicates at the fresh intake");
    let phantoms: Vec<&usize> = seen.keys().filter(|&&n| n >= sent).collect();
    assert!(phantoms.is_empty(), "never sent: {phantoms:?}");
    // Delivered before the kill and again after: a delivery retry (the answer was lost with
    // the process); bounded by what was on the wire.
    let again = seen.keys().filter(|n| before.contains(n)).count();
    eprintln!(
        "accepted before the kill: {durable}, sent: {sent}, delivered before: {}, after: {}, \
         delivered again after the restart: {again}",
        before.len(),
        seen.len()
    );
    assert!(!fwd.log().contains(KEY), "the intake key was logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_with_the_intake_down_loses_nothing_accepted_newline_framing() {
    kill_while_streaming(refusing_intake().await, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_with_the_intake_down_loses_nothing_accepted_octet_counted() {
    kill_while_streaming(refusing_intake().await, true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_with_a_slow_intake_loses_nothing_accepted() {
    let mock = start_mock().await;
    mock.set_faults(FaultConfig {
        delay_ms: 200,
        ..FaultConfig::default()
    });
    kill_while_streaming(mock, true).await;
}

/// A clean stop (SIGTERM) while one connection streams, one batch being made durable while
/// the next is read: whatever the source read is stored before it lets go, in order. After a
/// restart the intake gets the messages 0..N with no gap and none twice (a gap would be a
/// batch read and dropped, or stored out of turn), N at least what was accepted before the
/// stop and at most what was sent.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_while_streaming_stores_what_was_read_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let down = refusing_intake().await;
    let mut fwd = start(&config(dir.path(), &down.url(), ""));
    let sender = stream_until_broken(fwd.syslog("tcp"), false);
    let durable = wait_accepted(&fwd).await;
    let exit = fwd.terminate();
    let first_log = fwd.log();
    assert!(exit.success(), "{exit:?}:\n{first_log}");
    assert!(
        !first_log.contains("not stored"),
        "messages read were not stored:\n{first_log}"
    );
    let sent = sender.join().expect("sender");
    drop(down);

    let mock = start_mock().await;
    let fwd = start(&config(dir.path(), &mock.url(), ""));
    fwd.wait_drained().await;
    let mut numbers: Vec<usize> = mock
        .events()
        .iter()
        .map(|e| number(&e.raw).unwrap_or_else(|| panic!("not ours: {:?}", e.raw)))
        .collect();
    numbers.sort_unstable();
    let n = numbers.len();
    assert!(
        numbers.iter().copied().eq(0..n),
        "not the messages 0..{n} once each (first wrong at {:?})",
        numbers.iter().enumerate().find(|(i, m)| i != *m)
    );
    assert!(
        n as u64 >= durable && n <= sent,
        "{n} delivered, {durable} accepted before the stop, {sent} sent"
    );
}
