//! Retry delays. The `backoff` crate is in maintenance mode: it is used here and nowhere else,
//! so that replacing it touches one file.

use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;

/// Longest `Retry-After` obeyed; a longer one (or a date far ahead) is cut to this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

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
            randomization_factor: 0.5,
            multiplier: 2.0,
            max_interval: max,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        Retry { inner }
    }

    /// The wait before the next try. A `Retry-After` from the server wins over our own guess.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        let ours = self.inner.next_backoff().unwrap_or(self.inner.max_interval);
        match retry_after {
            Some(theirs) => theirs.min(MAX_RETRY_AFTER),
            None => ours,
        }
    }

    /// Starts again from the initial delay (after a success).
    pub fn reset(&mut self) {
        self.inner.reset();
    }
}

/// Parses a `Retry-After` value: delay-seconds or an HTTP date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    parse_retry_after_at(value, std::time::SystemTime::now())
}

/// [`parse_retry_after`] at a given current time: a date is read as the wait from `now`
/// (zero once past). Separate so that tests and the fuzz target choose the clock.
pub fn parse_retry_after_at(value: &str, now: std::time::SystemTime) -> Option<Duration> {
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

    #[test]
    fn parses_both_forms() {
        assert_eq!(parse_retry_after(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
