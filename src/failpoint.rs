//! Crash points for tests: compiled in only with the `failpoints` feature.
//!
//! `crash_point!("name")` aborts the process, as a power cut or `kill -9` would stop it, when
//! the environment says `FAILPOINTS=name=return` (fail-rs syntax, so `name=2*off->return` aborts
//! at the third pass). Without the feature the macro expands to nothing.
//!
//! The same points can panic instead (`FAILPOINTS=name=panic`, fail-rs's own action): the
//! thread that passes there unwinds and ends while the process runs on, which is how a bug in
//! a thread (the queue writer above all) shows; the process must notice and exit.

/// Aborts the process here when the fail point `$name` is set to `return`.
#[macro_export]
macro_rules! crash_point {
    ($name:expr) => {
        fail::fail_point!($name, |_| $crate::failpoint::crash($name))
    };
}

/// Stops the process at once, with no unwinding and no flushing: what a crash does.
pub fn crash(name: &str) -> ! {
    eprintln!("crash point {name}: aborting");
    std::process::abort()
}
