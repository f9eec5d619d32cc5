//! The benchmark's report: one table of every figure beside its target.

use std::time::Duration;

use crate::client::Bodies;
use crate::phases::{cpu_per_million, rate, Ingest, Live, Restart};
use crate::small::CellReport;
use crate::MIB;

pub struct Row {
    figure: String,
    value: String,
    target: &'static str,
    verdict: &'static str,
}

pub fn row(
    figure: impl Into<String>,
    value: String,
    target: &'static str,
    ok: Option<bool>,
) -> Row {
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

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB)
}

pub fn print_table(rows: &[Row]) {
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

/// The rows of the live phase.
pub fn live_rows(live: &Live, rows: &mut Vec<Row>) {
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

    rows.push(row(
        "live: bytes written to disk / payload",
        format!(
            "{:.2}x ({} / {})",
            live.written as f64 / live_payload(live) as f64,
            mib(live.written),
            mib(live_payload(live))
        ),
        "<= 2x",
        Some(live.written as f64 <= 2.0 * live_payload(live) as f64),
    ));
    compressed_reads_row("live", live.compressed_reads, rows);
}

/// How delivery read the compressed chunks of a phase or cell named `name`, if known.
pub fn compressed_reads_row(name: &str, reads: Option<(f64, f64)>, rows: &mut Vec<Row>) {
    if let Some((memory, decompressed)) = reads {
        rows.push(row(
            format!("{name}: compressed chunks read from memory / decompressed"),
            format!("{memory:.0} / {decompressed:.0}"),
            "",
            None,
        ));
    }
}

fn live_payload(live: &Live) -> u64 {
    (live.sent.acked_events * crate::EVENT_BYTES as u64).max(1)
}

/// The rows of the ingest phase (intake down).
pub fn ingest_rows(ingest_report: &Ingest, rows: &mut Vec<Row>) {
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
    // The same figure as the backlog's fill (no target here: the fill carries it), over the
    // payload acknowledged.
    let payload = Bodies::payload(ingest_report.sent.acked_events).max(1);
    rows.push(row(
        "ingest: bytes written to disk / payload",
        format!(
            "{:.2}x ({})",
            ingest_report.written as f64 / payload as f64,
            mib(ingest_report.written)
        ),
        "",
        None,
    ));
}

/// The rows of the backlog phase: the fill (intake down), then the restart and the drain.
pub fn backlog_rows(backlog: &Ingest, restart: &Restart, rows: &mut Vec<Row>) {
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
    let fill_written = backlog.written as f64 / payload as f64;
    rows.push(row(
        "backlog: bytes written to disk / payload while filling",
        format!("{fill_written:.2}x ({})", mib(backlog.written)),
        "<= 1.5x",
        Some(fill_written <= 1.5),
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
}

/// The rows of the small-request phase: one per request size and connection count.
pub fn small_rows(cells: &[CellReport], rows: &mut Vec<Row>) {
    for c in cells {
        let (per_request, connections) = (c.cell.per_request, c.cell.connections);
        let (target, ok): (&'static str, Option<bool>) = match (per_request, connections) {
            (1, 8) => (
                ">= 0.5 at <= 40 CPU-s/M",
                Some(c.ratio() >= 0.5 && c.cpu_per_million <= 40.0),
            ),
            (1, 64) => (">= 0.8", Some(c.ratio() >= 0.8)),
            (100, 8) => (">= 0.7", Some(c.ratio() >= 0.7)),
            (1000, 8) => ("no worse than 0.58", Some(c.ratio() >= 0.58)),
            _ => ("", None),
        };
        rows.push(row(
            format!("small: {per_request} ev/request, {connections} conns: forwarded / direct"),
            format!(
                "{:.2} ({:.0} / {:.0} ev/s){}",
                c.ratio(),
                c.forwarded_rate,
                c.direct_rate,
                if c.complete { "" } else { " (INCOMPLETE)" }
            ),
            target,
            ok.map(|ok| ok && c.complete),
        ));
        rows.push(row(
            format!("small: {per_request} ev/request, {connections} conns: CPU, written, dups"),
            format!(
                "{:.1} CPU-s/M (the mock alone: {}), {:.2}x payload written, {:.1} events/commit, \
                 {} duplicates",
                c.cpu_per_million,
                c.direct_cpu_per_million
                    .map_or("not measured".to_owned(), |m| format!("{m:.1}")),
                c.written_per_payload,
                c.events_per_commit.unwrap_or(f64::NAN),
                c.duplicates
            ),
            "",
            None,
        ));
    }
}
