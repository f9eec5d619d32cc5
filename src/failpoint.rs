//! Fault injection for tests: compiled in only with the `failpoints` feature.
//!
//! Two kinds of points, both configured the fail-rs way (`FAILPOINTS=name=action` in the
//! environment of the binary, `fail::cfg` in a unit test):
//!
//! - `crash_point!("name")` aborts the process, as a power cut or `kill -9` would stop it, when
//!   the point is set to `return` (so `name=2*off->return` aborts at the third pass).
//! - `io_point!("name", path)` stands before a step that writes to the disk (sled's flush, the
//!   fsync of a blob file or of a data file): `return` makes the step fail with an I/O error,
//!   as a failing disk would; `pause` (or a callback) holds the writer just before the step.
//!   It fires only for the queue at `path` while a test [`aim`]s at it, so unit tests that run
//!   side by side in one process do not fail each other's commits; with nothing aimed at (the
//!   binary) it fires for every queue.
//!
//! Without the feature the macros expand to nothing.
//!
//! Crash points can panic instead (`FAILPOINTS=name=panic`, fail-rs's own action): the thread
//! that passes there unwinds and ends while the process runs on, which is how a bug in a thread
//! (the queue writer above all) shows; the process must notice and exit.

/// Aborts the process here when the fail point `$name` is set to `return`.
#[macro_export]
macro_rules! crash_point {
    ($name:expr) => {
        fail::fail_point!($name, |_| $crate::failpoint::crash($name))
    };
}

/// Returns an injected I/O error from the enclosing function (which must return a `Result`
/// whose error type converts from `std::io::Error`) when the fail point `$name` is set to
/// `return` for the queue at `$path`; pauses here when it is set to `pause`.
#[macro_export]
macro_rules! io_point {
    ($name:expr, $path:expr) => {
        fail::fail_point!($name, $crate::failpoint::aimed_at($path), |_| Err(
            $crate::failpoint::injected($name).into()
        ))
    };
}

/// Stops the process at once, with no unwinding and no flushing: what a crash does.
pub fn crash(name: &str) -> ! {
    eprintln!("crash point {name}: aborting");
    std::process::abort()
}

/// The error an `io_point!` set to `return` makes its step fail with.
pub fn injected(name: &str) -> std::io::Error {
    std::io::Error::other(format!("injected failure at fail point {name}"))
}

#[cfg(feature = "failpoints")]
mod aim {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static TARGETS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    fn targets() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
        TARGETS.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `io_point!`s fire for the queue at `path`.
    pub fn aimed_at(path: &Path) -> bool {
        let targets = targets();
        targets.is_empty() || targets.iter().any(|t| path.starts_with(t))
    }

    /// Limits `io_point!`s to queues under `path` until the guard is dropped.
    pub fn aim(path: &Path) -> Aimed {
        targets().push(path.to_owned());
        Aimed(path.to_owned())
    }

    /// Returned by [`aim`]; drop it to stop aiming at its queue.
    #[must_use]
    pub struct Aimed(PathBuf);

    impl Drop for Aimed {
        fn drop(&mut self) {
            let mut targets = targets();
            if let Some(i) = targets.iter().position(|t| *t == self.0) {
                targets.remove(i);
            }
        }
    }
}

#[cfg(feature = "failpoints")]
pub use aim::{aim, aimed_at, Aimed};

/// Holds the thread that first passes the fail point `name` (a callback): says so on the
/// returned receiver, then waits for a message on the returned sender (60 s at most, so that a
/// failed test cannot hang the suite). Later passes go on at once.
#[cfg(all(test, feature = "failpoints"))]
pub fn hold_once(
    name: &str,
) -> (
    tokio::sync::mpsc::UnboundedReceiver<()>,
    std::sync::mpsc::Sender<()>,
) {
    let (reached_tx, reached) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = std::sync::Mutex::new(Some(released));
    let held = fail::cfg_callback(name, move || {
        let Some(released) = released.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let _ = reached_tx.send(());
        let _ = released.recv_timeout(std::time::Duration::from_secs(60));
    });
    assert!(held.is_ok(), "cannot hold at fail point {name}: {held:?}");
    (reached, release)
}
