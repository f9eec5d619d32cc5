//! Retry delays. The `backoff` crate is in maintenance mode: it is used here and nowhere else,
//! so that replacing it touches one file.

use std::time::{Duration, SystemTime};

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;

/// Longest `Retry-After` obeyed; a longer one (or a date far ahead) is cut to this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How far each delay is drawn around its step (0.5: between half and one and a half times).
const RANDOMIZATION: f64 = 0.5;

/// Exponential backoff with jitter that never gives up: the data waits, it is not dropped.
#[derive(Debug)]
pub struct Retry {
    inner: ExponentialBackoff,
}

impl Retry {
    pub fn new(initial: Duration, max: Duration) -> Retry {
        let inner = ExponentialBackoff {
            current_interval: initial,
            initial_interval: initial,
            randomization_factor: RANDOMIZATION,
            multiplier: 2.0,
            max_interval: max,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        Retry { inner }
    }

    /// The wait before the next try. A `Retry-After` from the server wins over our own guess,
    /// within bounds: never shorter than the lower bound of the current backoff step (a
    /// `Retry-After: 0`, or a date already past, would otherwise retry in a tight loop), never
    /// longer than an hour.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        let floor = self.inner.current_interval.mul_f64(1.0 - RANDOMIZATION);
        let ours = self.inner.next_backoff().unwrap_or(self.inner.max_interval);
        match retry_after {
            Some(theirs) => theirs.min(MAX_RETRY_AFTER).max(floor),
            None => ours,
        }
    }

    /// Starts again from the initial delay (after a success).
    pub fn reset(&mut self) {
        self.inner.reset();
    }
}

/// Parses a `Retry-After` value, delay-seconds or an HTTP date (RFC 9110 §10.2.3), into the
/// wait it asks for from `now` (a date already past asks for none). `now` is the wall clock:
/// an HTTP date can only be compared with it; the wait itself is then timed monotonically.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_jitter_up_to_the_max() {
        let mut r = Retry::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..10).map(|_| r.next_delay(None)).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(150));
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(1500)));
        assert!(delays[9] >= Duration::from_millis(500), "{delays:?}");
        r.reset();
        assert!(r.next_delay(None) <= Duration::from_millis(150));
    }

    #[test]
    fn retry_after_wins() {
        let mut r = Retry::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(
            r.next_delay(Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            r.next_delay(Some(Duration::from_secs(999_999))),
            MAX_RETRY_AFTER
        );
    }

    /// `Retry-After: 0` (or a past date) waits as long as the backoff step's lower bound, and
    /// the floor grows with the steps like the backoff does, up to its cap.
    #[test]
    fn retry_after_zero_is_floored_at_the_backoff_step() {
        let mut r = Retry::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| r.next_delay(Some(Duration::ZERO))).collect();
        assert_eq!(delays[0], Duration::from_millis(50), "{delays:?}");
        assert_eq!(delays[1], Duration::from_millis(100), "{delays:?}");
        assert_eq!(delays[2], Duration::from_millis(200), "{delays:?}");
        assert_eq!(delays[7], Duration::from_millis(500), "{delays:?}");
        r.reset();
        assert_eq!(
            r.next_delay(Some(Duration::from_millis(1))),
            Duration::from_millis(50)
        );
    }

    #[test]
    fn parses_both_forms() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(parse_retry_after(" 3 ", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:30:05 GMT", now),
            Some(Duration::from_secs(125))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past"
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }
}
