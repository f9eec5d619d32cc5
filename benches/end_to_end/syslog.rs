//! The syslog phase: messages over TCP (1, 8 and 1,000 connections) and UDP into the syslog
//! source, through the queue, to the mock intake; and what 1,000 idle TCP connections cost
//! in memory.
//!
//! Each cell runs a fresh forwarder with one TCP and one UDP syslog source. The client sends
//! 200-byte lines (the same pseudo-random access-log lines as the HTTP phases, with a syslog
//! header), newline-framed, built before the clock starts, as fast as the sockets take them;
//! the figure is from the first byte sent to the last event acknowledged by the mock.
//! Forwarder CPU is read from `/proc/PID/stat`, peak RSS from `VmHWM`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::client::event_text;
use crate::common::MockIntake;
use crate::phases::{cpu_per_million, rate, start_forwarder, stop_forwarder, wait_accepted};
use crate::probe::{compressed_reads, cpu_secs, proc_status_bytes, with_peak_queued};
use crate::report::{compressed_reads_row, mib, row, Row};
use crate::{deadline_for, KEY};

/// One row of the phase.
pub struct Cell {
    pub name: &'static str,
    pub udp: bool,
    pub connections: usize,
    pub events: u64,
}

/// The cells, `scale` times their event counts (`E2E_SYSLOG_SCALE`); only those named in
/// `E2E_SYSLOG_CELLS` (comma-separated, e.g. `tcp x1000,udp x1`) if it is set.
pub fn cells(scale: f64) -> Vec<Cell> {
    let only: Option<Vec<String>> = std::env::var("E2E_SYSLOG_CELLS")
        .ok()
        .map(|t| t.split(',').map(|c| c.trim().to_owned()).collect());
    all_cells(scale)
        .into_iter()
        .filter(|c| only.as_ref().is_none_or(|o| o.iter().any(|n| n == c.name)))
        .collect()
}

fn all_cells(scale: f64) -> Vec<Cell> {
    let n = |events: f64| ((events * scale) as u64).max(1000);
    vec![
        Cell {
            name: "tcp x1",
            udp: false,
            connections: 1,
            events: n(1_000_000.0),
        },
        Cell {
            name: "tcp x8",
            udp: false,
            connections: 8,
            events: n(2_000_000.0),
        },
        Cell {
            name: "tcp x1000",
            udp: false,
            connections: 1000,
            events: n(1_000_000.0),
        },
        Cell {
            name: "udp x1",
            udp: true,
            connections: 1,
            events: n(300_000.0),
        },
    ]
}

pub struct CellReport {
    pub name: &'static str,
    pub sent: u64,
    pub delivered: u64,
    pub elapsed: Duration,
    pub cpu: f64,
    pub peak_rss: u64,
    /// Compressed chunks delivery read from memory, and decompressed from the store.
    pub compressed_reads: Option<(f64, f64)>,
    /// The most events the forwarder held queued at once during the cell.
    pub peak_queued: u64,
    pub kernel_drops: u64,
}

pub struct Idle {
    pub connections: usize,
    pub rss_before: u64,
    pub rss_after: u64,
}

fn write_config(dir: &Path, intake_url: &str) -> std::path::PathBuf {
    let path = dir.join("forwarder.toml");
    let extra = std::env::var("E2E_QUEUE_CONFIG").unwrap_or_default();
    let tcp_extra = std::env::var("E2E_SYSLOG_TCP_CONFIG").unwrap_or_default();
    let text = format!(
        r#"
[queue]
path = "{queue}"
{extra}

[intake]
url = "{intake_url}"

[[source]]
type = "syslog"
listen = "tcp://127.0.0.1:0"
intake_key = "{KEY}"
max_connections = 2048
{tcp_extra}

[[source]]
type = "syslog"
listen = "udp://127.0.0.1:0"
intake_key = "{KEY}"

[admin]
listen = "127.0.0.1:0"

[log]
level = "info"
"#,
        queue = dir.join("queue").display(),
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// `count` newline-framed lines, one buffer per connection.
fn streams(connections: usize, events: u64) -> Vec<Vec<u8>> {
    let per = events / connections as u64;
    (0..connections)
        .map(|c| {
            let mut buf = Vec::with_capacity(per as usize * 220);
            for i in 0..per as usize {
                buf.extend_from_slice(b"<134>");
                buf.extend_from_slice(event_text(c, i).as_bytes());
                buf.push(b'\n');
            }
            buf
        })
        .collect()
}

pub async fn run(cells: &[Cell], ticks: f64) -> (Vec<CellReport>, Idle) {
    let mut reports = Vec::new();
    for cell in cells {
        println!(
            "syslog: {} ({} events, {} connections)",
            cell.name, cell.events, cell.connections
        );
        reports.push(run_cell(cell, ticks).await);
    }
    (reports, idle(1000).await)
}

async fn run_cell(cell: &Cell, ticks: f64) -> CellReport {
    let dir = tempfile::tempdir().expect("tempdir");
    let mock = MockIntake::start_count_only(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("mock");
    let mut fwd = start_forwarder(&write_config(dir.path(), &mock.url()));
    let pid = fwd.pid();
    let data = streams(cell.connections, cell.events);
    let sent = data
        .iter()
        .map(|d| d.iter().filter(|&&b| b == b'\n').count() as u64)
        .sum();
    let cpu0 = cpu_secs(&pid.to_string(), ticks);
    let started = Instant::now();
    let within = deadline_for(sent);
    let ((complete, elapsed), peak_queued) = with_peak_queued(fwd.admin, async {
        if cell.udp {
            on_own_runtime(send_udp(fwd.syslog("udp"), data)).await;
            // What the kernel dropped never comes: done once the rest is delivered (the drop
            // count is read every second, so the time is that of the last event seen to
            // arrive).
            let last = std::cell::Cell::new((0, started.elapsed()));
            let done = crate::common::wait_until_async(within, || async {
                let accepted = mock.stats().accepted_events;
                if accepted > last.get().0 {
                    last.set((accepted, started.elapsed()));
                }
                accepted + kernel_drops(&fwd.status().await) >= sent
            })
            .await;
            (done, last.get().1)
        } else {
            on_own_runtime(send_tcp(fwd.syslog("tcp"), data)).await;
            let done = wait_accepted(&mock, sent, within).await;
            (done, started.elapsed())
        }
    })
    .await;
    let cpu = cpu_secs(&pid.to_string(), ticks) - cpu0;
    let delivered = mock.stats().accepted_events;
    let status = fwd.status().await;
    let kernel_drops = kernel_drops(&status);
    if !complete && !cell.udp {
        println!(
            "syslog {}: only {delivered} of {sent} delivered within {within:?}; sources: {}",
            cell.name, status["syslog_sources"]
        );
    }
    let peak_rss = proc_status_bytes(pid, "VmHWM:");
    let compressed_reads = compressed_reads(fwd.admin).await;
    stop_forwarder(&mut fwd);
    mock.shutdown().await;
    CellReport {
        name: cell.name,
        sent,
        delivered,
        elapsed,
        cpu,
        peak_rss,
        kernel_drops,
        compressed_reads,
        peak_queued,
    }
}

/// Datagrams the kernel dropped at the syslog sources, as `/status` says.
fn kernel_drops(status: &serde_json::Value) -> u64 {
    status["syslog_sources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["kernel_dropped_datagrams"].as_u64())
        .sum()
}

/// Runs the senders on a thread and runtime of their own. On the bench's runtime, a thousand
/// sender tasks left the mock intake (which runs there too) about one turn in a thousand, so
/// its answers, and with them delivery, were slowed by the senders, which an intake on
/// another machine is not.
async fn on_own_runtime(senders: impl std::future::Future<Output = ()> + Send + 'static) {
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the senders' runtime")
            .block_on(senders)
    })
    .await
    .expect("senders");
}

async fn send_tcp(addr: SocketAddr, data: Vec<Vec<u8>>) {
    let mut tasks = tokio::task::JoinSet::new();
    for stream in data {
        tasks.spawn(async move {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            tcp.write_all(&stream).await.expect("send");
            tcp.shutdown().await.expect("shutdown");
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("sender");
    }
}

/// One datagram a line, as fast as the socket takes them (drops are the kernel's, counted).
async fn send_udp(addr: SocketAddr, data: Vec<Vec<u8>>) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let socket = Arc::new(socket);
    for stream in data {
        for line in stream.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            socket.send_to(line, addr).await.expect("send");
        }
    }
}

/// RSS of a forwarder before and after `connections` idle TCP connections are opened.
async fn idle(connections: usize) -> Idle {
    println!("syslog: {connections} idle connections");
    let dir = tempfile::tempdir().expect("tempdir");
    let mock = MockIntake::start_count_only(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("mock");
    let mut fwd = start_forwarder(&write_config(dir.path(), &mock.url()));
    let pid = fwd.pid();
    let addr = fwd.syslog("tcp");
    // One message first, so that everything a first message brings is in the baseline.
    let mut first = tokio::net::TcpStream::connect(addr).await.expect("connect");
    first.write_all(b"<13>warm up\n").await.expect("send");
    assert!(wait_accepted(&mock, 1, Duration::from_secs(30)).await);
    let rss_before = proc_status_bytes(pid, "VmRSS:");
    let mut open = Vec::new();
    for _ in 0..connections {
        open.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    let all_open = crate::common::wait_until_async(Duration::from_secs(60), || async {
        fwd.status().await["syslog_sources"][0]["open_connections"].as_u64()
            >= Some(connections as u64 + 1)
    })
    .await;
    assert!(all_open, "the idle connections were not all accepted");
    let rss_after = proc_status_bytes(pid, "VmRSS:");
    drop(open);
    stop_forwarder(&mut fwd);
    mock.shutdown().await;
    Idle {
        connections,
        rss_before,
        rss_after,
    }
}

pub fn rows(cells: &[CellReport], idle: &Idle, rows: &mut Vec<Row>) {
    for c in cells {
        let r = rate(c.delivered, c.elapsed);
        let per_million = cpu_per_million(c.cpu, c.delivered);
        let (rate_target, cpu_target, ok) = if c.name.starts_with("tcp") {
            (">= 500,000/s", "<= 2", Some(r >= 500_000.0))
        } else {
            ("", "", None)
        };
        rows.push(row(
            format!("syslog {}: events/s in -> intake", c.name),
            format!("{r:.0}"),
            rate_target,
            ok,
        ));
        rows.push(row(
            format!("syslog {}: forwarder CPU-s per million events", c.name),
            format!("{per_million:.2}"),
            cpu_target,
            (!cpu_target.is_empty()).then_some(per_million <= 2.0),
        ));
        rows.push(row(
            format!("syslog {}: peak RSS", c.name),
            mib(c.peak_rss),
            "",
            None,
        ));
        compressed_reads_row(&format!("syslog {}", c.name), c.compressed_reads, rows);
        rows.push(row(
            format!("syslog {}: most events queued at once", c.name),
            c.peak_queued.to_string(),
            "",
            None,
        ));
        if c.name.starts_with("udp") {
            rows.push(row(
                format!("syslog {}: delivered / sent (kernel drops)", c.name),
                format!("{} / {} ({})", c.delivered, c.sent, c.kernel_drops),
                "",
                None,
            ));
        }
    }
    let added = idle.rss_after.saturating_sub(idle.rss_before);
    rows.push(row(
        format!(
            "syslog: RSS added by {} idle TCP connections",
            idle.connections
        ),
        mib(added),
        "<= 20 MiB",
        Some(added <= 20 << 20),
    ));
}
