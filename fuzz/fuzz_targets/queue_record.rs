//! The decoders of what the queue stores (chunks, lane records, dead letters, the generation
//! summaries and lane names of the meta database, keys): stored bytes may be corrupt (bit rot,
//! a torn write), and a corrupt value must come back as an error for the queue to quarantine,
//! never as a panic, a hang or a huge allocation. libFuzzer's `-timeout` and `-malloc_limit_mb`
//! (see docs/reliability.md) turn a slow decode or an oversized allocation into a finding.
//!
//! Input: one byte choosing the decoder, then the stored value (or key). The decoders and the
//! checks are the queue's own (`sekoia_forwarder::queue::fuzzing`), which keeps its formats
//! private.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sekoia_forwarder::queue::fuzzing::queue_record(data));
