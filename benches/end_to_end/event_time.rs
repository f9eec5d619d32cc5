//! Phase **eventtime**: what sending each undated event's reception time costs
//! (`[intake] event_time`, docs/performance.md), `"reception"` (the default) against
//! `"intake"` (no date; batches are not cut by reception times), in requests and forwarder CPU
//! seconds per million events.
//!
//! - **live**: a paced client sends to the forwarder's `/jsons` at 10 events/s (one event per
//!   request, every 100 ms) and at 10,000 events/s (100 events per request, every 10 ms) for
//!   `E2E_EVENT_TIME_SECS` seconds (default 30); the intake (a mock) is up. CPU is the
//!   forwarder's, from the first send to the last event acknowledged by the mock.
//! - **outage**: the backlog a 2-hour outage leaves, rebuilt through the library
//!   (`Queue::append_received_at`: events whose reception times span the outage, appended in
//!   order as a live source would have, 10 appends per simulated second), then drained by the
//!   real binary restarted on that queue with the intake up: requests, CPU from the start of
//!   the process to the last event acknowledged, drain time. At 10 events/s the whole 2 hours
//!   (72,000 events; `E2E_EVENT_TIME_LOW_OUTAGE_SECS` to shorten it); at 10,000 events/s a slice of `E2E_EVENT_TIME_OUTAGE_SECS` simulated
//!   seconds (default 120, 1.2 M events): 72 M events (14 GB) do not fit the bench, and the
//!   cut happens once per tolerance window whatever the outage's length, so requests and CPU
//!   per million events of a slice are those of the whole outage.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sekoia_forwarder::config::QueueConfig;
use sekoia_forwarder::intake_api::IncomingEvent;
use sekoia_forwarder::queue::Queue;

use crate::client::{event_text, http_client};
use crate::common::MockIntake;
use crate::phases::{cpu_per_million, start_forwarder, stop_forwarder, wait_accepted};
use crate::probe::cpu_secs;
use crate::report::{row, Row};
use crate::KEY;

/// One measurement.
pub struct Cell {
    pub mode: &'static str,
    pub what: String,
    pub events: u64,
    pub requests: u64,
    pub cpu: f64,
    pub elapsed: Duration,
    pub complete: bool,
}

impl Cell {
    fn requests_per_million(&self) -> f64 {
        self.requests as f64 * 1e6 / (self.events as f64).max(1.0)
    }
}

fn secs_from_env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: not a number: {v:?}"))
        })
        .unwrap_or(default)
}

/// The forwarder's configuration: production defaults, `event_time = mode`.
fn write_config(dir: &Path, intake_url: &str, mode: &str) -> std::path::PathBuf {
    let path = dir.join("forwarder.toml");
    let text = format!(
        r#"
[queue]
path = "{queue}"

[intake]
url = "{intake_url}"
event_time = "{mode}"

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

pub async fn run(ticks: f64) -> Vec<Cell> {
    let live_secs = secs_from_env("E2E_EVENT_TIME_SECS", 30);
    let slice_secs = secs_from_env("E2E_EVENT_TIME_OUTAGE_SECS", 120);
    // The outage at 10 events/s: 2 hours unless told otherwise (a shorter one to try the bench).
    let low_secs = secs_from_env("E2E_EVENT_TIME_LOW_OUTAGE_SECS", 2 * 3600);
    let mut cells = Vec::new();
    for mode in ["reception", "intake"] {
        for (rate, per_request) in [(10u64, 1usize), (10_000, 100)] {
            let cell = live(mode, rate, per_request, live_secs, ticks).await;
            print_cell(&cell);
            cells.push(cell);
        }
        for (rate, secs) in [(10u64, low_secs), (10_000, slice_secs)] {
            let cell = outage(mode, rate, secs, ticks).await;
            print_cell(&cell);
            cells.push(cell);
        }
    }
    cells
}

fn print_cell(c: &Cell) {
    println!(
        "eventtime: {} {}: {} events, {} requests ({:.0} per million), {:.2} s CPU ({:.1} s per \
         million), {:.1} s{}",
        c.mode,
        c.what,
        c.events,
        c.requests,
        c.requests_per_million(),
        c.cpu,
        cpu_per_million(c.cpu, c.events),
        c.elapsed.as_secs_f64(),
        if c.complete { "" } else { ", INCOMPLETE" }
    );
}

/// A live stream of `rate` events/s in requests of `per_request` for `secs` seconds.
async fn live(mode: &'static str, rate: u64, per_request: usize, secs: u64, ticks: f64) -> Cell {
    let dir = tempfile::tempdir().expect("tempdir");
    let mock = MockIntake::start_count_only(([127, 0, 0, 1], 0).into())
        .await
        .expect("mock");
    let config = write_config(dir.path(), &mock.url(), mode);
    let mut fwd = start_forwarder(&config);
    let pid = fwd.pid().to_string();
    let url = format!("{}/jsons", fwd.url());
    let client = http_client();
    let period = Duration::from_secs_f64(per_request as f64 / rate as f64);
    let requests = (rate * secs).div_ceil(per_request as u64);
    let acked = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_secs(&pid, ticks);
    let started = Instant::now();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    for r in 0..requests {
        tick.tick().await;
        let body: Vec<String> = (0..per_request)
            .map(|i| event_text(r as usize % 64, i))
            .collect();
        let (client, url, acked) = (client.clone(), url.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let answer = client
                .post(&url)
                .header("X-SEKOIAIO-INTAKE-KEY", KEY)
                .json(&body)
                .send()
                .await;
            if answer.is_ok_and(|a| a.status().is_success()) {
                acked.fetch_add(body.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.load(Ordering::Relaxed);
    let complete = wait_accepted(&mock, acked, Duration::from_secs(60)).await;
    let elapsed = started.elapsed();
    let cpu = cpu_secs(&pid, ticks) - cpu0;
    let stats = mock.stats();
    stop_forwarder(&mut fwd);
    mock.shutdown().await;
    Cell {
        mode,
        what: format!("live {rate}/s"),
        events: acked,
        requests: stats.accepted_requests,
        cpu,
        elapsed,
        complete: complete && acked == rate * secs,
    }
}

/// The backlog of an outage of `secs` seconds at `rate` events/s, drained.
async fn outage(mode: &'static str, rate: u64, secs: u64, ticks: f64) -> Cell {
    let dir = tempfile::tempdir().expect("tempdir");
    // 10 appends per simulated second, as many events each as the rate gives.
    let appends = secs * 10;
    let per_append = (rate / 10).max(1) as usize;
    let events = appends * per_append as u64;
    let filled = Instant::now();
    let queue_dir = dir.path().join("queue");
    tokio::task::block_in_place(|| fill(&queue_dir, appends, per_append, secs));
    println!(
        "eventtime: {mode} outage {rate}/s: {events} events over {secs} simulated s queued in \
         {:.1} s",
        filled.elapsed().as_secs_f64()
    );
    let mock = MockIntake::start_count_only(([127, 0, 0, 1], 0).into())
        .await
        .expect("mock");
    let config = write_config(dir.path(), &mock.url(), mode);
    let started = Instant::now();
    let mut fwd = start_forwarder(&config);
    let pid = fwd.pid().to_string();
    let complete = wait_accepted(&mock, events, Duration::from_secs(600)).await;
    let elapsed = started.elapsed();
    // From the process's start: opening the queue is part of the drain.
    let cpu = cpu_secs(&pid, ticks);
    let stats = mock.stats();
    stop_forwarder(&mut fwd);
    mock.shutdown().await;
    Cell {
        mode,
        what: format!("outage {rate}/s, {secs} s"),
        events,
        requests: stats.accepted_requests,
        cpu,
        elapsed,
        complete,
    }
}

/// Queues `appends` appends of `per_append` events whose reception times are 100 ms apart and
/// end now, as `secs` seconds of an outage leave them.
///
/// On a runtime of its own with one thread, so that the appends can be many in flight (their
/// fsyncs grouped: one at a time, 72,000 of them took minutes) and still reach the writer in
/// the order they were started: such a runtime runs tasks in the order they were spawned, each
/// until its append is on the writer's channel (whose waiters are served in order), and the
/// writer commits in that order. Reception times are then in queue order, as a live source
/// leaves them.
fn fill(path: &Path, appends: u64, per_append: usize, secs: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let queue = Queue::open(&QueueConfig {
            path: path.to_owned(),
            max_bytes: 64 << 30,
            ..QueueConfig::default()
        })
        .expect("open the queue");
        let start_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64
            - secs * 1000;
        let mut in_flight = std::collections::VecDeque::new();
        for a in 0..appends {
            let batch: Vec<IncomingEvent> = (0..per_append)
                .map(|i| IncomingEvent {
                    intake_key: KEY.into(),
                    timestamp: None,
                    raw: event_text(a as usize % 64, i),
                })
                .collect();
            let q = queue.clone();
            let at = start_ms + a * 100;
            in_flight.push_back(tokio::spawn(async move {
                q.append_received_at(batch, at).await.expect("append")
            }));
            if in_flight.len() >= 64 {
                if let Some(t) = in_flight.pop_front() {
                    t.await.expect("append task");
                }
            }
        }
        for t in in_flight {
            t.await.expect("append task");
        }
        queue.close().await.expect("close the queue");
    });
}

pub fn rows(cells: &[Cell], rows: &mut Vec<Row>) {
    for c in cells {
        rows.push(row(
            format!(
                "event time {} {}: requests per million events",
                c.mode, c.what
            ),
            format!("{:.0}", c.requests_per_million()),
            "",
            c.complete.then_some(true).or(Some(false)),
        ));
        rows.push(row(
            format!("event time {} {}: CPU s per million events", c.mode, c.what),
            format!("{:.2}", cpu_per_million(c.cpu, c.events)),
            "",
            None,
        ));
    }
}
