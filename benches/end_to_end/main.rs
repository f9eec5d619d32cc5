//! End-to-end benchmark: the real `sekoia-forwarder` binary, its local API, its queue on disk and
//! its delivery to an in-process mock intake, 200-byte events, on 127.0.0.1 only.
//!
//! `cargo bench --bench end_to_end` (release build). Figures are recorded in
//! docs/performance.md. Six phases, each with a fresh queue directory and a fresh process (so
//! that the process's peak RSS, `VmHWM`, belongs to that phase alone); `E2E_PHASES` (or
//! `--phases`) picks some of them, e.g. `E2E_PHASES=small,live` (default: all):
//!
//! 0. **small** ([`small`]): requests of 1, 10, 100 and 1,000 events over 8 or 64 connections,
//!    straight to a mock and through the forwarder, in the same run: the ratio of the rates,
//!    forwarder CPU per million events, bytes written per payload byte. `E2E_SMALL_SCALE`
//!    multiplies its event counts; `E2E_SMALL_CELLS=1x8,100x8` keeps only some rows.
//! 0. **syslog** ([`syslog`]): 200-byte lines over TCP (1, 8, 1,000 connections) and UDP into
//!    the syslog source -> queue -> mock intake: events/s, CPU per million, peak RSS; and the
//!    memory 1,000 idle TCP connections add. `E2E_SYSLOG_SCALE` multiplies its event counts;
//!    `E2E_SYSLOG_CELLS='tcp x1000,udp x1'` keeps only the cells named.
//! 0. **file** ([`file`]): 200-byte lines appended to a log file the file source tails, and a
//!    file read from its beginning at start -> queue -> mock intake: lines/s, CPU per million,
//!    peak RSS. `E2E_FILE_LINES` (default 2,000,000) lines per cell.
//! 1. **live**: client → forwarder's `POST /jsons` (batches of 1,000 events, several keep-alive
//!    connections, bodies serialised beforehand) → queue → mock intake. Events/s from the first
//!    send to the last event acknowledged by the mock; forwarder CPU seconds per million events;
//!    peak RSS; queue directory size per queued event while sampled, and after the drain; bytes
//!    the forwarder wrote to the disk (`write_bytes` of `/proc/PID/io`) per payload byte.
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
//! and `E2E_SYSLOG_TCP_CONFIG` to the syslog phase's TCP source (e.g.
//! `E2E_SYSLOG_TCP_CONFIG='max_buffered_bytes = 16777216'`), to compare settings; by default the forwarder runs on its defaults. `E2E_BINARY` runs another
//! build of the forwarder (a copy made before a change, to compare both in one sitting).
//! `E2E_DROP_CACHES=1` empties the
//! page cache before the restart (root only), so that the queue is read from the disk as after
//! a reboot; without it the restart finds the queue in the page cache.
//!
//! Not in the default list: **eventtime** ([`event_time`], `E2E_PHASES=eventtime`): requests
//! and CPU per million events with `event_time = "reception"` and `"intake"`, on a live stream
//! at 10 and 10,000 events/s and on the backlog of a 2-hour outage (about 6 minutes, mostly
//! paced sending).
//!
//! Every wait has a deadline; the benchmark ends by itself, and prints one table of every
//! figure beside its target.

#[path = "../../tests/common/mod.rs"]
mod common;

mod client;
mod event_time;
mod file;
mod phases;
mod probe;
mod report;
mod small;
mod syslog;

use std::time::Duration;

use client::Bodies;
use phases::{ingest, live, restart_and_drain, Ingest, Live, Restart};
use probe::clock_ticks;
use report::{print_table, Row};

/// Payload bytes of one event.
pub const EVENT_BYTES: usize = 200;
/// Events in one request of the client, in the live, ingest and backlog phases.
const EVENTS_PER_REQUEST: usize = 1000;
pub const KEY: &str = "bench-intake-key-0001";
pub const MIB: f64 = 1024.0 * 1024.0;

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

pub struct Params {
    pub live_events: u64,
    pub ingest_events: u64,
    pub backlog_events: u64,
    pub connections: usize,
    /// Phases to run: small, syslog, file, live, ingest, backlog.
    pub phases: Vec<String>,
    pub small_scale: f64,
    pub syslog_scale: f64,
    pub file_lines: u64,
}

impl Params {
    fn from_env_and_args() -> Params {
        let args: Vec<String> = std::env::args().collect();
        let text_of = |env: &str, flag: &str| -> Option<String> {
            let from_args = args.iter().enumerate().find_map(|(i, a)| {
                if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
                    Some(v.to_owned())
                } else if a == flag {
                    args.get(i + 1).cloned()
                } else {
                    None
                }
            });
            from_args.or_else(|| std::env::var(env).ok())
        };
        let get = |env: &str, flag: &str, default: u64| -> u64 {
            let text = text_of(env, flag);
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
            file_lines: get("E2E_FILE_LINES", "--file-lines", 2_000_000).max(1000),
            phases: text_of("E2E_PHASES", "--phases")
                .unwrap_or_else(|| "small,syslog,file,live,ingest,backlog".into())
                .split(',')
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect(),
            small_scale: text_of("E2E_SMALL_SCALE", "--small-scale")
                .map(|t| {
                    t.parse()
                        .unwrap_or_else(|_| panic!("E2E_SMALL_SCALE: not a number: {t:?}"))
                })
                .unwrap_or(1.0),
            syslog_scale: text_of("E2E_SYSLOG_SCALE", "--syslog-scale")
                .map(|t| {
                    t.parse()
                        .unwrap_or_else(|_| panic!("E2E_SYSLOG_SCALE: not a number: {t:?}"))
                })
                .unwrap_or(1.0),
        }
    }

    fn runs(&self, phase: &str) -> bool {
        self.phases.iter().any(|p| p == phase)
    }
}

/// A generous bound on any phase moving `events`: 60 s plus 20,000 events/s (25x below target).
pub fn deadline_for(events: u64) -> Duration {
    Duration::from_secs(60) + Duration::from_secs_f64(events as f64 / 20_000.0)
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
        "end_to_end: {} CPUs, {}-byte events, {} connections, phases {:?}; binary {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        EVENT_BYTES,
        p.connections,
        p.phases,
        common::binary(),
    );
    if let Ok(extra) = std::env::var("E2E_QUEUE_CONFIG") {
        println!("[queue] settings added: {extra:?}");
    }
    if let Ok(extra) = std::env::var("E2E_INTAKE_CONFIG") {
        println!("[intake] settings added: {extra:?}");
    }
    let bodies = Bodies::new(EVENTS_PER_REQUEST);
    let mut rows: Vec<Row> = Vec::new();
    rt.block_on(async {
        if p.runs("small") {
            let cells = small::run(&small::cells(p.small_scale), ticks).await;
            report::small_rows(&cells, &mut rows);
        }
        if p.runs("syslog") {
            let (cells, idle) = syslog::run(&syslog::cells(p.syslog_scale), ticks).await;
            syslog::rows(&cells, &idle, &mut rows);
        }
        if p.runs("file") {
            let cells = file::run(p.file_lines, ticks).await;
            file::rows(&cells, &mut rows);
        }
        if p.runs("eventtime") {
            let cells = event_time::run(ticks).await;
            event_time::rows(&cells, &mut rows);
        }
        if p.runs("live") {
            let live: Live = live(&p, bodies.clone(), ticks).await;
            println!("live: done in {:.1} s", live.elapsed.as_secs_f64());
            print_client("live", &live.sent);
            report::live_rows(&live, &mut rows);
        }
        if p.runs("ingest") {
            println!("ingest: {} events, intake down", p.ingest_events);
            let dir = tempfile::tempdir().expect("tempdir");
            let ingest_report: Ingest =
                ingest(dir.path(), p.ingest_events, &p, bodies.clone(), ticks).await;
            println!(
                "ingest: done in {:.1} s",
                ingest_report.sent.elapsed.as_secs_f64()
            );
            print_client("ingest", &ingest_report.sent);
            report::ingest_rows(&ingest_report, &mut rows);
        }
        if p.runs("backlog") {
            println!("backlog: filling {} events, intake down", p.backlog_events);
            let dir = tempfile::tempdir().expect("tempdir");
            let backlog = ingest(dir.path(), p.backlog_events, &p, bodies.clone(), ticks).await;
            println!(
                "backlog: filled in {:.1} s; restarting with the intake up",
                backlog.sent.elapsed.as_secs_f64()
            );
            print_client("backlog", &backlog.sent);
            let restart: Restart =
                restart_and_drain(dir.path(), backlog.sent.acked_events, ticks).await;
            println!("backlog: drained in {:.1} s", restart.drain.as_secs_f64());
            println!("restart log: {}", restart.log_open_line.trim());
            report::backlog_rows(&backlog, &restart, &mut rows);
        }
    });
    println!();
    print_table(&rows);
}

fn print_client(phase: &str, sent: &client::SendReport) {
    println!(
        "client, {phase}: {} requests, {} answered 503, {} errors (all retried)",
        sent.requests, sent.unavailable, sent.errors
    );
}
