//! The three phases of the large-request benchmark (live, ingest, backlog and restart), and the
//! forwarder process they share.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::{http_client, send_all, Bodies, SendReport};
use crate::common::{Forwarder, MockIntake};
use crate::probe::{
    compressed_reads, cpu_secs, dir_size, proc_status_bytes, queue_view, write_bytes, QueueView,
    QueuedDisk, Sampler,
};
use crate::{deadline_for, Params};

/// sled's background flush runs every second; disk use is measured after it had a chance to run.
pub const SETTLE: Duration = Duration::from_millis(1500);

/// The forwarder's configuration: production defaults but for the paths and ports, plus the
/// lines of `E2E_QUEUE_CONFIG` in `[queue]` and of `E2E_INTAKE_CONFIG` in `[intake]` (to
/// compare settings, e.g. `chunk_bytes = 16384`, `max_in_flight = 2`).
pub fn write_config(dir: &Path, intake_url: &str) -> PathBuf {
    let path = dir.join("forwarder.toml");
    let extra = std::env::var("E2E_QUEUE_CONFIG").unwrap_or_default();
    let intake_extra = std::env::var("E2E_INTAKE_CONFIG").unwrap_or_default();
    let text = format!(
        r#"
[queue]
path = "{queue}"
{extra}

[intake]
url = "{intake_url}"
{intake_extra}

[[source]]
type = "http"
listen = "127.0.0.1:0"

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

/// Starts the binary (blocking wait for its listeners, off the async workers).
pub fn start_forwarder(config: &Path) -> Forwarder {
    tokio::task::block_in_place(|| Forwarder::start_with_env(config, &[("RUST_LOG", "info")]))
}

/// SIGTERM, and the time it took to exit.
pub fn stop_forwarder(fwd: &mut Forwarder) -> Duration {
    let started = Instant::now();
    let status = tokio::task::block_in_place(|| fwd.terminate());
    assert!(status.success(), "forwarder exited with {status}");
    started.elapsed()
}

/// A URL nothing listens on: the intake is down (connections are refused at once).
pub fn closed_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}")
}

/// Waits until the forwarder's queue is empty; false at the deadline.
pub async fn wait_queue_empty(admin: SocketAddr, within: Duration) -> bool {
    let client = http_client();
    let end = Instant::now() + within;
    while Instant::now() < end {
        if let Some(v) = queue_view(&client, admin).await {
            if v.events == 0 {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// What [`send_through`] measured.
pub struct Delivered {
    pub sent: SendReport,
    /// Every event acknowledged to the client reached the mock within the deadline.
    pub complete: bool,
    /// From the first send to the last event acknowledged by the mock.
    pub elapsed: Duration,
}

/// Sends `events` through the forwarder `fwd` and waits until the mock has them all, within
/// the deadline of that many events.
pub async fn send_through(
    fwd: &Forwarder,
    mock: &MockIntake,
    events: u64,
    connections: usize,
    bodies: Arc<Bodies>,
) -> Delivered {
    let within = deadline_for(events);
    let started = Instant::now();
    let sent = send_all(&fwd.url(), events, connections, bodies, started + within).await;
    let left = within.saturating_sub(started.elapsed());
    let complete = !sent.timed_out && wait_accepted(mock, sent.acked_events, left).await;
    Delivered {
        sent,
        complete,
        elapsed: started.elapsed(),
    }
}

pub async fn wait_accepted(mock: &MockIntake, events: u64, within: Duration) -> bool {
    mock.wait_for_stats(|s| s.accepted_events >= events, within)
        .await
}

pub fn rate(events: u64, d: Duration) -> f64 {
    events as f64 / d.as_secs_f64().max(1e-9)
}

pub fn cpu_per_million(cpu: f64, events: u64) -> f64 {
    cpu / (events as f64 / 1e6).max(1e-12)
}

// ---------------------------------------------------------------------------------------------
// Phases
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
pub struct Live {
    pub sent: SendReport,
    pub delivered: u64,
    pub duplicates: u64,
    pub elapsed: Duration,
    pub complete: bool,
    pub cpu: f64,
    pub bench_cpu: f64,
    pub peak_rss: u64,
    pub sampled_rss: u64,
    pub disk: QueuedDisk,
    pub dir_after_drain: (u64, u64),
    pub dir_after_stop: (u64, u64),
    pub mock_requests: u64,
    /// Bytes the forwarder wrote to the disk, first send to the drained queue settled.
    pub written: u64,
    /// Compressed chunks delivery read from memory, and decompressed from the store.
    pub compressed_reads: Option<(f64, f64)>,
}

pub async fn live(p: &Params, bodies: Arc<Bodies>, ticks: f64) -> Live {
    println!(
        "live: {} events, {} connections",
        p.live_events, p.connections
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mock = MockIntake::start_count_only(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("mock");
    let config = write_config(dir.path(), &mock.url());
    let mut fwd = start_forwarder(&config);
    let pid = fwd.pid();
    let sampler = Sampler::start(pid, fwd.admin, dir.path().join("queue"));
    let (cpu0, bench0) = (cpu_secs(&pid.to_string(), ticks), cpu_secs("self", ticks));
    let written0 = write_bytes(pid);
    let Delivered {
        sent,
        complete,
        elapsed,
    } = send_through(&fwd, &mock, p.live_events, p.connections, bodies).await;
    let (cpu1, bench1) = (cpu_secs(&pid.to_string(), ticks), cpu_secs("self", ticks));
    let samples = sampler.finish().await;
    let stats = mock.stats();
    let drained = wait_queue_empty(fwd.admin, Duration::from_secs(60)).await;
    assert!(drained, "live: the queue did not drain");
    tokio::time::sleep(SETTLE).await;
    let dir_after_drain = dir_size(&dir.path().join("queue"));
    let peak_rss = proc_status_bytes(pid, "VmHWM:");
    let written = write_bytes(pid) - written0;
    let compressed_reads = compressed_reads(fwd.admin).await;
    stop_forwarder(&mut fwd);
    let dir_after_stop = dir_size(&dir.path().join("queue"));
    mock.shutdown().await;
    Live {
        written,
        compressed_reads,
        delivered: stats.accepted_events,
        duplicates: stats.accepted_events.saturating_sub(sent.acked_events),
        sent,
        elapsed,
        complete,
        cpu: cpu1 - cpu0,
        bench_cpu: bench1 - bench0,
        peak_rss,
        sampled_rss: samples.iter().map(|s| s.rss).max().unwrap_or(0),
        disk: QueuedDisk::from_samples(&samples),
        dir_after_drain,
        dir_after_stop,
        mock_requests: stats.accepted_requests,
    }
}

#[derive(Debug, Default)]
pub struct Ingest {
    pub sent: SendReport,
    pub cpu: f64,
    pub bench_cpu: f64,
    pub peak_rss: u64,
    /// Settled after the last append.
    pub dir: (u64, u64),
    pub queued: QueueView,
    pub stop_time: Duration,
    /// Bytes the forwarder wrote to the disk, first send to settled.
    pub written: u64,
}

/// Fills a fresh queue with `events` while the intake is down; leaves the forwarder stopped and
/// the queue in `dir`.
pub async fn ingest(
    dir: &Path,
    events: u64,
    p: &Params,
    bodies: Arc<Bodies>,
    ticks: f64,
) -> Ingest {
    let config = write_config(dir, &closed_url());
    let mut fwd = start_forwarder(&config);
    let pid = fwd.pid();
    let (cpu0, bench0) = (cpu_secs(&pid.to_string(), ticks), cpu_secs("self", ticks));
    let written0 = write_bytes(pid);
    let started = Instant::now();
    let sent = send_all(
        &fwd.url(),
        events,
        p.connections,
        bodies,
        started + deadline_for(events),
    )
    .await;
    let (cpu1, bench1) = (cpu_secs(&pid.to_string(), ticks), cpu_secs("self", ticks));
    tokio::time::sleep(SETTLE).await;
    let dir_size_now = dir_size(&dir.join("queue"));
    let queued = queue_view(&http_client(), fwd.admin)
        .await
        .unwrap_or_default();
    let peak_rss = proc_status_bytes(pid, "VmHWM:");
    let written = write_bytes(pid) - written0;
    let stop_time = stop_forwarder(&mut fwd);
    Ingest {
        written,
        sent,
        cpu: cpu1 - cpu0,
        bench_cpu: bench1 - bench0,
        peak_rss,
        dir: dir_size_now,
        queued,
        stop_time,
    }
}

#[derive(Debug, Default)]
pub struct Restart {
    /// Process start to both listeners up (the queue is open by then).
    pub to_listening: Duration,
    /// Process start to the first event acknowledged by the mock.
    pub to_first_delivery: Duration,
    /// First to last event acknowledged by the mock.
    pub drain: Duration,
    pub delivered: u64,
    pub complete: bool,
    pub cpu: f64,
    pub bench_cpu: f64,
    pub peak_rss: u64,
    pub dir_after_drain: (u64, u64),
    pub dir_after_stop: (u64, u64),
    /// After one more start and clean stop on the empty queue.
    pub dir_after_reopen: (u64, u64),
    pub peak_dir: u64,
    pub sampled_rss: u64,
    pub log_open_line: String,
    /// The page cache was emptied before the restart.
    pub cold: bool,
}

/// Restarts on the backlog in `dir` with a mock intake up, and drains it.
pub async fn restart_and_drain(dir: &Path, backlog: u64, ticks: f64) -> Restart {
    let mock = MockIntake::start_count_only(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("mock");
    let config = write_config(dir, &mock.url());
    let cold = std::env::var("E2E_DROP_CACHES").is_ok_and(|v| v == "1") && drop_page_cache();
    let bench0 = cpu_secs("self", ticks);
    let started = Instant::now();
    let mut fwd = start_forwarder(&config);
    let to_listening = started.elapsed();
    let pid = fwd.pid();
    let sampler = Sampler::start(pid, fwd.admin, dir.join("queue"));
    let within = deadline_for(backlog);
    let first = wait_accepted(&mock, 1, within).await;
    let to_first_delivery = started.elapsed();
    let complete = first && wait_accepted(&mock, backlog, within).await;
    let drain = started.elapsed().saturating_sub(to_first_delivery);
    let cpu = cpu_secs(&pid.to_string(), ticks);
    let bench_cpu = cpu_secs("self", ticks) - bench0;
    let delivered = mock.stats().accepted_events;
    let drained = wait_queue_empty(fwd.admin, Duration::from_secs(60)).await;
    let samples = sampler.finish().await;
    assert!(drained, "backlog: the queue did not drain");
    tokio::time::sleep(SETTLE).await;
    let dir_after_drain = dir_size(&dir.join("queue"));
    let peak_rss = proc_status_bytes(pid, "VmHWM:");
    let log_open_line = fwd
        .log()
        .lines()
        .find(|l| l.contains("queue opened"))
        .unwrap_or("")
        .to_owned();
    stop_forwarder(&mut fwd);
    let dir_after_stop = dir_size(&dir.join("queue"));
    let mut again = start_forwarder(&config);
    tokio::time::sleep(SETTLE).await;
    stop_forwarder(&mut again);
    let dir_after_reopen = dir_size(&dir.join("queue"));
    mock.shutdown().await;
    Restart {
        to_listening,
        to_first_delivery,
        drain,
        delivered,
        complete,
        cpu,
        bench_cpu,
        peak_rss,
        dir_after_drain,
        dir_after_stop,
        dir_after_reopen,
        peak_dir: samples.iter().map(|s| s.dir.0).max().unwrap_or(0),
        sampled_rss: samples.iter().map(|s| s.rss).max().unwrap_or(0),
        log_open_line,
        cold,
    }
}

/// Writes dirty pages out and empties the page cache (root only), so that the restart reads the
/// queue from the disk, as after a reboot. Says whether it worked.
pub fn drop_page_cache() -> bool {
    let synced = std::process::Command::new("sync")
        .status()
        .is_ok_and(|s| s.success());
    let dropped = std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
    if !(synced && dropped) {
        println!("E2E_DROP_CACHES: cannot drop the page cache (not root?); the restart is warm");
    }
    synced && dropped
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------
