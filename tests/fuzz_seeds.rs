//! Writes the seed inputs of the fuzz targets (`fuzz/`) into `fuzz/corpus/<target>/`, from real
//! examples: the intake API's own examples, values made by the queue's own encoders, the
//! example configurations. Run it when a format changes, then minimise the corpora
//! (docs/reliability.md, "Fuzzing"):
//!
//! `cargo test --test fuzz_seeds -- --ignored`
//!
//! The input formats are those described at the top of each target in `fuzz/fuzz_targets/`.
//! The queue's seeds come from the queue itself (`queue::fuzzing`), and a test that `cargo
//! test` runs checks that those on disk are up to date.

use std::io::Write;
use std::path::{Path, PathBuf};

use sekoia_forwarder::queue::fuzzing::queue_record_seeds;

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(corpus(target).join(format!("seed-{name}")), bytes).unwrap();
}

#[test]
#[ignore = "writes the fuzz seeds into fuzz/corpus: run on purpose"]
fn write_fuzz_seeds() {
    intake_seeds();
    queue_seeds();
    retry_after_seeds();
    config_seeds();
    file_checkpoint_seeds();
}

// --- intake_request ---------------------------------------------------------------------------

const LINE1: &str = "[764008:0] info: 198.51.100.10 example.org. A IN";
const LINE2: &str = "[764023:0] info: 2.34.100.56 text.org. A IN";

/// How the example gives the key (`/plain`, `/plain/batch`, `/jsons`).
#[derive(Clone, Copy)]
enum KeyIn {
    Header,
    Basic,
    Query,
    Body,
}

/// One intake request in the target's input format.
fn request(
    endpoint: u8,
    key: KeyIn,
    encoding: u8,
    timestamp: Option<&str>,
    body: &[u8],
) -> Vec<u8> {
    let mut flags = encoding;
    let mut fields = Vec::new();
    let mut field = |bit: u8, value: &[u8]| {
        flags |= 1 << bit;
        fields.push(u8::try_from(value.len()).unwrap());
        fields.extend_from_slice(value);
    };
    match key {
        KeyIn::Header => field(2, b"YOUR_INTAKE_KEY"),
        // `HTTPBasicAuth(None, "YOUR_INTAKE_KEY")`: "None:YOUR_INTAKE_KEY".
        KeyIn::Basic => field(3, b"Basic Tm9uZTpZT1VSX0lOVEFLRV9LRVk="),
        KeyIn::Query => field(4, b"intake_key=YOUR_INTAKE_KEY"),
        KeyIn::Body => {}
    }
    if let Some(ts) = timestamp {
        field(5, ts.as_bytes());
    }
    let mut out = vec![endpoint, flags];
    out.extend_from_slice(&fields);
    out.extend_from_slice(body);
    out
}

fn gzipped(body: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(body).unwrap();
    e.finish().unwrap()
}

fn intake_seeds() {
    let batch = format!("{LINE1}\n{LINE2}");
    let jsons = serde_json::to_vec(&[LINE1, LINE2]).unwrap();
    let keys = [
        ("header", KeyIn::Header),
        ("basic", KeyIn::Basic),
        ("query", KeyIn::Query),
    ];
    for (name, key) in keys {
        write(
            "intake_request",
            &format!("plain-{name}"),
            &request(0, key, 0, None, LINE1.as_bytes()),
        );
        write(
            "intake_request",
            &format!("plain-batch-{name}"),
            &request(1, key, 0, None, batch.as_bytes()),
        );
        write(
            "intake_request",
            &format!("jsons-{name}"),
            &request(2, key, 0, None, &jsons),
        );
    }
    let array = serde_json::json!([
        {"timestamp": "2021-04-05T21:33:31+02:00", "intake_key": "YOUR_INTAKE_KEY", "json": LINE1},
        {"intake_key": "ANOTHER_INTAKE_KEY", "json": LINE2},
    ]);
    let array = serde_json::to_vec(&array).unwrap();
    write(
        "intake_request",
        "array",
        &request(3, KeyIn::Body, 0, None, &array),
    );
    let structured = serde_json::json!({"intake_key": "YOUR_INTAKE_KEY", "json": LINE1});
    let structured = serde_json::to_vec(&structured).unwrap();
    write(
        "intake_request",
        "structured",
        &request(4, KeyIn::Body, 0, None, &structured),
    );
    let quoted = serde_json::json!({
        "intake_key": "YOUR_INTAKE_KEY",
        "json": "{\"key\": \"value\"}",
        "@timestamp": "2021-04-05T21:33:31+02:00",
    });
    let quoted = serde_json::to_vec(&quoted).unwrap();
    write(
        "intake_request",
        "structured-json",
        &request(4, KeyIn::Body, 0, None, &quoted),
    );
    let sbatch = serde_json::json!({"intake_key": "YOUR_INTAKE_KEY", "jsons": [LINE1, LINE2]});
    let sbatch = serde_json::to_vec(&sbatch).unwrap();
    write(
        "intake_request",
        "batch",
        &request(5, KeyIn::Body, 0, None, &sbatch),
    );
    // The event date header, and gzip bodies: compressed by the target (1) and as a stream (2).
    let ts = Some("2021-04-05T21:33:31+02:00");
    write(
        "intake_request",
        "plain-timestamp",
        &request(0, KeyIn::Header, 0, ts, LINE1.as_bytes()),
    );
    write(
        "intake_request",
        "jsons-gzip",
        &request(2, KeyIn::Header, 1, None, &jsons),
    );
    write(
        "intake_request",
        "batch-gzip",
        &request(5, KeyIn::Body, 1, None, &sbatch),
    );
    write(
        "intake_request",
        "plain-batch-gzip-stream",
        &request(1, KeyIn::Query, 2, None, &gzipped(batch.as_bytes())),
    );
    write(
        "intake_request",
        "array-gzip-stream",
        &request(3, KeyIn::Body, 2, None, &gzipped(&array)),
    );
}

// --- queue_record -----------------------------------------------------------------------------

/// Made by the queue itself, which keeps its formats private.
fn queue_seeds() {
    for (name, bytes) in queue_record_seeds([LINE1, LINE2]) {
        write("queue_record", name, &bytes);
    }
}

/// The queue's seeds on disk are what its encoders make today: a change to a stored format
/// that is not in the corpus fails here (write the seeds again, above, and minimise).
#[test]
fn queue_record_seeds_are_up_to_date() {
    for (name, bytes) in queue_record_seeds([LINE1, LINE2]) {
        let path = corpus("queue_record").join(format!("seed-{name}"));
        let stored = std::fs::read(&path).unwrap_or_default();
        assert!(stored == bytes, "{} is out of date", path.display());
    }
}

// --- retry_after ------------------------------------------------------------------------------

fn retry_after_seeds() {
    // Now: 2015-10-21T07:00:00Z.
    let now = 1_445_410_800u64.to_be_bytes();
    let values: [(&str, &str); 5] = [
        ("seconds", "120"),
        ("zero", "0"),
        ("imf-fixdate", "Wed, 21 Oct 2015 07:28:00 GMT"),
        ("rfc850", "Wednesday, 21-Oct-15 07:28:00 GMT"),
        ("asctime", "Wed Oct 21 07:28:00 2015"),
    ];
    for (name, value) in values {
        write("retry_after", name, &[&now[..], value.as_bytes()].concat());
    }
}

// --- config -----------------------------------------------------------------------------------

fn config_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, file) in [
        ("quickstart", "examples/quickstart.toml"),
        ("packaging", "packaging/config.toml"),
        ("syslog", "examples/syslog.toml"),
        ("file", "examples/file.toml"),
    ] {
        write("config", name, &std::fs::read(root.join(file)).unwrap());
    }
    // The smallest configuration (the contract example of `config.rs`).
    let minimal = "[queue]\npath = \"/var/lib/sekoia-forwarder\"\n\n[intake]\n\
                   url = \"https://intake.sekoia.io\"\n\n[[source]]\ntype = \"http\"\n\
                   listen = \"127.0.0.1:10080\"\n";
    write("config", "minimal", minimal.as_bytes());
}

// --- file_checkpoint --------------------------------------------------------------------------

fn file_checkpoint_seeds() {
    use sekoia_forwarder::sources::file::position::{FileId, Fingerprint, Position};
    let position = Position {
        path: "/var/log/nginx/access.log".into(),
        offset: 1_234_567,
        fingerprint: Fingerprint {
            len: 256,
            crc: 0x1234_5678,
        },
    };
    write(
        "file_checkpoint",
        "position",
        &[&[0][..], &position.encode()].concat(),
    );
    let name = FileId {
        dev: 2049,
        ino: 1_048_577,
    }
    .checkpoint_name();
    write("file_checkpoint", "name", &[&[1][..], &name].concat());
}
