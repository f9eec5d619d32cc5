//! Multi-line events (stack traces): lines that do not match the start-of-event pattern are
//! joined, with `\n`, to the event before, which is sent when the next one starts, when no line
//! came for the timeout, or when it would grow past the event limit (the line then starts an
//! event of its own, so that no line is cut).

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::sources::syslog::framing::{Cut, Frame};

/// A line of a file, where it starts.
#[derive(Debug)]
pub struct Line {
    pub frame: Frame,
    /// Offset of its first byte in the file.
    pub start: u64,
}

/// An event being joined.
#[derive(Debug)]
struct Pending {
    text: Vec<u8>,
    cut: Cut,
    /// Offset of its first line: a checkpoint may not pass it while it is pending.
    start: u64,
    since: Instant,
}

/// Joins the lines of one file into events.
#[derive(Debug)]
pub struct Joiner {
    start: regex::bytes::Regex,
    timeout: Duration,
    max: usize,
    pending: Option<Pending>,
}

impl Joiner {
    pub fn new(start: regex::bytes::Regex, timeout: Duration, max: usize) -> Joiner {
        Joiner {
            start,
            timeout,
            max,
            pending: None,
        }
    }

    /// Takes a line; pushes to `out` the event it ends, if any.
    pub fn push(&mut self, line: Line, now: Instant, out: &mut Vec<Frame>) {
        let starts = self.start.is_match(&line.frame.message);
        match &mut self.pending {
            Some(p) if !starts && p.text.len() + 1 + line.frame.message.len() <= self.max => {
                p.text.push(b'\n');
                p.text.extend_from_slice(&line.frame.message);
                if p.cut == Cut::Whole {
                    p.cut = line.frame.cut;
                }
                p.since = now;
            }
            _ => {
                self.flush(out);
                self.pending = Some(Pending {
                    text: line.frame.message.to_vec(),
                    cut: line.frame.cut,
                    start: line.start,
                    since: now,
                });
            }
        }
    }

    /// Sends the pending event if no line came for the timeout.
    pub fn flush_if_idle(&mut self, now: Instant, out: &mut Vec<Frame>) {
        if self
            .pending
            .as_ref()
            .is_some_and(|p| now.duration_since(p.since) >= self.timeout)
        {
            self.flush(out);
        }
    }

    /// Sends the pending event, if any.
    pub fn flush(&mut self, out: &mut Vec<Frame>) {
        if let Some(p) = self.pending.take() {
            out.push(Frame {
                message: Bytes::from(p.text),
                cut: p.cut,
            });
        }
    }

    /// Where the pending event starts in the file, if one is pending.
    pub fn pending_start(&self) -> Option<u64> {
        self.pending.as_ref().map(|p| p.start)
    }

    /// When the pending event is due, if one is pending.
    pub fn due(&self) -> Option<Instant> {
        self.pending.as_ref().map(|p| p.since + self.timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str, start: u64) -> Line {
        Line {
            frame: Frame {
                message: Bytes::copy_from_slice(text.as_bytes()),
                cut: Cut::Whole,
            },
            start,
        }
    }

    fn texts(frames: &[Frame]) -> Vec<String> {
        frames
            .iter()
            .map(|f| String::from_utf8_lossy(&f.message).into_owned())
            .collect()
    }

    #[test]
    fn continuation_lines_join_the_event_before() {
        let re = regex::bytes::Regex::new(r"^\d{4}-").unwrap();
        let mut j = Joiner::new(re, Duration::from_secs(1), 1000);
        let now = Instant::now();
        let mut out = Vec::new();
        j.push(line("2024-01-01 boom", 0), now, &mut out);
        j.push(line("  at a()", 16), now, &mut out);
        j.push(line("  at b()", 25), now, &mut out);
        assert!(out.is_empty());
        assert_eq!(j.pending_start(), Some(0));
        j.push(line("2024-01-01 next", 34), now, &mut out);
        assert_eq!(texts(&out), ["2024-01-01 boom\n  at a()\n  at b()"]);
        assert_eq!(j.pending_start(), Some(34));
        j.flush_if_idle(now + Duration::from_millis(999), &mut out);
        assert_eq!(out.len(), 1);
        j.flush_if_idle(now + Duration::from_secs(1), &mut out);
        assert_eq!(texts(&out[1..]), ["2024-01-01 next"]);
        assert_eq!(j.pending_start(), None);
    }

    #[test]
    fn an_event_never_grows_past_the_limit() {
        let re = regex::bytes::Regex::new(r"^S").unwrap();
        let mut j = Joiner::new(re, Duration::from_secs(1), 20);
        let now = Instant::now();
        let mut out = Vec::new();
        for (i, text) in ["S start", "continued 1", "continued 2"].iter().enumerate() {
            j.push(line(text, i as u64 * 12), now, &mut out);
        }
        j.flush(&mut out);
        assert_eq!(texts(&out), ["S start\ncontinued 1", "continued 2"]);
        assert!(out.iter().all(|f| f.message.len() <= 20));
    }
}
