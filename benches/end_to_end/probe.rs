//! What the benchmark measures of the forwarder process and its queue: CPU time, memory, bytes
//! written to the disk, the queue directory's size, and samples of them over a phase.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::http_client;

/// How often resources are sampled during a phase.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process, in seconds (`pid` "self" for this process).
pub fn cpu_secs(pid: &str, ticks: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> f64 { fields.get(i).and_then(|f| f.parse().ok()).unwrap_or(0.0) };
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    (field(11) + field(12)) / ticks
}

/// A `kB` line of /proc/PID/status (VmHWM, VmRSS), in bytes.
pub fn proc_status_bytes(pid: u32, name: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Size of a directory tree: (apparent bytes, allocated bytes).
pub fn dir_size(path: &Path) -> (u64, u64) {
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
pub struct QueueView {
    pub events: u64,
    pub bytes: u64,
}

pub async fn queue_view(client: &reqwest::Client, admin: SocketAddr) -> Option<QueueView> {
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

/// A counter of the forwarder's `/metrics` (`sekoia_forwarder_NAME_total`).
pub async fn metric(client: &reqwest::Client, admin: SocketAddr, name: &str) -> Option<f64> {
    let text = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let wanted = format!("sekoia_forwarder_{name}_total ");
    text.lines()
        .find_map(|l| l.strip_prefix(&wanted))
        .and_then(|v| v.trim().parse().ok())
}

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub rss: u64,
    pub dir: (u64, u64),
    pub queue: QueueView,
}

/// Samples the forwarder's RSS, its queue directory and its queue until stopped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    samples: Arc<Mutex<Vec<Sample>>>,
}

impl Sampler {
    pub fn start(pid: u32, admin: SocketAddr, queue_dir: PathBuf) -> Sampler {
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

    pub async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        let samples = self.samples.lock().unwrap().clone();
        samples
    }
}

/// Disk use while events are queued, from samples: the sample holding the most queued events.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueuedDisk {
    pub dir_bytes: u64,
    pub queued_events: u64,
    pub queued_bytes: u64,
    pub peak_dir_bytes: u64,
    pub samples: usize,
}

impl QueuedDisk {
    pub fn from_samples(samples: &[Sample]) -> QueuedDisk {
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

    pub fn per_event(&self) -> Option<f64> {
        (self.queued_events > 0).then(|| self.dir_bytes as f64 / self.queued_events as f64)
    }
}

/// Bytes the process caused to be written to the storage layer (`write_bytes` of
/// `/proc/PID/io`): what wears a flash disk out, whatever the file system does with it.
pub fn write_bytes(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// How delivery read the queue's compressed chunks: from the bodies kept since their commit,
/// and decompressed from the store (a forwarder that keeps up reads them all from memory).
pub async fn compressed_reads(admin: SocketAddr) -> Option<(f64, f64)> {
    let client = http_client();
    let from_memory = metric(&client, admin, "queue_chunks_read_from_memory").await;
    let decompressed = metric(&client, admin, "queue_chunks_decompressed").await;
    from_memory.zip(decompressed)
}

/// Runs `work` while sampling how many events the forwarder has queued (every 100 ms);
/// returns what `work` returned and the most events seen queued at once. A forwarder whose
/// delivery keeps up holds little; one whose delivery is starved holds most of a burst.
pub async fn with_peak_queued<T>(
    admin: SocketAddr,
    work: impl std::future::Future<Output = T>,
) -> (T, u64) {
    let client = http_client();
    let done = std::cell::Cell::new(false);
    let peak = std::cell::Cell::new(0u64);
    let sampler = async {
        while !done.get() {
            if let Some(q) = queue_view(&client, admin).await {
                peak.set(peak.get().max(q.events));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let work = async {
        let out = work.await;
        done.set(true);
        out
    };
    let (out, ()) = tokio::join!(work, sampler);
    (out, peak.get())
}
