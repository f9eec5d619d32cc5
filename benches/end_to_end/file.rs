//! The file phase: 200-byte lines written to a log file, tailed by the file source, through the
//! queue (each round of lines committed with the file's checkpoint), to the mock intake.
//!
//! Two cells, each with a fresh forwarder and a fresh file:
//! - **tail**: the forwarder follows an empty file; the bench appends the lines in 1 MiB writes
//!   as fast as the disk takes them; from the first write to the last event acknowledged by
//!   the mock (what a busy log costs the host);
//! - **backlog**: the file holds the lines before the forwarder starts (`read_from =
//!   "beginning"`): from the start of the process to the last event acknowledged (a catch-up
//!   after an outage of the forwarder, or a first start on an existing log).
//!
//! Forwarder CPU is read from `/proc/PID/stat`, peak RSS from `VmHWM`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::client::event_text;
use crate::common::MockIntake;
use crate::phases::{cpu_per_million, rate, start_forwarder, stop_forwarder, wait_accepted};
use crate::probe::{compressed_reads, cpu_secs, proc_status_bytes};
use crate::report::{compressed_reads_row, mib, row, Row};
use crate::{deadline_for, KEY};

pub struct CellReport {
    pub name: &'static str,
    pub lines: u64,
    pub delivered: u64,
    pub elapsed: Duration,
    pub cpu: f64,
    pub peak_rss: u64,
    /// Compressed chunks delivery read from memory, and decompressed from the store.
    pub compressed_reads: Option<(f64, f64)>,
}

fn write_config(dir: &Path, log: &Path, intake_url: &str) -> PathBuf {
    let path = dir.join("forwarder.toml");
    let extra = std::env::var("E2E_QUEUE_CONFIG").unwrap_or_default();
    let text = format!(
        r#"
[queue]
path = "{queue}"
{extra}

[intake]
url = "{intake_url}"

# The test harness learns the admin address from the ready file, which lists listening
# sources: an idle HTTP source gives it one.
[[source]]
type = "http"
listen = "127.0.0.1:0"

[[source]]
type = "file"
paths = ["{log}"]
read_from = "beginning"
intake_key = "{KEY}"

[admin]
listen = "127.0.0.1:0"

[log]
level = "info"
"#,
        queue = dir.join("queue").display(),
        log = log.display(),
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// `lines` newline-ended lines of ~200 bytes, in buffers of about 1 MiB.
fn text(lines: u64) -> Vec<Vec<u8>> {
    let mut out = vec![Vec::with_capacity(1 << 20)];
    for i in 0..lines as usize {
        let buf = out.last_mut().expect("one buffer at least");
        buf.extend_from_slice(event_text(0, i).as_bytes());
        buf.push(b'\n');
        if buf.len() >= 1 << 20 {
            out.push(Vec::with_capacity(1 << 20));
        }
    }
    out
}

pub async fn run(lines: u64, ticks: f64) -> Vec<CellReport> {
    let mut reports = Vec::new();
    for backlog in [false, true] {
        let name = if backlog { "backlog" } else { "tail" };
        println!("file: {name} ({lines} lines)");
        reports.push(run_cell(name, backlog, lines, ticks).await);
    }
    reports
}

async fn run_cell(name: &'static str, backlog: bool, lines: u64, ticks: f64) -> CellReport {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("app.log");
    let data = text(lines);
    let mut file = std::fs::File::create(&log).expect("create the log");
    if backlog {
        for buf in &data {
            file.write_all(buf).expect("write the log");
        }
    }
    let mock = MockIntake::start_count_only(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("mock");
    let config = write_config(dir.path(), &log, &mock.url());
    let started = Instant::now();
    let mut fwd = start_forwarder(&config);
    let pid = fwd.pid();
    // The backlog cell counts from the process's start (its CPU too: all of it is the file's);
    // the tail cell from the first line written.
    let (started, cpu0) = if backlog {
        (started, 0.0)
    } else {
        let cpu0 = cpu_secs(&pid.to_string(), ticks);
        let started = Instant::now();
        for buf in &data {
            file.write_all(buf).expect("write the log");
        }
        (started, cpu0)
    };
    let within = deadline_for(lines);
    let complete = wait_accepted(&mock, lines, within).await;
    let elapsed = started.elapsed();
    let cpu = cpu_secs(&pid.to_string(), ticks) - cpu0;
    let delivered = mock.stats().accepted_events;
    if !complete {
        println!(
            "file {name}: only {delivered} of {lines} delivered within {within:?}; sources: {}",
            fwd.status().await["file_sources"]
        );
    }
    let peak_rss = proc_status_bytes(pid, "VmHWM:");
    let compressed_reads = compressed_reads(fwd.admin).await;
    stop_forwarder(&mut fwd);
    mock.shutdown().await;
    CellReport {
        name,
        lines,
        delivered,
        elapsed,
        cpu,
        peak_rss,
        compressed_reads,
    }
}

pub fn rows(cells: &[CellReport], rows: &mut Vec<Row>) {
    for c in cells {
        let r = rate(c.delivered, c.elapsed);
        let per_million = cpu_per_million(c.cpu, c.delivered);
        rows.push(row(
            format!("file {}: lines/s file -> intake", c.name),
            format!("{r:.0}"),
            ">= 500,000/s",
            Some(r >= 500_000.0 && c.delivered >= c.lines),
        ));
        rows.push(row(
            format!("file {}: forwarder CPU-s per million lines", c.name),
            format!("{per_million:.2}"),
            "",
            None,
        ));
        rows.push(row(
            format!("file {}: peak RSS", c.name),
            mib(c.peak_rss),
            "",
            None,
        ));
        compressed_reads_row(&format!("file {}", c.name), c.compressed_reads, rows);
    }
}
