//! Cutting a syslog byte stream (TCP, TLS) into messages, in bounded memory.
//!
//! Two framings exist (RFC 6587) and senders do not say which they use, so it is detected per
//! connection from its first byte: a digit means *octet counting* (`MSG-LEN SP MSG`, what
//! rsyslog and syslog-ng send with `octet-counted`/`syslog()` framing and `logger
//! --octet-count`), anything else *non-transparent framing*: one message per line. A message
//! keeps its bytes as sent (RFC 3164, RFC 5424 or neither: the intake parses them) but for
//! its trailing newline, CR and NUL bytes.
//!
//! A message longer than `max` bytes (the intake refuses events over 250,000 bytes) is never
//! dropped silently and never held whole in memory; [`Oversize`] says what becomes of it. An
//! octet count that is not a number (a sender that does not frame as it claims) does not cost
//! the rest of the stream: the connection goes on as one message per line from that byte,
//! and [`FrameDecoder::framing_errors`] counts it.

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::Decoder;

/// Digits of the longest octet count taken (up to 999,999,999 bytes, which is then cut to
/// `max`); more is not a count.
const MAX_COUNT_DIGITS: usize = 9;

/// What becomes of a message longer than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Oversize {
    /// Keep its first bytes and say, at its end, how long it was.
    #[default]
    Truncate,
    /// Send it as several events of at most the limit each, in order.
    Split,
    /// Do not send it: keep its first bytes, marked as `Truncate` marks them, in the dead
    /// letters (the decoder cuts it as `Truncate` does; the source keeps it aside).
    DeadLetter,
}

/// One message out of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// At most the decoder's `max` bytes.
    pub message: Bytes,
    pub cut: Cut,
}

/// Whether a message is whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    Whole,
    /// Its first bytes, marked at the end with how long it was: `total` bytes.
    Truncated {
        total: u64,
    },
    /// One piece of a message split in several.
    Piece,
}

/// Bytes of trailing CR / NUL a message may have beyond `max` and still be whole once they
/// are stripped: a line is known to be over the limit only past `max + SLACK` bytes.
const SLACK: usize = 8;

/// Room left at the end of a truncated message for its mark.
const MARK_ROOM: usize = 60;

/// How the connection frames its messages, once its first byte is seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    OctetCounted,
    Lines,
}

/// The bytes of one message as they come, in one piece or several.
#[derive(Debug)]
enum Assembly {
    /// Nothing of a message over the limit yet.
    Empty,
    /// Truncating: the first bytes are kept in `head` (a few more than will stay, so that
    /// the cut can fall between characters), `seen` bytes of the message so far, the last
    /// `run` of which (at most [`SLACK`]) are newline, CR or NUL, to be stripped if they end it.
    Truncating {
        head: BytesMut,
        seen: u64,
        run: usize,
    },
    /// Splitting: what is not handed out yet (less than `max` bytes once pieces are cut).
    Splitting { carry: BytesMut },
}

/// A [`Decoder`] of syslog messages (RFC 6587 framing detected per connection).
#[derive(Debug)]
pub struct FrameDecoder {
    max: usize,
    oversize: Oversize,
    framing: Option<Framing>,
    /// Bytes of the current octet-counted message still to come, once its count is read.
    counted: Option<u64>,
    assembly: Assembly,
    /// Frames ready to be handed out (the pieces of a split message).
    ready: std::collections::VecDeque<Frame>,
    /// How far the current line has been searched for its newline.
    scanned: usize,
    framing_errors: u64,
}

/// What the framing found next in the buffer.
enum Step {
    /// Bytes of the current message; `end` if they are its last.
    Bytes { bytes: Bytes, end: bool },
    /// Nothing more until more bytes come.
    Wait,
}

impl FrameDecoder {
    /// `max`: the most bytes of one message (at least `2 * MARK_ROOM`, so that a truncated
    /// message keeps some of itself).
    pub fn new(max: usize, oversize: Oversize) -> FrameDecoder {
        FrameDecoder {
            max: max.max(2 * MARK_ROOM),
            oversize,
            framing: None,
            counted: None,
            assembly: Assembly::Empty,
            ready: std::collections::VecDeque::new(),
            scanned: 0,
            framing_errors: 0,
        }
    }

    /// A decoder of one message per line, whatever the first byte: for byte streams that are
    /// not syslog connections (files, stdin), where a line may well start with a digit.
    pub fn lines(max: usize, oversize: Oversize) -> FrameDecoder {
        FrameDecoder {
            framing: Some(Framing::Lines),
            ..FrameDecoder::new(max, oversize)
        }
    }

    /// Bytes of the message in progress taken out of the buffer but not handed out yet (the
    /// start of a long message being truncated, what is left of one being split): a reader
    /// that can read its input again (a file) resumes that many bytes before the buffer's
    /// start, so that no message is lost or sent twice.
    pub fn pending_bytes(&self) -> u64 {
        match &self.assembly {
            Assembly::Empty => 0,
            Assembly::Truncating { seen, .. } => *seen,
            Assembly::Splitting { carry } => carry.len() as u64,
        }
    }

    /// Octet counts that were not numbers, after which the connection was read line by line.
    pub fn framing_errors(&self) -> u64 {
        self.framing_errors
    }

    /// Whether the connection turned out to be octet-counted (`None` before its first byte).
    pub fn octet_counted(&self) -> Option<bool> {
        self.framing.map(|f| f == Framing::OctetCounted)
    }

    /// One whole message (a UDP datagram): its frame, or frames if it is split; none if it
    /// is empty once stripped.
    pub fn message(&mut self, bytes: Bytes) -> impl Iterator<Item = Frame> + '_ {
        self.take(bytes, true);
        self.ready.drain(..)
    }

    fn next_frame(&mut self, buf: &mut BytesMut, eof: bool) -> Option<Frame> {
        loop {
            if let Some(frame) = self.ready.pop_front() {
                return Some(frame);
            }
            match self.step(buf, eof)? {
                Step::Bytes { bytes, end } => self.take(bytes, end),
                Step::Wait => return None,
            }
        }
    }

    /// The next bytes of the current message, by the connection's framing; `None` once the
    /// buffer is empty at the end of the stream.
    fn step(&mut self, buf: &mut BytesMut, eof: bool) -> Option<Step> {
        if eof && buf.is_empty() && self.counted.is_none() {
            // A message cut short by the end of the stream is handed out as it is.
            return match self.assembly {
                Assembly::Empty => None,
                _ => Some(Step::Bytes {
                    bytes: Bytes::new(),
                    end: true,
                }),
            };
        }
        let framing = match self.framing {
            Some(framing) => framing,
            None => {
                let framing = if buf.first()?.is_ascii_digit() {
                    Framing::OctetCounted
                } else {
                    Framing::Lines
                };
                self.framing = Some(framing);
                framing
            }
        };
        Some(match framing {
            Framing::Lines => self.line_step(buf, eof),
            Framing::OctetCounted => self.counted_step(buf, eof),
        })
    }

    fn line_step(&mut self, buf: &mut BytesMut, eof: bool) -> Step {
        let from = self.scanned.min(buf.len());
        if let Some(at) = memchr::memchr(b'\n', &buf[from..]) {
            self.scanned = 0;
            let bytes = buf.split_to(from + at + 1).freeze();
            return Step::Bytes { bytes, end: true };
        }
        let long = !matches!(self.assembly, Assembly::Empty);
        if eof || (long && !buf.is_empty()) || buf.len() > self.max + SLACK {
            self.scanned = 0;
            return Step::Bytes {
                bytes: buf.split().freeze(),
                end: eof,
            };
        }
        self.scanned = buf.len();
        Step::Wait
    }

    fn counted_step(&mut self, buf: &mut BytesMut, eof: bool) -> Step {
        let left = match self.counted {
            Some(left) => left,
            None => match read_count(buf) {
                Count::Complete(count) => count,
                Count::Incomplete if !eof => return Step::Wait,
                // A stream that ends in the middle of a count, or a count that is not one:
                // its bytes are read as lines, not thrown away.
                Count::Incomplete => return self.line_step(buf, eof),
                Count::Invalid => {
                    self.framing_errors += 1;
                    self.framing = Some(Framing::Lines);
                    return self.line_step(buf, eof);
                }
            },
        };
        let available = buf.len() as u64;
        if available >= left {
            self.counted = None;
            let bytes = buf.split_to(left as usize).freeze();
            return Step::Bytes { bytes, end: true };
        }
        // Over the limit: what is here is taken without waiting for the rest; a message
        // within it waits until it is whole.
        if eof || (left > (self.max + SLACK) as u64 && !buf.is_empty()) {
            let bytes = buf.split().freeze();
            self.counted = if eof {
                None
            } else {
                Some(left - bytes.len() as u64)
            };
            return Step::Bytes { bytes, end: eof };
        }
        self.counted = Some(left);
        Step::Wait
    }

    /// Takes the next bytes of the current message: a whole message becomes a frame; a long
    /// one is truncated or split as it comes.
    fn take(&mut self, bytes: Bytes, end: bool) {
        if end && matches!(self.assembly, Assembly::Empty) {
            let message = strip_end(bytes.clone());
            if message.len() <= self.max {
                if !message.is_empty() {
                    self.ready.push_back(Frame {
                        message,
                        cut: Cut::Whole,
                    });
                }
                return;
            }
            // A whole message over the limit arrived at once: it goes the way of one that
            // came in pieces, so that the result does not depend on how it was read.
            self.take_long(bytes);
            self.finish(Bytes::new());
            return;
        }
        if end {
            self.finish(bytes);
        } else {
            self.take_long(bytes);
        }
    }

    /// More bytes of a message over the limit.
    fn take_long(&mut self, bytes: Bytes) {
        let head_room = self.max - MARK_ROOM + 4;
        match (&mut self.assembly, self.oversize) {
            (Assembly::Empty, Oversize::Truncate | Oversize::DeadLetter) => {
                let keep = bytes.len().min(head_room);
                self.assembly = Assembly::Truncating {
                    head: BytesMut::from(&bytes[..keep]),
                    seen: bytes.len() as u64,
                    run: trailing_run(&bytes),
                };
            }
            (Assembly::Truncating { head, seen, run }, _) => {
                let more = bytes.len().min(head_room.saturating_sub(head.len()));
                head.extend_from_slice(&bytes[..more]);
                *seen += bytes.len() as u64;
                let last = trailing_run(&bytes);
                *run = if last == bytes.len() {
                    (*run + last).min(SLACK)
                } else {
                    last
                };
            }
            (Assembly::Empty, Oversize::Split) => {
                self.assembly = Assembly::Splitting {
                    carry: BytesMut::from(&bytes[..]),
                };
                self.cut_pieces(false);
            }
            (Assembly::Splitting { carry }, _) => {
                carry.extend_from_slice(&bytes);
                self.cut_pieces(false);
            }
        }
    }

    /// The last bytes of a message over the limit.
    fn finish(&mut self, tail: Bytes) {
        if matches!(self.assembly, Assembly::Empty) {
            return self.take(tail, true);
        }
        self.take_long(tail);
        match std::mem::replace(&mut self.assembly, Assembly::Empty) {
            Assembly::Empty => {}
            Assembly::Truncating { head, seen, run } => {
                let total = seen - run as u64;
                let keep = char_boundary(&head, self.max - MARK_ROOM);
                self.ready.push_back(Frame {
                    message: mark_truncated(&head[..keep], total),
                    cut: Cut::Truncated { total },
                });
            }
            Assembly::Splitting { carry } => {
                let end = strip_end(carry.freeze());
                self.assembly = Assembly::Splitting {
                    carry: BytesMut::from(&end[..]),
                };
                self.cut_pieces(true);
                self.assembly = Assembly::Empty;
            }
        }
    }

    /// Hands out the pieces of `max` bytes of a split message; with `all`, the rest too.
    /// Without `all`, a piece is cut only once more than `max` bytes would be left of the
    /// message were it to end here (stripped), as they would be had it come in one read.
    fn cut_pieces(&mut self, all: bool) {
        let Assembly::Splitting { carry } = &mut self.assembly else {
            return;
        };
        while carry.len() - trailing_run(carry) > self.max || (all && !carry.is_empty()) {
            let size = char_boundary(carry, self.max);
            self.ready.push_back(Frame {
                message: carry.split_to(size).freeze(),
                cut: Cut::Piece,
            });
        }
    }
}

impl Decoder for FrameDecoder {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        Ok(self.next_frame(buf, false))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        Ok(self.next_frame(buf, true))
    }
}

fn mark_truncated(head: &[u8], total: u64) -> Bytes {
    let mut message = Vec::with_capacity(head.len() + MARK_ROOM);
    message.extend_from_slice(head);
    message
        .extend_from_slice(format!(" [truncated by sekoia-forwarder: {total} bytes]").as_bytes());
    Bytes::from(message)
}

/// The longest prefix of `buf` of at most `max` bytes that does not end inside a UTF-8
/// character (if the bytes are UTF-8 at all: otherwise `max`).
fn char_boundary(buf: &[u8], max: usize) -> usize {
    if max >= buf.len() {
        return buf.len();
    }
    // A continuation byte (10xxxxxx) just after the cut means the cut is inside a character:
    // back off to the character's first byte, at most 3 bytes.
    (max.saturating_sub(3)..=max)
        .rev()
        .find(|&cut| buf[cut] & 0xC0 != 0x80)
        .filter(|&cut| cut > 0)
        .unwrap_or(max)
}

/// A message without its trailing newline, CR and NUL bytes, up to [`SLACK`] of them: what a
/// sender ends a line with. Any number would be stripped only by holding them all before
/// knowing whether the message goes on, and a long message would then depend on its reads.
fn strip_end(mut message: Bytes) -> Bytes {
    let end = message.len() - trailing_run(&message);
    message.truncate(end);
    message
}

/// How many of the last (at most [`SLACK`]) bytes of `bytes` are newline, CR or NUL.
fn trailing_run(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .rev()
        .take(SLACK)
        .take_while(|b| matches!(b, b'\n' | b'\r' | b'\0'))
        .count()
}

enum Count {
    Complete(u64),
    Incomplete,
    Invalid,
}

/// Reads `MSG-LEN SP` off the front of `buf`.
fn read_count(buf: &mut BytesMut) -> Count {
    let digits = buf.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits > MAX_COUNT_DIGITS {
        return Count::Invalid;
    }
    match buf.get(digits) {
        None => Count::Incomplete,
        Some(b' ') if digits > 0 => {
            let count = buf[..digits]
                .iter()
                .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            buf.advance(digits + 1);
            Count::Complete(count)
        }
        Some(_) => Count::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every frame of `input` fed `step` bytes at a time, then the end of the stream.
    fn frames(max: usize, oversize: Oversize, input: &[u8], step: usize) -> Vec<Frame> {
        let mut decoder = FrameDecoder::new(max, oversize);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(step.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(frame) = decoder.decode(&mut buf).unwrap() {
                out.push(frame);
            }
        }
        while let Some(frame) = decoder.decode_eof(&mut buf).unwrap() {
            out.push(frame);
        }
        out
    }

    fn messages(frames: &[Frame]) -> Vec<String> {
        frames
            .iter()
            .map(|f| String::from_utf8_lossy(&f.message).into_owned())
            .collect()
    }

    /// The same frames whatever the reads' sizes.
    fn all_steps(max: usize, oversize: Oversize, input: &[u8]) -> Vec<Frame> {
        let whole = frames(max, oversize, input, input.len());
        for step in [1, 2, 3, 7, 64, 1000] {
            assert_eq!(frames(max, oversize, input, step), whole, "step {step}");
        }
        whole
    }

    #[test]
    fn lines_lose_their_newline_cr_and_nul() {
        let input =
            b"<13>Oct 11 22:14:15 host app: one\n<13>two\r\n\nthree\0\nlast without newline";
        let got = all_steps(1000, Oversize::Truncate, input);
        assert_eq!(
            messages(&got),
            [
                "<13>Oct 11 22:14:15 host app: one",
                "<13>two",
                "three",
                "last without newline"
            ]
        );
        assert!(got.iter().all(|f| f.cut == Cut::Whole));
    }

    #[test]
    fn octet_counting_is_detected_from_the_first_byte() {
        let a = "<165>1 2003-10-11T22:14:15.003Z host app - - - with\nnewline inside";
        let b = "<13>second\n";
        let input = format!("{} {a}{} {b}", a.len(), b.len());
        let got = all_steps(1000, Oversize::Truncate, input.as_bytes());
        assert_eq!(messages(&got), [a, "<13>second"]);
        let mut decoder = FrameDecoder::new(1000, Oversize::Truncate);
        let mut buf = BytesMut::from(input.as_bytes());
        decoder.decode(&mut buf).unwrap();
        assert_eq!(decoder.octet_counted(), Some(true));
    }

    #[test]
    fn a_lines_decoder_takes_a_leading_digit_as_text() {
        let mut decoder = FrameDecoder::lines(1000, Oversize::Truncate);
        let mut buf = BytesMut::from(&b"12 apples\n3 pears"[..]);
        let mut got = Vec::new();
        while let Some(f) = decoder.decode_eof(&mut buf).unwrap() {
            got.push(f);
        }
        assert_eq!(messages(&got), ["12 apples", "3 pears"]);
        assert_eq!(decoder.octet_counted(), Some(false));
    }

    #[test]
    fn a_count_that_is_not_one_goes_on_line_by_line() {
        let input = b"5 <13>a12x <13>b\n<13>c\n";
        let mut decoder = FrameDecoder::new(1000, Oversize::Truncate);
        let mut buf = BytesMut::from(&input[..]);
        let mut got = Vec::new();
        while let Some(f) = decoder.decode_eof(&mut buf).unwrap() {
            got.push(f);
        }
        assert_eq!(messages(&got), ["<13>a", "12x <13>b", "<13>c"]);
        assert_eq!(decoder.framing_errors(), 1);
    }

    #[test]
    fn a_stream_cut_in_the_middle_keeps_what_came() {
        assert_eq!(
            messages(&all_steps(1000, Oversize::Truncate, b"20 <13>only ten")),
            ["<13>only ten"]
        );
        assert_eq!(
            messages(&all_steps(1000, Oversize::Truncate, b"8 <13>abcd12")),
            ["<13>abcd", "12"]
        );
    }

    #[test]
    fn a_long_line_is_truncated_and_marked() {
        let long = "x".repeat(5000);
        let input = format!("{long}\n<13>next\n");
        let got = all_steps(1000, Oversize::Truncate, input.as_bytes());
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].cut, Cut::Truncated { total: 5000 });
        assert!(got[0].message.len() <= 1000);
        let text = String::from_utf8_lossy(&got[0].message);
        assert!(text.starts_with("xxxx"));
        assert!(
            text.ends_with(" [truncated by sekoia-forwarder: 5000 bytes]"),
            "{text}"
        );
        assert_eq!(messages(&got[1..]), ["<13>next"]);
    }

    #[test]
    fn a_long_counted_message_is_truncated_without_being_held_whole() {
        let long = "y".repeat(100_000);
        let input = format!("{} {long}9 <13>after", long.len());
        let got = all_steps(1000, Oversize::Truncate, input.as_bytes());
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].cut, Cut::Truncated { total: 100_000 });
        assert_eq!(messages(&got[1..]), ["<13>after"]);
        // Memory: the decoder consumes what it reads of a long message.
        let mut decoder = FrameDecoder::new(1000, Oversize::Truncate);
        let mut buf = BytesMut::new();
        for piece in input.as_bytes().chunks(4096).take(10) {
            buf.extend_from_slice(piece);
            while decoder.decode(&mut buf).unwrap().is_some() {}
            assert!(buf.len() <= 1000 + 4096, "{} bytes held", buf.len());
        }
    }

    #[test]
    fn a_long_message_is_split_in_order() {
        let long: String = (0..5000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        for input in [
            format!("{long}\n<13>next\n"),
            format!("{} {long}9 <13>next", long.len()),
        ] {
            let got = all_steps(1000, Oversize::Split, input.as_bytes());
            let (pieces, rest) = got.split_at(got.len() - 1);
            assert!(pieces
                .iter()
                .all(|f| f.cut == Cut::Piece && f.message.len() <= 1000));
            assert_eq!(messages(pieces).concat(), long);
            assert_eq!(messages(rest), ["<13>next"]);
        }
    }

    #[test]
    fn cuts_fall_between_utf8_characters() {
        let long = "é".repeat(3000);
        for oversize in [Oversize::Split, Oversize::Truncate] {
            let got = all_steps(1001, oversize, format!("{long}\n").as_bytes());
            for frame in &got {
                assert!(std::str::from_utf8(&frame.message).is_ok(), "{oversize:?}");
            }
        }
    }

    /// Found by the fuzz target: a long line's trailing CR counted in its length when it came
    /// in another read than its newline.
    #[test]
    fn a_long_line_counts_the_same_whatever_the_reads() {
        let long = "x".repeat(5000);
        for tail in ["\r\n", "\r\0\r\n", "\0"] {
            let got = all_steps(1000, Oversize::Truncate, format!("{long}{tail}").as_bytes());
            assert_eq!(got[0].cut, Cut::Truncated { total: 5000 }, "{tail:?}");
        }
    }

    /// A long message's last piece loses its CRs however the message was read, and a run of
    /// them longer than the few a sender ends a line with is kept (a decoder that stripped any
    /// number would have to hold them all, unbounded, before knowing).
    #[test]
    fn a_split_message_strips_a_few_trailing_bytes_only() {
        let long = "x".repeat(1005);
        let got = all_steps(1000, Oversize::Split, format!("{long}\r\r\n").as_bytes());
        assert_eq!(messages(&got), ["x".repeat(1000), "x".repeat(5)]);
        let got = all_steps(
            1000,
            Oversize::Split,
            format!("{long}{}\n", "\r".repeat(20)).as_bytes(),
        );
        assert_eq!(
            messages(&got),
            ["x".repeat(1000), format!("xxxxx{}", "\r".repeat(13))]
        );
        let mut decoder = FrameDecoder::new(1000, Oversize::Split);
        let mut buf = BytesMut::from(&b"x"[..]);
        while decoder.decode(&mut buf).unwrap().is_some() {}
        for _ in 0..100 {
            buf.extend_from_slice(&[b'\r'; 1000]);
            while decoder.decode(&mut buf).unwrap().is_some() {}
        }
        assert!(
            matches!(&decoder.assembly, Assembly::Splitting { carry } if carry.len() <= 1000 + SLACK),
            "a run of CRs is held whole"
        );
    }

    #[test]
    fn a_message_at_the_limit_is_whole() {
        let exact = "z".repeat(1000);
        for input in [format!("{exact}\r\n"), format!("1002 {exact}\r\n")] {
            let got = all_steps(1000, Oversize::Truncate, input.as_bytes());
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].cut, Cut::Whole);
            assert_eq!(got[0].message.len(), 1000);
        }
    }
}
