//! The syslog source over TLS, with certificates made at test time (rcgen): a CA, the
//! forwarder's certificate, a client certificate signed by that CA and one signed by another
//! CA. Senders: Debian's rsyslog with `rsyslog-gnutls` (`omfwd` with the `gtls` stream driver,
//! octet-counted, checking the forwarder's name) as a real relay, and a rustls client. Checks
//! that messages over `tls://` arrive exactly once; that with `tls_client_ca` a client without
//! a certificate, or with one of another CA, is refused (nothing stored, counted in
//! `tls_handshake_failures`) while one signed by the CA, rsyslog included, gets through; and
//! that a plain-TCP client on the TLS port stores nothing and is counted as a failed handshake.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const KEY: &str = "syslog-tls-intake-key-0001";

/// PEM files of one test run.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

fn make_ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).unwrap();
    (Issuer::new(params, key), cert.pem())
}

/// A certificate for `names` signed by `issuer`: (certificate PEM, key PEM).
fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(names.clone()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, &names[0]);
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// ca.pem, server.pem/.key (localhost, 127.0.0.1), client.pem/.key (signed by ca), and
/// rogue-client.pem/.key (signed by another CA).
fn make_pki() -> Pki {
    let pki = Pki {
        dir: tempfile::tempdir().unwrap(),
    };
    let write = |name: &str, text: &str| std::fs::write(pki.path(name), text).unwrap();
    let (ca, ca_pem) = make_ca("sekoia-forwarder test CA");
    write("ca.pem", &ca_pem);
    let (cert, key) = leaf(
        &ca,
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    write("server.pem", &cert);
    write("server.key", &key);
    let (cert, key) = leaf(&ca, &["test-client"], ExtendedKeyUsagePurpose::ClientAuth);
    write("client.pem", &cert);
    write("client.key", &key);
    let (rogue, _) = make_ca("another CA");
    let (cert, key) = leaf(
        &rogue,
        &["rogue-client"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    write("rogue-client.pem", &cert);
    write("rogue-client.key", &key);
    pki
}

/// A forwarder with one `tls://` syslog source; `mutual`: with `tls_client_ca`.
fn tls_forwarder(mock: &MockIntake, pki: &Pki, mutual: bool) -> (Forwarder, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let client_ca = if mutual {
        format!("tls_client_ca = \"{}\"", pki.path("ca.pem").display())
    } else {
        String::new()
    };
    let sources = format!(
        r#"
[[source]]
type = "syslog"
listen = "tls://127.0.0.1:0"
intake_key_env = "SYSLOG_TEST_KEY"
tls_cert = "{cert}"
tls_key = "{key}"
{client_ca}
"#,
        cert = pki.path("server.pem").display(),
        key = pki.path("server.key").display(),
    );
    let config = write_config(dir.path(), &mock.url(), "", &sources);
    let fwd = Forwarder::start_with_env(&config, &[("SYSLOG_TEST_KEY", KEY)]);
    (fwd, dir)
}

/// The `/status` counters of the (only) TLS source.
async fn tls_status(fwd: &Forwarder) -> serde_json::Value {
    let status = fwd.status().await;
    status["syslog_sources"]
        .as_array()
        .unwrap_or_else(|| panic!("no syslog_sources in {status}"))
        .iter()
        .find(|s| s["listen"].as_str().unwrap_or("").starts_with("tls://"))
        .unwrap_or_else(|| panic!("no tls source in {status}"))
        .clone()
}

/// Waits until the TLS source's counter `name` is `want` and no connection is open.
async fn wait_counter(fwd: &Forwarder, name: &str, want: u64) -> serde_json::Value {
    let ok = wait_until_async(DEADLINE, || async {
        let s = tls_status(fwd).await;
        s[name].as_u64() == Some(want) && s["open_connections"].as_u64() == Some(0)
    })
    .await;
    let s = tls_status(fwd).await;
    assert!(ok, "{name} never became {want}: {s}\n{}", fwd.log());
    s
}

fn texts(tag: &str, n: usize) -> Vec<String> {
    let run = std::process::id();
    (0..n)
        .map(|i| format!("<156>1 - - relaytest - - - {tag} message {i:04} of run {run}"))
        .collect()
}

/// Waits until each of `lines` arrived (as its text), then checks each arrived once, with the
/// key, and that nothing else did.
async fn assert_arrived_once(mock: &MockIntake, fwd: &Forwarder, lines: &[String], why: &str) {
    let bodies: Vec<&str> = lines
        .iter()
        .map(|l| l.split_once(" - - - ").unwrap().1)
        .collect();
    let ok = wait_until_async(DEADLINE, || async {
        let events = mock.events();
        bodies
            .iter()
            .all(|b| events.iter().any(|e| e.raw.contains(b)))
    })
    .await;
    assert!(
        ok,
        "{why}: not every message arrived ({} events); status {}\n{}",
        mock.events().len(),
        fwd.status().await,
        fwd.log()
    );
    fwd.wait_drained().await;
    let events = mock.events();
    for b in &bodies {
        let n = events.iter().filter(|e| e.raw.contains(b)).count();
        assert_eq!(n, 1, "{why}: {b:?} arrived {n} times");
    }
    assert_eq!(events.len(), lines.len(), "{why}: events no one sent");
    for e in &events {
        assert_eq!(e.intake_key, KEY);
        assert!(e.raw.starts_with("<156>"), "{why}: {:?}", e.raw);
    }
}

// ---------------------------------------------------------------------------------------------
// A rustls client

fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A client that trusts ca.pem and presents `identity` (`client` or `rogue-client`), if any.
fn connector(pki: &Pki, identity: Option<&str>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&pki.path("ca.pem")) {
        roots.add(c).unwrap();
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(name) => {
            let chain = certs(&pki.path(&format!("{name}.pem")));
            let key = PrivateKeyDer::from_pem_file(pki.path(&format!("{name}.key"))).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

fn octet_counted(lines: &[String]) -> Vec<u8> {
    lines
        .iter()
        .flat_map(|l| format!("{} {l}", l.len()).into_bytes())
        .collect()
}

/// Sends `lines` octet-counted over TLS and closes with close_notify; the error, if the
/// handshake or the exchange failed.
async fn send_tls(
    fwd: &Forwarder,
    pki: &Pki,
    identity: Option<&str>,
    lines: &[String],
) -> Result<(), String> {
    let tcp = tokio::net::TcpStream::connect(fwd.syslog("tls"))
        .await
        .unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector(pki, identity)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // TLS 1.3: the client is done with its handshake before the server has checked the
    // client's certificate; a refusal comes as an alert on the next read.
    tls.write_all(&octet_counted(lines))
        .await
        .map_err(|e| format!("write: {e}"))?;
    tls.flush().await.map_err(|e| format!("flush: {e}"))?;
    tls.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let mut rest = Vec::new();
    match tls.read_to_end(&mut rest).await {
        Ok(_) if rest.is_empty() => Ok(()),
        Ok(_) => Err(format!("the server sent {rest:?}")),
        // The forwarder closes without a close_notify of its own (see
        // `the_server_answers_close_notify`): that is the end of an accepted stream here.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(()),
        Err(e) => Err(format!("read: {e}")),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_refuses_clients_without_a_certificate_of_the_ca() {
    let pki = make_pki();
    let mock = start_mock().await;
    let (fwd, _dir) = tls_forwarder(&mock, &pki, true);

    let refused = texts("no-certificate", 10);
    let err = send_tls(&fwd, &pki, None, &refused).await;
    assert!(err.is_err(), "a client without a certificate got through");
    let s = wait_counter(&fwd, "tls_handshake_failures", 1).await;
    assert_eq!(s["accepted_events"], 0, "{s}");

    let rogue = texts("rogue", 10);
    let err = send_tls(&fwd, &pki, Some("rogue-client"), &rogue).await;
    assert!(err.is_err(), "a client of another CA got through");
    let s = wait_counter(&fwd, "tls_handshake_failures", 2).await;
    assert_eq!(s["accepted_events"], 0, "{s}");

    let good = texts("client-certificate", 100);
    send_tls(&fwd, &pki, Some("client"), &good)
        .await
        .unwrap_or_else(|e| panic!("a client of the CA was refused: {e}\n{}", fwd.log()));
    assert_arrived_once(&mock, &fwd, &good, "rustls client with a certificate").await;
    let s = wait_counter(&fwd, "accepted_events", 100).await;
    assert_eq!(s["tls_handshake_failures"], 2, "{s}");
    assert_eq!(s["connections"], 3, "{s}");
    // Nothing of the refused clients.
    let events = mock.events();
    assert!(
        !events
            .iter()
            .any(|e| e.raw.contains("no-certificate") || e.raw.contains("rogue")),
        "a refused client's message was stored"
    );
    assert!(!fwd.log().contains(KEY), "the intake key was logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_tcp_client_on_the_tls_port_stores_nothing() {
    let pki = make_pki();
    let mock = start_mock().await;
    let (fwd, _dir) = tls_forwarder(&mock, &pki, false);
    let mut tcp = tokio::net::TcpStream::connect(fwd.syslog("tls"))
        .await
        .unwrap();
    let lines = texts("plain-tcp", 10);
    let mut bytes = octet_counted(&lines);
    bytes.extend_from_slice(b"<13>a line of plain syslog\n");
    // The server may close as soon as it sees that this is not TLS: a failed write is fine.
    let _ = tcp.write_all(&bytes).await;
    let _ = tcp.shutdown().await;
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest).await;
    let s = wait_counter(&fwd, "tls_handshake_failures", 1).await;
    assert_eq!(s["accepted_events"], 0, "{s}");
    assert_eq!(s["connections"], 1, "{s}");
    // And the port still serves TLS.
    let good = texts("after-plain", 20);
    send_tls(&fwd, &pki, None, &good)
        .await
        .unwrap_or_else(|e| panic!("TLS after a plain client: {e}\n{}", fwd.log()));
    assert_arrived_once(&mock, &fwd, &good, "TLS after a plain client").await;
    assert!(!fwd.log().contains(KEY), "the intake key was logged");
}

// ---------------------------------------------------------------------------------------------
// rsyslog with rsyslog-gnutls as a real TLS relay

/// rsyslogd in the foreground: an `imtcp` input (plain TCP, ephemeral port, its port file
/// says which) relayed with `omfwd` over TLS (gtls, octet-counted) to `target`, checking that
/// the server is `localhost` signed by ca.pem; presenting client.pem when `client_cert`.
fn rsyslog_tls(
    pki: &Pki,
    target: u16,
    client_cert: bool,
) -> Option<(Relay, u16, tempfile::TempDir)> {
    let bin = find_program("rsyslogd", &[])?;
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let port_file = dir.path().join("imtcp.port");
    let identity = if client_cert {
        format!(
            r#"DefaultNetstreamDriverCertFile="{}" DefaultNetstreamDriverKeyFile="{}""#,
            pki.path("client.pem").display(),
            pki.path("client.key").display()
        )
    } else {
        String::new()
    };
    // The default stream driver stays plain TCP (the input); only the action uses gtls.
    let text = format!(
        r#"
global(workDirectory="{work}" DefaultNetstreamDriverCAFile="{ca}" {identity})
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="0" listenPortFileName="{port_file}" ruleset="relay")
ruleset(name="relay") {{
  action(type="omfwd" target="127.0.0.1" port="{target}" protocol="tcp"
         TCP_Framing="octet-counted" StreamDriver="gtls" StreamDriverMode="1"
         StreamDriverAuthMode="x509/name" StreamDriverPermittedPeers="localhost")
}}
"#,
        work = work.display(),
        ca = pki.path("ca.pem").display(),
        port_file = port_file.display(),
    );
    let conf = dir.path().join("rsyslog.conf");
    std::fs::write(&conf, text).unwrap();
    let conf_arg = conf.to_str().unwrap().to_owned();
    let pid_arg = dir.path().join("rsyslogd.pid").to_str().unwrap().to_owned();
    let mut relay = Relay::spawn(
        "rsyslogd",
        &bin,
        &["-n", "-f", &conf_arg, "-i", &pid_arg],
        &[],
        dir.path().join("relay.log"),
    );
    let end = Instant::now() + DEADLINE;
    let port = loop {
        relay.assert_alive();
        let port = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|p| p.trim().parse::<u16>().ok())
            .filter(|&p| p != 0);
        if let Some(port) = port {
            break port;
        }
        assert!(
            Instant::now() < end,
            "rsyslogd wrote no port file:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    Some((relay, port, dir))
}

/// Sends `lines` to `port` with `logger --tcp` (one message per line of its input).
fn logger_tcp(port: u16, lines: &[String]) {
    let port = port.to_string();
    let mut child = Command::new("logger")
        .args([
            "--tcp",
            "--server",
            "127.0.0.1",
            "--port",
            &port,
            "--rfc5424",
        ])
        .args(["--tag", "relaytest", "--priority", "local3.warning"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("logger (util-linux) is needed");
    {
        let mut stdin = child.stdin.take().unwrap();
        for line in lines {
            // logger makes its own header: only the text.
            writeln!(stdin, "{}", line.split_once(" - - - ").unwrap().1).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "logger: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn rsyslog_over_tls(mutual: bool) {
    let pki = make_pki();
    let mock = start_mock().await;
    let (fwd, _dir) = tls_forwarder(&mock, &pki, mutual);
    let Some((mut relay, port, _relay_dir)) = rsyslog_tls(&pki, fwd.syslog("tls").port(), mutual)
    else {
        return;
    };
    let lines = texts(
        if mutual {
            "rsyslog-mtls"
        } else {
            "rsyslog-tls"
        },
        200,
    );
    logger_tcp(port, &lines);
    let ok = wait_until_async(DEADLINE, || async { mock.events().len() >= lines.len() }).await;
    if !ok {
        relay.assert_alive();
        panic!(
            "rsyslog over TLS: {} of {} events; status {}\nforwarder:\n{}\nrsyslogd:\n{}",
            mock.events().len(),
            lines.len(),
            fwd.status().await,
            fwd.log(),
            relay.log()
        );
    }
    assert_arrived_once(&mock, &fwd, &lines, "rsyslog over TLS").await;
    let s = tls_status(&fwd).await;
    assert_eq!(s["accepted_events"], 200, "{s}");
    assert_eq!(s["tls_handshake_failures"], 0, "{s}");
    assert_eq!(s["connections"], 1, "{s}");
    assert_eq!(s["framing_errors"], 0, "{s}");
    assert!(!fwd.log().contains(KEY), "the intake key was logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn rsyslog_gtls_relays_octet_counted_over_tls() {
    rsyslog_over_tls(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rsyslog_gtls_with_a_client_certificate_gets_through_mutual_tls() {
    rsyslog_over_tls(true).await;
}

/// RFC 5425, 4.4: "Once the transport receiver gets a close_notify from the transport sender,
/// it MUST reply with a close_notify". (It closed the TCP connection without one: the
/// client read an unexpected EOF.)
#[tokio::test(flavor = "multi_thread")]
async fn the_server_answers_close_notify() {
    let pki = make_pki();
    let mock = start_mock().await;
    let (fwd, _dir) = tls_forwarder(&mock, &pki, false);
    let tcp = tokio::net::TcpStream::connect(fwd.syslog("tls"))
        .await
        .unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector(&pki, None).connect(name, tcp).await.unwrap();
    tls.write_all(&octet_counted(&texts("close-notify", 1)))
        .await
        .unwrap();
    tls.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let read = tls.read_to_end(&mut rest).await;
    assert!(read.is_ok(), "{read:?}");
}
