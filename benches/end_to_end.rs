//! End-to-end benchmark: the real `sekoia-forwarder` binary, its local API, its queue on disk and
//! its delivery to an in-process mock intake, 200-byte events, on 127.0.0.1 only.
//!
//! `cargo bench --bench end_to_end` (release build). Figures are recorded in
//! docs/performance.md. Three phases, each with a fresh queue directory and a fresh process (so
//! that the process's peak RSS, `VmHWM`, belongs to that phase alone):
//!
//! 1. **live**: client → forwarder's `POST /jsons` (batches of 1,000 events, several keep-alive
//!    connections, bodies serialised beforehand) → queue → mock intake. Events/s from the first
//!    send to the last event acknowledged by the mock; forwarder CPU seconds per million events;
//!    peak RSS; queue directory size per queued event while sampled, and after the drain.
//! 2. **ingest**: the intake down (nothing listens on its port): durable ingest rate (events/s
//!    acknowledged to the client) and CPU seconds per million.
//! 3. **backlog**: the intake down, a backlog of `E2E_BACKLOG_EVENTS` events (default 5,000,000,
//!    ~1 GB of payload) is written; disk use / payload and peak RSS. Then SIGTERM, a mock intake
//!    is started, the forwarder restarted: time from process start to the first event
//!    acknowledged by the mock, drain rate, peak RSS while draining, disk use after the drain.
//!
//! Sizes, as environment variables or as `--name value` after `--`:
//! `E2E_LIVE_EVENTS` / `--live-events` (default 3,000,000), `E2E_INGEST_EVENTS` /
//! `--ingest-events` (2,000,000), `E2E_BACKLOG_EVENTS` / `--backlog-events` (5,000,000),
//! `E2E_CONNECTIONS` / `--connections` (8). `E2E_QUEUE_CONFIG` adds lines to the forwarder's
//! `[queue]` table (e.g. `E2E_QUEUE_CONFIG='cache_capacity_bytes = 8388608'`), and
//! `E2E_INTAKE_CONFIG` to its `[intake]` table (e.g. `E2E_INTAKE_CONFIG='max_in_flight = 2'`),
//! to compare settings; by default the forwarder runs on its defaults. `E2E_DROP_CACHES=1` empties the
//! page cache before the restart (root only), so that the queue is read from the disk as after
//! a reboot; without it the restart finds the queue in the page cache. Every wait has a
//! deadline; the benchmark ends by itself, and prints one table of every figure beside its
//! target.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Forwarder, MockIntake};

/// Payload bytes of one event.
const EVENT_BYTES: usize = 200;
/// Events in one request of the client.
const EVENTS_PER_REQUEST: usize = 1000;
/// Distinct request bodies the client cycles through (serialised once, before the clock starts).
const BODIES: usize = 64;
const KEY: &str = "bench-intake-key-0001";
const MIB: f64 = 1024.0 * 1024.0;
/// How often resources are sampled during a phase.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// sled's background flush runs every second; disk use is measured after it had a chance to run.
const SETTLE: Duration = Duration::from_millis(1500);

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

struct Params {
    live_events: u64,
    ingest_events: u64,
    backlog_events: u64,
    connections: usize,
}

impl Params {
    fn from_env_and_args() -> Params {
        let args: Vec<String> = std::env::args().collect();
        let get = |env: &str, flag: &str, default: u64| -> u64 {
            let from_args = args.iter().enumerate().find_map(|(i, a)| {
                if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
                    Some(v.to_owned())
                } else if a == flag {
                    args.get(i + 1).cloned()
                } else {
                    None
                }
            });
            let text = from_args.or_else(|| std::env::var(env).ok());
            match text {
                Some(t) => t
                    .replace(['_', ','], "")
                    .parse()
                    .unwrap_or_else(|_| panic!("{env} / {flag}: not a number: {t:?}")),
                None => default,
            }
        };
        // Whole requests of EVENTS_PER_REQUEST events, at least one.
        let round =
            |n: u64| n.div_ceil(EVENTS_PER_REQUEST as u64).max(1) * EVENTS_PER_REQUEST as u64;
        Params {
            live_events: round(get("E2E_LIVE_EVENTS", "--live-events", 3_000_000)),
            ingest_events: round(get("E2E_INGEST_EVENTS", "--ingest-events", 2_000_000)),
            backlog_events: round(get("E2E_BACKLOG_EVENTS", "--backlog-events", 5_000_000)),
            connections: get("E2E_CONNECTIONS", "--connections", 8).max(1) as usize,
        }
    }
}

/// A generous bound on any phase moving `events`: 60 s plus 20,000 events/s (25x below target).
fn deadline_for(events: u64) -> Duration {
    Duration::from_secs(60) + Duration::from_secs_f64(events as f64 / 20_000.0)
}

// ---------------------------------------------------------------------------------------------
// Events and the client
// ---------------------------------------------------------------------------------------------

/// A tiny xorshift64 generator: reproducible pseudo-random numbers for `event_text`.
fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// One 200-byte syslog line of an nginx-like access log, ASCII, nothing to escape in JSON.
///
/// Client, user, request, status, sizes, trace id and user agent vary pseudo-randomly with
/// `body` and `i`, as in real traffic: the queue compresses its chunks, and a line padded with a
/// repeated filler would compress far better than real logs do.
fn event_text(body: usize, i: usize) -> String {
    const USERS: [&str; 8] = [
        "-", "-", "alice", "bob", "backup", "jmartin", "carol", "deploy",
    ];
    const METHODS: [&str; 6] = ["GET", "GET", "GET", "POST", "PUT", "DELETE"];
    const WORDS: [&str; 16] = [
        "items", "orders", "users", "cart", "search", "login", "assets", "reports", "billing",
        "catalog", "health", "sessions", "invoices", "profile", "export", "tokens",
    ];
    const STATUSES: [u16; 8] = [200, 200, 200, 200, 201, 304, 404, 503];
    const AGENTS: [&str; 6] = [
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) \
         Chrome/131.0.0.0 Safari/537.36",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_7_1) AppleWebKit/605.1.15 (KHTML, like Gecko) \
         Version/18.1 Safari/605.1.15",
        "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
        "curl/8.5.0",
        "python-requests/2.32.3",
        "okhttp/4.12.0",
    ];
    let mut next = xorshift(((body as u64) << 32) | i as u64);
    let mut pick = |n: usize| (next() % n as u64) as usize;
    let (a, b, c) = (pick(256), pick(256), pick(256));
    let user = USERS[pick(USERS.len())];
    let method = METHODS[pick(METHODS.len())];
    let (w1, w2) = (WORDS[pick(WORDS.len())], WORDS[pick(WORDS.len())]);
    let id = pick(100_000);
    let status = STATUSES[pick(STATUSES.len())];
    let bytes = pick(60_000);
    let ms = pick(900) + 1;
    let agent = AGENTS[pick(AGENTS.len())];
    let mut line = format!(
        "<134>1 2025-01-15T10:{:02}:{:02}.{:03}Z web-{body:02} nginx 4242 - - {a}.{b}.{c}.{} \
         {user} {method} /api/v1/{w1}/{id}/{w2} {status} {bytes} 0.{ms:03} \
         trace={:016x}{:016x} ua={agent}",
        (i / 60) % 60,
        i % 60,
        i % 1000,
        i % 256,
        next(),
        next(),
    );
    // Short agents leave room for a referer, as real lines have.
    while line.len() < EVENT_BYTES {
        line.push_str(" ref=/");
        line.push_str(WORDS[(next() % WORDS.len() as u64) as usize]);
    }
    line.truncate(EVENT_BYTES);
    line
}

/// `BODIES` request bodies of `EVENTS_PER_REQUEST` events each, as `/jsons` takes them.
fn request_bodies() -> Arc<Vec<Bytes>> {
    Arc::new(
        (0..BODIES)
            .map(|b| {
                let events: Vec<String> =
                    (0..EVENTS_PER_REQUEST).map(|i| event_text(b, i)).collect();
                Bytes::from(serde_json::to_vec(&events).expect("serialise"))
            })
            .collect(),
    )
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client")
}

#[derive(Debug, Default)]
struct SendReport {
    /// Events the forwarder acknowledged (200 with one id per event).
    acked_events: u64,
    requests: u64,
    /// 503 answers (queue full, stopping), retried.
    unavailable: u64,
    /// Other answers and transport errors, retried.
    errors: u64,
    elapsed: Duration,
    timed_out: bool,
}

/// Sends `events` events to `url`/jsons over `connections` keep-alive connections (one task
/// each, one request in flight per task), until every request is acknowledged or `deadline`.
async fn send_all(
    url: &str,
    events: u64,
    connections: usize,
    bodies: Arc<Vec<Bytes>>,
    deadline: Instant,
) -> SendReport {
    let client = http_client();
    let requests = events / EVENTS_PER_REQUEST as u64;
    let next = Arc::new(AtomicU64::new(0));
    let endpoint = format!("{url}/jsons");
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (client, next, bodies, endpoint) = (
            client.clone(),
            next.clone(),
            bodies.clone(),
            endpoint.clone(),
        );
        tasks.spawn(async move {
            let mut report = SendReport::default();
            'requests: loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                let body = bodies[i as usize % bodies.len()].clone();
                loop {
                    if Instant::now() > deadline {
                        report.timed_out = true;
                        break 'requests;
                    }
                    report.requests += 1;
                    let answer = client
                        .post(&endpoint)
                        .header("X-SEKOIAIO-INTAKE-KEY", KEY)
                        .header("Content-Type", "application/json")
                        .body(body.clone())
                        .send()
                        .await;
                    match answer {
                        Ok(r) if r.status() == 200 => match r.bytes().await {
                            Ok(b) if acknowledged_ids(&b) == EVENTS_PER_REQUEST => {
                                report.acked_events += EVENTS_PER_REQUEST as u64;
                                break;
                            }
                            _ => report.errors += 1,
                        },
                        Ok(r) if r.status() == 503 => report.unavailable += 1,
                        _ => report.errors += 1,
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            report
        });
    }
    let mut total = SendReport::default();
    while let Some(r) = tasks.join_next().await {
        let r = r.expect("client task");
        total.acked_events += r.acked_events;
        total.requests += r.requests;
        total.unavailable += r.unavailable;
        total.errors += r.errors;
        total.timed_out |= r.timed_out;
    }
    total.elapsed = started.elapsed();
    total
}

/// Number of ids in `{"event_ids":["…",…]}`, without parsing it (the client must stay cheap).
fn acknowledged_ids(body: &[u8]) -> usize {
    if !body.starts_with(b"{\"event_ids\":[") {
        return 0;
    }
    let quotes = body.iter().filter(|&&c| c == b'"').count();
    // Two quotes around the key, two around each id.
    quotes.saturating_sub(2) / 2
}

// ---------------------------------------------------------------------------------------------
// The forwarder process and what it uses
// ---------------------------------------------------------------------------------------------

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process, in seconds (`pid` "self" for this process).
fn cpu_secs(pid: &str, ticks: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> f64 { fields.get(i).and_then(|f| f.parse().ok()).unwrap_or(0.0) };
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    (field(11) + field(12)) / ticks
}

/// A `kB` line of /proc/PID/status (VmHWM, VmRSS), in bytes.
fn proc_status_bytes(pid: u32, name: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Size of a directory tree: (apparent bytes, allocated bytes).
fn dir_size(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut total = (0, 0);
    let Ok(entries) = std::fs::read_dir(path) else {
        return total;
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            let (a, b) = dir_size(&entry.path());
            total = (total.0 + a, total.1 + b);
        } else {
            total = (total.0 + meta.len(), total.1 + meta.blocks() * 512);
        }
    }
    total
}

/// What `/status` says of the queue.
#[derive(Debug, Clone, Copy, Default)]
struct QueueView {
    events: u64,
    bytes: u64,
}

async fn queue_view(client: &reqwest::Client, admin: SocketAddr) -> Option<QueueView> {
    let v: serde_json::Value = client
        .get(format!("http://{admin}/status"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(QueueView {
        events: v["queue"]["events"].as_u64()?,
        bytes: v["queue"]["bytes"].as_u64()?,
    })
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    rss: u64,
    dir: (u64, u64),
    queue: QueueView,
}

/// Samples the forwarder's RSS, its queue directory and its queue until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    samples: Arc<Mutex<Vec<Sample>>>,
}

impl Sampler {
    fn start(pid: u32, admin: SocketAddr, queue_dir: PathBuf) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let (stop, samples) = (stop.clone(), samples.clone());
            tokio::spawn(async move {
                let client = http_client();
                while !stop.load(Ordering::Relaxed) {
                    let queue = tokio::time::timeout(SAMPLE_EVERY * 4, queue_view(&client, admin))
                        .await
                        .ok()
                        .flatten();
                    if let Some(queue) = queue {
                        let sample = Sample {
                            rss: proc_status_bytes(pid, "VmRSS:"),
                            dir: dir_size(&queue_dir),
                            queue,
                        };
                        samples.lock().unwrap().push(sample);
                    }
                    tokio::time::sleep(SAMPLE_EVERY).await;
                }
            })
        };
        Sampler {
            stop,
            task,
            samples,
        }
    }

    async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        let samples = self.samples.lock().unwrap().clone();
        samples
    }
}

/// Disk use while events are queued, from samples: the sample holding the most queued events.
#[derive(Debug, Clone, Copy, Default)]
struct QueuedDisk {
    dir_bytes: u64,
    queued_events: u64,
    queued_bytes: u64,
    peak_dir_bytes: u64,
    samples: usize,
}

impl QueuedDisk {
    fn from_samples(samples: &[Sample]) -> QueuedDisk {
        let peak_dir_bytes = samples.iter().map(|s| s.dir.0).max().unwrap_or(0);
        match samples.iter().max_by_key(|s| s.queue.events) {
            Some(s) => QueuedDisk {
                dir_bytes: s.dir.0,
                queued_events: s.queue.events,
                queued_bytes: s.queue.bytes,
                peak_dir_bytes,
                samples: samples.len(),
            },
            None => QueuedDisk::default(),
        }
    }

    fn per_event(&self) -> Option<f64> {
        (self.queued_events > 0).then(|| self.dir_bytes as f64 / self.queued_events as f64)
    }
}

/// The forwarder's configuration: production defaults but for the paths and ports, plus the
/// lines of `E2E_QUEUE_CONFIG` in `[queue]` and of `E2E_INTAKE_CONFIG` in `[intake]` (to
/// compare settings, e.g. `chunk_bytes = 16384`, `max_in_flight = 2`).
fn write_config(dir: &Path, intake_url: &str) -> PathBuf {
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
fn start_forwarder(config: &Path) -> Forwarder {
    tokio::task::block_in_place(|| Forwarder::start_with_env(config, &[("RUST_LOG", "info")]))
}

/// SIGTERM, and the time it took to exit.
fn stop_forwarder(fwd: &mut Forwarder) -> Duration {
    let started = Instant::now();
    let status = tokio::task::block_in_place(|| fwd.terminate());
    assert!(status.success(), "forwarder exited with {status}");
    started.elapsed()
}

/// A URL nothing listens on: the intake is down (connections are refused at once).
fn closed_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}")
}

/// Waits until the forwarder's queue is empty; false at the deadline.
async fn wait_queue_empty(admin: SocketAddr, within: Duration) -> bool {
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

async fn wait_accepted(mock: &MockIntake, events: u64, within: Duration) -> bool {
    mock.wait_for_stats(|s| s.accepted_events >= events, within)
        .await
}

fn rate(events: u64, d: Duration) -> f64 {
    events as f64 / d.as_secs_f64().max(1e-9)
}

fn cpu_per_million(cpu: f64, events: u64) -> f64 {
    cpu / (events as f64 / 1e6).max(1e-12)
}

// ---------------------------------------------------------------------------------------------
// Phases
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Live {
    sent: SendReport,
    delivered: u64,
    duplicates: u64,
    elapsed: Duration,
    complete: bool,
    cpu: f64,
    bench_cpu: f64,
    peak_rss: u64,
    sampled_rss: u64,
    disk: QueuedDisk,
    dir_after_drain: (u64, u64),
    dir_after_stop: (u64, u64),
    mock_requests: u64,
}

async fn live(p: &Params, bodies: Arc<Vec<Bytes>>, ticks: f64) -> Live {
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
    let within = deadline_for(p.live_events);
    let (cpu0, bench0) = (cpu_secs(&pid.to_string(), ticks), cpu_secs("self", ticks));
    let started = Instant::now();
    let sent = send_all(
        &fwd.url(),
        p.live_events,
        p.connections,
        bodies,
        started + within,
    )
    .await;
    let left = within.saturating_sub(started.elapsed());
    let complete = !sent.timed_out && wait_accepted(&mock, sent.acked_events, left).await;
    let elapsed = started.elapsed();
    let (cpu1, bench1) = (cpu_secs(&pid.to_string(), ticks), cpu_secs("self", ticks));
    let samples = sampler.finish().await;
    let stats = mock.stats();
    let drained = wait_queue_empty(fwd.admin, Duration::from_secs(60)).await;
    assert!(drained, "live: the queue did not drain");
    tokio::time::sleep(SETTLE).await;
    let dir_after_drain = dir_size(&dir.path().join("queue"));
    let peak_rss = proc_status_bytes(pid, "VmHWM:");
    stop_forwarder(&mut fwd);
    let dir_after_stop = dir_size(&dir.path().join("queue"));
    mock.shutdown().await;
    Live {
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
struct Ingest {
    sent: SendReport,
    cpu: f64,
    bench_cpu: f64,
    peak_rss: u64,
    /// Settled after the last append.
    dir: (u64, u64),
    queued: QueueView,
    stop_time: Duration,
}

/// Fills a fresh queue with `events` while the intake is down; leaves the forwarder stopped and
/// the queue in `dir`.
async fn ingest(
    dir: &Path,
    events: u64,
    p: &Params,
    bodies: Arc<Vec<Bytes>>,
    ticks: f64,
) -> Ingest {
    let config = write_config(dir, &closed_url());
    let mut fwd = start_forwarder(&config);
    let pid = fwd.pid();
    let (cpu0, bench0) = (cpu_secs(&pid.to_string(), ticks), cpu_secs("self", ticks));
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
    let stop_time = stop_forwarder(&mut fwd);
    Ingest {
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
struct Restart {
    /// Process start to both listeners up (the queue is open by then).
    to_listening: Duration,
    /// Process start to the first event acknowledged by the mock.
    to_first_delivery: Duration,
    /// First to last event acknowledged by the mock.
    drain: Duration,
    delivered: u64,
    complete: bool,
    cpu: f64,
    bench_cpu: f64,
    peak_rss: u64,
    dir_after_drain: (u64, u64),
    dir_after_stop: (u64, u64),
    /// After one more start and clean stop on the empty queue.
    dir_after_reopen: (u64, u64),
    peak_dir: u64,
    sampled_rss: u64,
    log_open_line: String,
    /// The page cache was emptied before the restart.
    cold: bool,
}

/// Restarts on the backlog in `dir` with a mock intake up, and drains it.
async fn restart_and_drain(dir: &Path, backlog: u64, ticks: f64) -> Restart {
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
fn drop_page_cache() -> bool {
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

struct Row {
    figure: String,
    value: String,
    target: &'static str,
    verdict: &'static str,
}

fn row(figure: impl Into<String>, value: String, target: &'static str, ok: Option<bool>) -> Row {
    Row {
        figure: figure.into(),
        value,
        target,
        verdict: match ok {
            Some(true) => "ok",
            Some(false) => "MISSED",
            None => "",
        },
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB)
}

fn print_table(rows: &[Row]) {
    let w0 = rows.iter().map(|r| r.figure.len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.value.len()).max().unwrap_or(0);
    let w2 = rows.iter().map(|r| r.target.len()).max().unwrap_or(0);
    println!(
        "| {:w0$} | {:>w1$} | {:w2$} | verdict |",
        "figure", "measured", "target"
    );
    println!(
        "| {} | {}: | {} | --- |",
        "-".repeat(w0),
        "-".repeat(w1.saturating_sub(1)),
        "-".repeat(w2)
    );
    for r in rows {
        println!(
            "| {:w0$} | {:>w1$} | {:w2$} | {} |",
            r.figure, r.value, r.target, r.verdict
        );
    }
}

fn main() {
    let p = Params::from_env_and_args();
    let ticks = clock_ticks();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "end_to_end: {} CPUs, {}-byte events, {} per request, {} connections; binary {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        EVENT_BYTES,
        EVENTS_PER_REQUEST,
        p.connections,
        common::binary(),
    );
    if let Ok(extra) = std::env::var("E2E_QUEUE_CONFIG") {
        println!("[queue] settings added: {extra:?}");
    }
    if let Ok(extra) = std::env::var("E2E_INTAKE_CONFIG") {
        println!("[intake] settings added: {extra:?}");
    }
    let bodies = request_bodies();
    assert_eq!(
        bodies[0].len(),
        2 + EVENTS_PER_REQUEST * (EVENT_BYTES + 3) - 1,
        "events must need no JSON escaping"
    );

    let (live, ingest_report, backlog, restart) = rt.block_on(async {
        let live = live(&p, bodies.clone(), ticks).await;
        println!("live: done in {:.1} s", live.elapsed.as_secs_f64());

        println!("ingest: {} events, intake down", p.ingest_events);
        let dir = tempfile::tempdir().expect("tempdir");
        let ingest_report = ingest(dir.path(), p.ingest_events, &p, bodies.clone(), ticks).await;
        drop(dir);
        println!(
            "ingest: done in {:.1} s",
            ingest_report.sent.elapsed.as_secs_f64()
        );

        println!("backlog: filling {} events, intake down", p.backlog_events);
        let dir = tempfile::tempdir().expect("tempdir");
        let backlog = ingest(dir.path(), p.backlog_events, &p, bodies.clone(), ticks).await;
        println!(
            "backlog: filled in {:.1} s; restarting with the intake up",
            backlog.sent.elapsed.as_secs_f64()
        );
        let restart = restart_and_drain(dir.path(), backlog.sent.acked_events, ticks).await;
        println!("backlog: drained in {:.1} s", restart.drain.as_secs_f64());
        (live, ingest_report, backlog, restart)
    });

    // ---- the table ----
    let mut rows = Vec::new();
    let live_rate = rate(live.sent.acked_events, live.elapsed);
    let live_cpu = cpu_per_million(live.cpu, live.sent.acked_events);
    rows.push(row(
        "live: end-to-end rate (first send -> last ack by mock)",
        format!(
            "{:.0} ev/s{}",
            live_rate,
            if live.complete { "" } else { " (INCOMPLETE)" }
        ),
        ">= 400,000 ev/s",
        Some(live.complete && live_rate >= 400_000.0),
    ));
    rows.push(row(
        "live: client-side ingest rate (acks to the client)",
        format!(
            "{:.0} ev/s",
            rate(live.sent.acked_events, live.sent.elapsed)
        ),
        "",
        None,
    ));
    rows.push(row(
        "live: forwarder CPU per million events",
        format!("{live_cpu:.2} CPU-s"),
        "<= 2 CPU-s",
        Some(live_cpu <= 2.0),
    ));
    rows.push(row(
        "live: bench process (client + mock) CPU per million",
        format!(
            "{:.2} CPU-s",
            cpu_per_million(live.bench_cpu, live.sent.acked_events)
        ),
        "",
        None,
    ));
    rows.push(row(
        "live: forwarder peak RSS (VmHWM; max sampled VmRSS)",
        format!("{} ({})", mib(live.peak_rss), mib(live.sampled_rss)),
        "<= 100 MiB",
        Some(live.peak_rss as f64 <= 100.0 * MIB),
    ));
    rows.push(row(
        "live: disk per queued event (at most-queued sample)",
        match live.disk.per_event() {
            Some(b) => format!(
                "{b:.0} B = {} / {} ev ({:.1}x payload; {} samples)",
                mib(live.disk.dir_bytes),
                live.disk.queued_events,
                live.disk.dir_bytes as f64 / live.disk.queued_bytes.max(1) as f64,
                live.disk.samples
            ),
            None => "nothing queued when sampled".into(),
        },
        "",
        None,
    ));
    rows.push(row(
        "live: queue dir peak / after drain / after stop",
        format!(
            "{} / {} / {}",
            mib(live.disk.peak_dir_bytes),
            mib(live.dir_after_drain.0),
            mib(live.dir_after_stop.0)
        ),
        "",
        None,
    ));
    rows.push(row(
        "live: events delivered / duplicates / mock requests",
        format!(
            "{} / {} / {}",
            live.delivered, live.duplicates, live.mock_requests
        ),
        "",
        None,
    ));

    let ingest_rate = rate(ingest_report.sent.acked_events, ingest_report.sent.elapsed);
    let ingest_cpu = cpu_per_million(ingest_report.cpu, ingest_report.sent.acked_events);
    rows.push(row(
        "ingest: durable ingest rate (intake down)",
        format!(
            "{:.0} ev/s{}",
            ingest_rate,
            if ingest_report.sent.timed_out {
                " (INCOMPLETE)"
            } else {
                ""
            }
        ),
        ">= 500,000 ev/s",
        Some(!ingest_report.sent.timed_out && ingest_rate >= 500_000.0),
    ));
    rows.push(row(
        "ingest: forwarder CPU per million events",
        format!("{ingest_cpu:.2} CPU-s"),
        "",
        None,
    ));
    rows.push(row(
        "ingest: bench process (client) CPU per million",
        format!(
            "{:.2} CPU-s",
            cpu_per_million(ingest_report.bench_cpu, ingest_report.sent.acked_events)
        ),
        "",
        None,
    ));
    rows.push(row(
        "ingest: forwarder peak RSS",
        mib(ingest_report.peak_rss),
        "<= 100 MiB",
        Some(ingest_report.peak_rss as f64 <= 100.0 * MIB),
    ));

    let payload = backlog.queued.bytes.max(1);
    let amplification = backlog.dir.0 as f64 / payload as f64;
    rows.push(row(
        format!("backlog: fill rate ({} events)", backlog.sent.acked_events),
        format!(
            "{:.0} ev/s{}",
            rate(backlog.sent.acked_events, backlog.sent.elapsed),
            if backlog.sent.timed_out {
                " (INCOMPLETE)"
            } else {
                ""
            }
        ),
        "",
        None,
    ));
    rows.push(row(
        "backlog: fill CPU per million events",
        format!(
            "{:.2} CPU-s",
            cpu_per_million(backlog.cpu, backlog.sent.acked_events)
        ),
        "",
        None,
    ));
    rows.push(row(
        "backlog: disk / payload while queued",
        format!(
            "{amplification:.2}x ({} / {}; allocated {})",
            mib(backlog.dir.0),
            mib(backlog.queued.bytes),
            mib(backlog.dir.1)
        ),
        "<= 1.5x",
        Some(amplification <= 1.5),
    ));
    rows.push(row(
        "backlog: forwarder peak RSS while filling",
        mib(backlog.peak_rss),
        "<= 100 MiB",
        Some(backlog.peak_rss as f64 <= 100.0 * MIB),
    ));
    rows.push(row(
        "backlog: clean stop (SIGTERM to exit)",
        format!("{:.2} s", backlog.stop_time.as_secs_f64()),
        "",
        None,
    ));
    rows.push(row(
        "restart: process start -> listening (queue open)",
        format!("{:.3} s", restart.to_listening.as_secs_f64()),
        "",
        None,
    ));
    let cache = if restart.cold { "cold" } else { "warm" };
    rows.push(row(
        format!("restart: process start -> first event acked by mock ({cache} cache)"),
        format!("{:.3} s", restart.to_first_delivery.as_secs_f64()),
        "<= 1 s",
        Some(restart.to_first_delivery <= Duration::from_secs(1)),
    ));
    rows.push(row(
        "restart: drain rate (first -> last ack by mock)",
        format!(
            "{:.0} ev/s{}",
            rate(backlog.sent.acked_events, restart.drain),
            if restart.complete {
                ""
            } else {
                " (INCOMPLETE)"
            }
        ),
        "",
        None,
    ));
    rows.push(row(
        "restart: forwarder CPU per million (open + drain)",
        format!(
            "{:.2} CPU-s",
            cpu_per_million(restart.cpu, backlog.sent.acked_events)
        ),
        "",
        None,
    ));
    rows.push(row(
        "restart: bench process (mock) CPU per million",
        format!(
            "{:.2} CPU-s",
            cpu_per_million(restart.bench_cpu, backlog.sent.acked_events)
        ),
        "",
        None,
    ));
    rows.push(row(
        "restart: forwarder peak RSS while draining (VmHWM; sampled)",
        format!("{} ({})", mib(restart.peak_rss), mib(restart.sampled_rss)),
        "<= 100 MiB",
        Some(restart.peak_rss as f64 <= 100.0 * MIB),
    ));
    let peak = backlog.dir.0.max(restart.peak_dir).max(1);
    let given_back = restart.dir_after_stop.0 as f64 <= 0.1 * peak as f64;
    rows.push(row(
        "restart: queue dir after drain / after stop / after reopen",
        format!(
            "{} / {} / {} (peak {})",
            mib(restart.dir_after_drain.0),
            mib(restart.dir_after_stop.0),
            mib(restart.dir_after_reopen.0),
            mib(peak)
        ),
        "given back (<= 10% of peak)",
        Some(given_back),
    ));
    rows.push(row(
        "restart: events delivered (duplicates)",
        format!(
            "{} ({})",
            restart.delivered,
            restart.delivered.saturating_sub(backlog.sent.acked_events)
        ),
        "",
        None,
    ));

    println!();
    for (phase, sent) in [
        ("live", &live.sent),
        ("ingest", &ingest_report.sent),
        ("backlog", &backlog.sent),
    ] {
        println!(
            "client, {phase}: {} requests, {} answered 503, {} errors (all retried)",
            sent.requests, sent.unavailable, sent.errors
        );
    }
    println!("restart log: {}", restart.log_open_line.trim());
    println!();
    print_table(&rows);
}
