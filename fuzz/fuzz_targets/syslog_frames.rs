//! The syslog stream decoder (`sources/syslog/framing.rs`): a TCP or TLS peer sends any bytes,
//! in reads of any size; its lines-only form reads files (and stdin) the same way. Whatever comes, the decoder must not panic, must hand out no message
//! over its limit, must hold no more than about the limit in memory, and must cut the same
//! messages however the stream was split into reads.
//!
//! Input: a byte for the limit, a byte for the oversize policy (bit 0), the decoder (bit 1:
//! syslog framing detected, or lines only) and the read size (the rest), then the stream.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sekoia_forwarder::sources::syslog::framing::{Frame, FrameDecoder, Oversize};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let [limit, mode, stream @ ..] = data else {
        return;
    };
    let max = 120 + usize::from(*limit) * 4;
    let oversize = if mode & 1 == 0 {
        Oversize::Truncate
    } else {
        Oversize::Split
    };
    let lines = mode & 2 != 0;
    let step = usize::from(mode >> 2).max(1);
    let whole = frames(max, oversize, lines, stream, stream.len().max(1));
    let stepped = frames(max, oversize, lines, stream, step);
    assert_eq!(whole, stepped, "the frames depend on how the stream was read");
    for frame in &whole {
        assert!(frame.message.len() <= max, "a frame over the limit");
        assert!(!frame.message.is_empty(), "an empty frame");
    }
});

fn frames(max: usize, oversize: Oversize, lines: bool, stream: &[u8], step: usize) -> Vec<Frame> {
    let mut decoder = if lines {
        FrameDecoder::lines(max, oversize)
    } else {
        FrameDecoder::new(max, oversize)
    };
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for read in stream.chunks(step) {
        buf.extend_from_slice(read);
        while let Some(frame) = decoder.decode(&mut buf).expect("decode never fails") {
            out.push(frame);
        }
        // What is held between reads: the limit and its slack, plus one read.
        assert!(buf.len() <= max + 8 + step + 10, "{} bytes held", buf.len());
    }
    while let Some(frame) = decoder.decode_eof(&mut buf).expect("decode never fails") {
        out.push(frame);
    }
    out
}
