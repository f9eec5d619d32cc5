//! Small requests: the same client sends requests of 1 to 1,000 events over 8 or 64 keep-alive
//! connections, first straight to a mock intake, then through a fresh forwarder to one, in the
//! same run. The figure that counts is the ratio of the two rates: the machine is shared and
//! noisy, and a ratio taken minutes apart on the same machine is steadier than either rate.
//!
//! The straight-to-the-mock baseline runs, by default, against `sekoia-forwarder mock-intake
//! --quiet` in a process of its own, as the forwarder runs in its own: a mock inside the bench
//! process answers without a process boundary and makes a baseline no separate server could
//! reach. `E2E_SMALL_BASELINE=in-process` uses the in-process mock instead (both are printed).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::{http_client, send_all, Bodies};
use crate::common::MockIntake;
use crate::deadline_for;
use crate::phases::{
    cpu_per_million, rate, send_through, start_forwarder, stop_forwarder, wait_queue_empty,
    write_config, Delivered, SETTLE,
};
use crate::probe::{cpu_secs, metric, write_bytes};

/// One request size and connection count.
#[derive(Debug, Clone, Copy)]
pub struct Cell {
    pub per_request: usize,
    pub connections: usize,
    pub events: u64,
}

/// The cells of the table, with event counts that take a few seconds each at today's
/// rates; `E2E_SMALL_SCALE` multiplies them, and `E2E_SMALL_CELLS` (e.g. `1x8,100x8`: events
/// per request x connections) keeps only some of them, to measure one change quickly.
pub fn cells(scale: f64) -> Vec<Cell> {
    let only = std::env::var("E2E_SMALL_CELLS").unwrap_or_default();
    let wanted = |c: &Cell| {
        only.is_empty()
            || only
                .split(',')
                .any(|w| w.trim() == format!("{}x{}", c.per_request, c.connections))
    };
    all_cells(scale).into_iter().filter(wanted).collect()
}

fn all_cells(scale: f64) -> Vec<Cell> {
    let cell = |per_request: usize, connections: usize, events: u64| {
        let events = ((events as f64 * scale) as u64).max(per_request as u64);
        Cell {
            per_request,
            connections,
            // Whole requests.
            events: events.div_ceil(per_request as u64) * per_request as u64,
        }
    };
    vec![
        cell(1, 8, 40_000),
        cell(1, 64, 60_000),
        cell(10, 8, 200_000),
        cell(100, 8, 1_000_000),
        cell(1000, 8, 2_000_000),
    ]
}

#[derive(Debug)]
pub struct CellReport {
    pub cell: Cell,
    /// Events/s acknowledged by the mock when the client sends to it directly.
    pub direct_rate: f64,
    /// CPU-seconds per million events of the mock alone (a server that only answers), when it
    /// runs in its own process: the floor under the forwarder's own figure.
    pub direct_cpu_per_million: Option<f64>,
    /// Events/s from the first send to the last event acknowledged by the mock, through the
    /// forwarder.
    pub forwarded_rate: f64,
    pub cpu_per_million: f64,
    /// Bytes the forwarder wrote to the disk per payload byte.
    pub written_per_payload: f64,
    pub duplicates: u64,
    /// Events appended per queue commit (appends and acknowledgements), from `/metrics`.
    pub events_per_commit: Option<f64>,
    pub complete: bool,
}

impl CellReport {
    pub fn ratio(&self) -> f64 {
        self.forwarded_rate / self.direct_rate.max(1e-9)
    }
}

pub async fn run(cells: &[Cell], ticks: f64) -> Vec<CellReport> {
    let baseline = match std::env::var("E2E_SMALL_BASELINE") {
        Ok(v) if v == "in-process" => "a count-only mock in the bench process",
        _ => "`mock-intake --quiet` in its own process",
    };
    println!("small: the baseline is the client straight to {baseline}");
    let mut reports = Vec::new();
    for cell in cells {
        println!(
            "small: {} events in requests of {}, {} connections",
            cell.events, cell.per_request, cell.connections
        );
        let bodies = Bodies::new(cell.per_request);
        let direct = direct(cell, bodies.clone(), ticks).await;
        let report = forwarded(cell, bodies, direct, ticks).await;
        println!(
            "small: direct {:.0} ev/s, forwarded {:.0} ev/s ({:.2})",
            report.direct_rate,
            report.forwarded_rate,
            report.ratio()
        );
        reports.push(report);
    }
    reports
}

/// What the client reached straight to the mock.
#[derive(Debug, Clone, Copy)]
struct Direct {
    rate: f64,
    cpu_per_million: Option<f64>,
}

/// The client straight to a mock intake: in a process of its own (whose CPU is measured)
/// unless `E2E_SMALL_BASELINE=in-process`.
async fn direct(cell: &Cell, bodies: Arc<Bodies>, ticks: f64) -> Direct {
    let in_process = std::env::var("E2E_SMALL_BASELINE").is_ok_and(|v| v == "in-process");
    let deadline = Instant::now() + deadline_for(cell.events);
    if in_process {
        let mock = MockIntake::start_count_only(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("mock");
        let sent = send_all(&mock.url(), cell.events, cell.connections, bodies, deadline).await;
        assert!(!sent.timed_out, "small: the mock alone did not keep up");
        mock.shutdown().await;
        return Direct {
            rate: rate(sent.acked_events, sent.elapsed),
            cpu_per_million: None,
        };
    }
    let mut mock = tokio::task::block_in_place(MockProcess::start);
    let pid = mock.child.id().to_string();
    let cpu0 = cpu_secs(&pid, ticks);
    let sent = send_all(&mock.url, cell.events, cell.connections, bodies, deadline).await;
    assert!(!sent.timed_out, "small: the mock alone did not keep up");
    let cpu = cpu_secs(&pid, ticks) - cpu0;
    tokio::task::block_in_place(|| mock.stop());
    Direct {
        rate: rate(sent.acked_events, sent.elapsed),
        cpu_per_million: Some(cpu_per_million(cpu, sent.acked_events)),
    }
}

/// `sekoia-forwarder mock-intake --quiet --keep-events 0` in a process of its own.
struct MockProcess {
    child: std::process::Child,
    url: String,
}

impl MockProcess {
    fn start() -> MockProcess {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(crate::common::binary())
            .args(["mock-intake", "--quiet", "--keep-events", "0"])
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start mock-intake");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        // "mock intake listening on http://127.0.0.1:PORT"
        let url = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| {
                l.split_once("listening on ")
                    .map(|(_, url)| url.trim().to_owned())
            })
            .expect("mock-intake did not say where it listens");
        // Keep reading its stderr so that it never blocks on a full pipe.
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
        MockProcess { child, url }
    }

    fn stop(&mut self) {
        crate::common::signal(self.child.id(), "TERM");
        let _ = self.child.wait();
    }
}

/// The client through a fresh forwarder to a mock intake.
async fn forwarded(cell: &Cell, bodies: Arc<Bodies>, direct: Direct, ticks: f64) -> CellReport {
    let dir = tempfile::tempdir().expect("tempdir");
    let mock = MockIntake::start_count_only(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("mock");
    let config = write_config(dir.path(), &mock.url());
    let mut fwd = start_forwarder(&config);
    let pid = fwd.pid();
    let cpu0 = cpu_secs(&pid.to_string(), ticks);
    let written0 = write_bytes(pid);
    let Delivered {
        sent,
        complete,
        elapsed,
    } = send_through(&fwd, &mock, cell.events, cell.connections, bodies).await;
    let cpu = cpu_secs(&pid.to_string(), ticks) - cpu0;
    let drained = wait_queue_empty(fwd.admin, Duration::from_secs(60)).await;
    assert!(drained, "small: the queue did not drain");
    tokio::time::sleep(SETTLE).await;
    let written = write_bytes(pid) - written0;
    let commits = metric(&http_client(), fwd.admin, "queue_commits").await;
    stop_forwarder(&mut fwd);
    let delivered = mock.stats().accepted_events;
    mock.shutdown().await;
    CellReport {
        cell: *cell,
        direct_rate: direct.rate,
        direct_cpu_per_million: direct.cpu_per_million,
        forwarded_rate: rate(sent.acked_events, elapsed),
        cpu_per_million: cpu_per_million(cpu, sent.acked_events),
        written_per_payload: written as f64 / Bodies::payload(sent.acked_events).max(1) as f64,
        duplicates: delivered.saturating_sub(sent.acked_events),
        // Appends and acknowledgements both commit; the figure is per event appended.
        events_per_commit: commits.map(|c| sent.acked_events as f64 / c.max(1.0)),
        complete,
    }
}
