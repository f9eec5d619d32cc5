//! Queue append (durable: group commit + fsync) and drain (read + ack), 200-byte access-log
//! lines.
//!
//! `cargo bench --bench queue`. Figures are recorded in docs/performance.md.

use std::hint::black_box;
use std::sync::OnceLock;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sekoia_forwarder::config::QueueConfig;
use sekoia_forwarder::intake_api::IncomingEvent;
use sekoia_forwarder::queue::{Ack, Position, Queue, ReadLimits};

const EVENT_BYTES: usize = 200;

/// Distinct event texts the benches cycle through.
const TEXTS: usize = 1000;

fn events(n: usize) -> Vec<IncomingEvent> {
    static TEXT: OnceLock<Vec<String>> = OnceLock::new();
    let texts = TEXT.get_or_init(|| (0..TEXTS).map(event_text).collect());
    (0..n)
        .map(|i| IncomingEvent {
            intake_key: "bench-intake-key".into(),
            timestamp: None,
            raw: texts[i % TEXTS].clone(),
        })
        .collect()
}

/// One 200-byte access-log line: fixed words, and fields that vary pseudo-randomly (address,
/// path, status, size, a hex trace id, the user agent), so that the queue's lz4 compression
/// sees about what real logs give it (~2x), not a run of zeros (~35x).
fn event_text(i: usize) -> String {
    const WORDS: [&str; 8] = [
        "items", "orders", "users", "cart", "search", "login", "reports", "billing",
    ];
    const AGENTS: [&str; 4] = [
        "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
        "curl/8.5.0",
        "python-requests/2.32.3",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) \
         Chrome/131.0.0.0 Safari/537.36",
    ];
    // xorshift64
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let r = next();
    let field = |shift: u32, n: u64| ((r >> shift) % n) as usize;
    let mut line = format!(
        "<134>1 2025-01-15T10:{:02}:{:02}.{:03}Z web-01 nginx 4242 - - {}.{}.{}.{} GET \
         /api/v1/{}/{i} {} {} trace={:016x}{:016x} ua={}",
        (i / 60) % 60,
        i % 60,
        i % 1000,
        field(0, 256),
        field(8, 256),
        field(16, 256),
        field(24, 256),
        WORDS[field(32, 8)],
        [200, 200, 304, 404][field(36, 4)],
        field(40, 60_000),
        next(),
        next(),
        AGENTS[field(60, 4)],
    );
    while line.len() < EVENT_BYTES {
        line.push_str(" ref=/");
        line.push_str(WORDS[(next() % 8) as usize]);
    }
    line.truncate(EVENT_BYTES);
    line
}

fn open(dir: &std::path::Path) -> Queue {
    Queue::open(&QueueConfig {
        path: dir.join("q"),
        ..QueueConfig::default()
    })
    .expect("open queue")
}

/// Concurrent senders of `per_request` events each: what the HTTP source does under load.
fn append(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("append");
    group.sample_size(10);
    for per_request in [1usize, 100, 1000] {
        let senders = 16;
        let total = senders * per_request * 10.max(1000 / per_request);
        group.throughput(Throughput::Elements(total as u64));
        group.bench_with_input(
            BenchmarkId::new("events_per_request", per_request),
            &per_request,
            |b, &per_request| {
                let dir = tempfile::tempdir().expect("tempdir");
                let queue = open(dir.path());
                b.iter(|| {
                    rt.block_on(async {
                        let mut tasks = Vec::new();
                        for _ in 0..senders {
                            let q = queue.clone();
                            let rounds = total / senders / per_request;
                            tasks.push(tokio::spawn(async move {
                                for _ in 0..rounds {
                                    q.append(events(per_request)).await.expect("append");
                                }
                            }));
                        }
                        for t in tasks {
                            t.await.expect("task");
                        }
                    })
                });
            },
        );
    }
    group.finish();
}

/// Reads batches of 10,000 events and acknowledges them, as delivery does: each chunk is read
/// as a view of the stored bytes and its events escaped into a `/jsons` body.
fn drain(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("drain");
    group.sample_size(10);
    let total = 100_000;
    group.throughput(Throughput::Elements(total as u64));
    group.bench_function("read_and_ack", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().expect("tempdir");
                let queue = open(dir.path());
                rt.block_on(async {
                    for _ in 0..total / 1000 {
                        queue.append(events(1000)).await.expect("append");
                    }
                });
                (dir, queue)
            },
            |(dir, queue)| {
                rt.block_on(async {
                    let lane = queue.lanes()[0].id;
                    let mut cursor = Position::default();
                    let limits = ReadLimits {
                        max_events: 10_000,
                        max_bytes: 5 << 20,
                        reception_tolerance_ms: Some(1000),
                    };
                    loop {
                        let mut body = Vec::new();
                        let mut seqs = Vec::new();
                        let span = queue
                            .read_with(lane, cursor, limits, &mut |seq, chunk| {
                                seqs.push(seq);
                                for event in &chunk.events {
                                    json_escape_simd::escape_into(event, &mut body);
                                }
                            })
                            .expect("read");
                        if seqs.is_empty() {
                            break;
                        }
                        black_box(&body);
                        cursor = span.next;
                        let ack = Ack {
                            gen: span.gen,
                            remove: seqs,
                            ..Ack::default()
                        };
                        queue.ack(lane, ack).await.expect("ack");
                    }
                    assert_eq!(queue.totals().0, 0);
                });
                drop(queue);
                drop(dir);
            },
            criterion::BatchSize::PerIteration,
        );
    });
    group.finish();
}

criterion_group!(benches, append, drain);
criterion_main!(benches);
