//! Queue append (durable: group commit + fsync) and drain (read + ack), 200-byte events.
//!
//! `cargo bench --bench queue`. Figures are recorded in docs/performance.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sekoia_forwarder::config::QueueConfig;
use sekoia_forwarder::intake_api::IncomingEvent;
use sekoia_forwarder::queue::{Ack, Position, Queue};

const EVENT_BYTES: usize = 200;

fn events(n: usize) -> Vec<IncomingEvent> {
    (0..n)
        .map(|i| IncomingEvent {
            intake_key: "bench-intake-key".into(),
            timestamp: None,
            raw: format!("{i:0>EVENT_BYTES$}"),
        })
        .collect()
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

/// Reads batches of 10,000 events and acknowledges them, as delivery does.
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
                    loop {
                        let batch = queue.read(lane, cursor, 10_000, 5 << 20).expect("read");
                        if batch.chunks.is_empty() {
                            break;
                        }
                        cursor = batch.next;
                        let ack = Ack {
                            gen: batch.gen,
                            remove: batch.chunks.iter().map(|c| c.seq).collect(),
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
