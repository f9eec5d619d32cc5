//! The intake's `Retry-After` header value -> a delay (or none), at any current time.
//!
//! Input: 8 bytes of "now" (seconds since the Unix epoch, big-endian, folded into the years
//! 1970-2200), then the header value.
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use sekoia_forwarder::delivery::retry::parse_retry_after;

/// 2200-01-01: keeps `now` in the range of real clocks (and of HTTP dates).
const LAST_SECOND: u64 = 7_258_118_400;

fuzz_target!(|data: &[u8]| {
    let Some((now, value)) = data.split_first_chunk::<8>() else {
        return;
    };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::from_be_bytes(*now) % LAST_SECOND);
    // The client reads the header with `HeaderValue::to_str`: visible ASCII only.
    let Ok(value) = http::HeaderValue::from_bytes(value) else {
        return;
    };
    let Ok(value) = value.to_str() else {
        return;
    };
    let delay = parse_retry_after(value, now);
    // delay-seconds are taken as they are.
    if let Ok(secs) = value.trim().parse::<u64>() {
        assert_eq!(delay, Some(Duration::from_secs(secs)));
    }
});
