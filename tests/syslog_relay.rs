//! The syslog source behind real relays: Debian's rsyslog (`omfwd` over TCP with octet-counted
//! and newline framing, and over UDP) and syslog-ng (`network(transport("tcp"))` and the
//! octet-counted RFC 5424 `syslog(transport("tcp"))` destination), each started by the test in
//! the foreground in a temporary directory, fed by util-linux `logger`, relaying to the real
//! forwarder binary, which delivers to the mock intake. Checks that every message arrives
//! exactly once, with the source's intake key, its text intact, and that the key is not logged.
//!
//! A missing relay skips its test loudly, except under `CI`, where it fails (`.ci/run`
//! installs them).

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const KEY: &str = "syslog-relay-intake-key-0001";

/// A forwarder with a UDP and a TCP syslog source (ephemeral ports), key from the environment.
fn syslog_forwarder(mock: &MockIntake) -> (Forwarder, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let sources = r#"
[[source]]
type = "syslog"
listen = "udp://127.0.0.1:0"
intake_key_env = "SYSLOG_TEST_KEY"

[[source]]
type = "syslog"
listen = "tcp://127.0.0.1:0"
intake_key_env = "SYSLOG_TEST_KEY"
"#;
    let config = write_config(dir.path(), &mock.url(), "", sources);
    let fwd = Forwarder::start_with_env(&config, &[("SYSLOG_TEST_KEY", KEY)]);
    (fwd, dir)
}

/// Runs `logger` to send `lines` (one message each, on its standard input) over TCP to `port`.
fn logger_tcp(port: u16, format: &str, lines: &[String]) {
    let port = port.to_string();
    let args = [
        "--tcp",
        "--server",
        "127.0.0.1",
        "--port",
        &port,
        format,
        "--tag",
        "relaytest",
        "--priority",
        "local3.warning",
    ];
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

fn texts(tag: &str, n: usize) -> Vec<String> {
    let run = std::process::id();
    (0..n)
        .map(|i| format!("{tag} message {i:04} of run {run}"))
        .collect()
}

/// Polls `f` (a blocking check) until it is true; false once `DEADLINE` passes.
fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + DEADLINE;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// The syslog source of `fwd` whose listen address starts with `scheme://`, from `/status`.
async fn source_status(fwd: &Forwarder, scheme: &str) -> serde_json::Value {
    let status = fwd.status().await;
    status["syslog_sources"]
        .as_array()
        .unwrap_or_else(|| panic!("no syslog_sources in {status}"))
        .iter()
        .find(|s| s["listen"].as_str().unwrap_or("").starts_with(scheme))
        .unwrap_or_else(|| panic!("no {scheme} source in {status}"))
        .clone()
}

/// Waits until every one of `lines` arrived, then checks that each arrived exactly once, with
/// the key, through the source `scheme`, and that nothing else arrived.
async fn assert_relayed(
    mock: &MockIntake,
    fwd: &Forwarder,
    relay: &mut Relay,
    scheme: &str,
    lines: &[String],
) {
    let arrived = wait_until_async(DEADLINE, || async {
        let events = mock.events();
        lines
            .iter()
            .all(|t| events.iter().any(|e| e.raw.contains(t.as_str())))
    })
    .await;
    let events = mock.events();
    if !arrived {
        relay.assert_alive();
        let missing: Vec<&String> = lines
            .iter()
            .filter(|t| !events.iter().any(|e| e.raw.contains(t.as_str())))
            .collect();
        panic!(
            "{} of {} messages did not arrive through {} (first {:?}); {} events; status {}\nforwarder:\n{}\n{}:\n{}",
            missing.len(),
            lines.len(),
            relay.name,
            missing.first(),
            events.len(),
            fwd.status().await,
            fwd.log(),
            relay.name,
            relay.log()
        );
    }
    // The source accepted exactly that many, so no extra or repeated message is still on its way.
    let source = source_status(fwd, scheme).await;
    assert_eq!(source["accepted_events"], lines.len(), "{source}");
    fwd.wait_drained().await;
    let events = mock.events();
    for line in lines {
        let n = events
            .iter()
            .filter(|e| e.raw.contains(line.as_str()))
            .count();
        assert_eq!(n, 1, "{line:?} arrived {n} times");
    }
    assert_eq!(
        events.len(),
        lines.len(),
        "events that were not sent: {:?}",
        events
            .iter()
            .filter(|e| !lines.iter().any(|l| e.raw.contains(l.as_str())))
            .map(|e| &e.raw)
            .take(3)
            .collect::<Vec<_>>()
    );
    for e in &events {
        assert_eq!(e.intake_key, KEY);
        // <156> = local3 (19) * 8 + warning (4): the relays keep the priority.
        assert!(e.raw.starts_with("<156>"), "{:?}", e.raw);
        assert!(e.raw.contains("relaytest"), "the tag is kept: {:?}", e.raw);
        assert!(
            !e.raw.ends_with('\n') && !e.raw.ends_with('\r'),
            "{:?}",
            e.raw
        );
    }
    assert_eq!(source["framing_errors"], 0, "{source}");
    assert!(!fwd.log().contains(KEY), "the intake key was logged");
}

// ---------------------------------------------------------------------------------------------
// rsyslog

/// rsyslogd in the foreground with only an `imtcp` input on an ephemeral port (its port file
/// says which) whose ruleset holds `actions`. No imuxsock, no imklog: nothing of the host's.
struct Rsyslog {
    relay: Relay,
    port: u16,
    _dir: tempfile::TempDir,
}

fn rsyslog(actions: &str) -> Option<Rsyslog> {
    let bin = find_program("rsyslogd", &[])?;
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let port_file = dir.path().join("imtcp.port");
    let conf = dir.path().join("rsyslog.conf");
    // The input has its own ruleset: rsyslog's own messages (start, stop) go to the default
    // ruleset, which has no action, so only what logger sent is relayed.
    let text = format!(
        r#"
global(workDirectory="{work}")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="0" listenPortFileName="{port_file}" ruleset="relay")
ruleset(name="relay") {{
{actions}
}}
"#,
        work = work.display(),
        port_file = port_file.display(),
    );
    std::fs::write(&conf, text).unwrap();
    let pid = dir.path().join("rsyslogd.pid");
    let conf_arg = conf.to_str().unwrap().to_owned();
    let pid_arg = pid.to_str().unwrap().to_owned();
    let mut relay = Relay::spawn(
        "rsyslogd",
        &bin,
        &["-n", "-f", &conf_arg, "-i", &pid_arg],
        &[],
        dir.path().join("relay.log"),
    );
    let mut port = None;
    let up = wait_until(|| {
        if !relay.alive() {
            return true;
        }
        port = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|p| p.trim().parse::<u16>().ok())
            .filter(|&p| p != 0);
        port.is_some()
    });
    relay.assert_alive();
    assert!(up, "rsyslogd wrote no port file:\n{}", relay.log());
    Some(Rsyslog {
        relay,
        port: port.unwrap(),
        _dir: dir,
    })
}

async fn rsyslog_relays(omfwd: &str, scheme: &str, tag: &str) {
    let mock = start_mock().await;
    let (fwd, _dir) = syslog_forwarder(&mock);
    let target = fwd.syslog(scheme);
    let action = format!(
        r#"action(type="omfwd" target="127.0.0.1" port="{}" {omfwd})"#,
        target.port()
    );
    let Some(mut rsyslog) = rsyslog(&action) else {
        return;
    };
    let lines = texts(tag, 200);
    logger_tcp(rsyslog.port, "--rfc5424", &lines);
    assert_relayed(&mock, &fwd, &mut rsyslog.relay, scheme, &lines).await;
    if scheme == "tcp" {
        let source = source_status(&fwd, "tcp").await;
        assert_eq!(source["connections"], 1, "one relay connection: {source}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rsyslog_omfwd_tcp_octet_counted() {
    rsyslog_relays(
        r#"protocol="tcp" TCP_Framing="octet-counted""#,
        "tcp",
        "rsyslog-octet",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rsyslog_omfwd_tcp_newline_framing() {
    rsyslog_relays(r#"protocol="tcp""#, "tcp", "rsyslog-lines").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rsyslog_omfwd_udp() {
    rsyslog_relays(r#"protocol="udp""#, "udp", "rsyslog-udp").await;
}

// ---------------------------------------------------------------------------------------------
// syslog-ng

/// Where syslog-ng is: on `PATH` (Debian's `syslog-ng-core`), or unpacked under /opt/syslog-ng
/// (`.ci/run` does that: syslog-ng-core and rsyslog conflict as packages, not as programs).
const SYSLOG_NG_UNPACKED: &str = "/opt/syslog-ng/usr/sbin/syslog-ng";

/// A port free at the time of asking (bound on port 0, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// syslog-ng in the foreground with a `network(transport("tcp"))` source on a free port and
/// `destination` as its only destination. Its persist file, pid file and control socket are in
/// a temporary directory. Another process may take the port between its choice and the bind:
/// syslog-ng then exits and is started again on another port.
fn syslog_ng(destination: &str) -> Option<(Relay, u16, tempfile::TempDir)> {
    let bin = find_program("syslog-ng", &[SYSLOG_NG_UNPACKED])?;
    // Unpacked outside /usr: its library and modules are beside it.
    let prefix: PathBuf = bin.ancestors().nth(3).unwrap().to_owned();
    let mut env = Vec::new();
    let mut module_arg = None;
    if prefix != Path::new("/") {
        let lib = prefix.join("usr/lib/syslog-ng");
        let modules = std::fs::read_dir(&lib)
            .unwrap_or_else(|e| panic!("{}: {e}", lib.display()))
            .map(|e| e.unwrap().path())
            .find(|p| p.join("libafsocket.so").is_file())
            .unwrap_or_else(|| panic!("no syslog-ng modules under {}", lib.display()));
        env.push(("LD_LIBRARY_PATH", lib.to_str().unwrap().to_owned()));
        module_arg = Some(format!("--module-path={}", modules.display()));
    }
    let version = Command::new(&bin)
        .arg("--version")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("syslog-ng --version");
    let version = String::from_utf8_lossy(&version.stdout);
    // "Config version: 3.35" is the oldest it takes; the installed one ("Installer-Version: 3.38.1").
    let config_version = version
        .lines()
        .find_map(|l| l.strip_prefix("Installer-Version: "))
        .map(|v| v.split('.').take(2).collect::<Vec<_>>().join("."))
        .unwrap_or_else(|| panic!("no version in {version}"));
    let dir = tempfile::tempdir().unwrap();
    for attempt in 0..5 {
        let port = free_port();
        let conf = dir.path().join("syslog-ng.conf");
        std::fs::write(
            &conf,
            format!(
                r#"@version: {config_version}
options {{ keep-hostname(yes); }};
source s_in {{ network(ip("127.0.0.1") port({port}) transport("tcp")); }};
destination d_out {{ {destination}; }};
log {{ source(s_in); destination(d_out); }};
"#
            ),
        )
        .unwrap();
        let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
        let mut args = vec![
            "-F".to_owned(),
            "-e".to_owned(),
            "-f".to_owned(),
            path("syslog-ng.conf"),
            format!("--persist-file={}", path("syslog-ng.persist")),
            format!("--pidfile={}", path("syslog-ng.pid")),
            format!("--control={}", path("syslog-ng.ctl")),
        ];
        args.extend(module_arg.clone());
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut relay = Relay::spawn(
            "syslog-ng",
            &bin,
            &args,
            &env,
            dir.path().join(format!("relay-{attempt}.log")),
        );
        // "syslog-ng starting up" comes once every source listens.
        let up = wait_until(|| !relay.alive() || relay.log().contains("syslog-ng starting up"));
        assert!(up, "syslog-ng did not start:\n{}", relay.log());
        if relay.alive() {
            return Some((relay, port, dir));
        }
        eprintln!(
            "syslog-ng did not start on port {port}, trying another:\n{}",
            relay.log()
        );
    }
    panic!("syslog-ng did not start in 5 tries")
}

async fn syslog_ng_relays(driver: &str, tag: &str) {
    let mock = start_mock().await;
    let (fwd, _dir) = syslog_forwarder(&mock);
    let target = fwd.syslog("tcp");
    let destination = format!(
        r#"{driver}("127.0.0.1" port({}) transport("tcp"))"#,
        target.port()
    );
    let Some((mut relay, port, _relay_dir)) = syslog_ng(&destination) else {
        return;
    };
    let lines = texts(tag, 200);
    logger_tcp(port, "--rfc3164", &lines);
    assert_relayed(&mock, &fwd, &mut relay, "tcp", &lines).await;
    if driver == "syslog" {
        // RFC 5424 (the version field after the priority), octet-counted on the wire.
        let events = mock.events();
        assert!(
            events.iter().all(|e| e.raw.starts_with("<156>1 ")),
            "{:?}",
            events[0].raw
        );
    }
    let source = source_status(&fwd, "tcp").await;
    assert_eq!(source["connections"], 1, "one relay connection: {source}");
}

#[tokio::test(flavor = "multi_thread")]
async fn syslog_ng_network_tcp() {
    syslog_ng_relays("network", "syslog-ng-network").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn syslog_ng_syslog_tcp_octet_counted_rfc5424() {
    syslog_ng_relays("syslog", "syslog-ng-syslog").await;
}
