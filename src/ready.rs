//! Telling whoever started the forwarder that it is up, by means meant for it.
//!
//! Why: a supervisor, a script or a test must know when the forwarder takes events, and on
//! which addresses (a listener may be given port 0). Log lines are for people and change with
//! them; these two signals are for programs and are kept stable:
//! - **systemd's notify socket** (`Type=notify`): `READY=1` once ready, `STOPPING=1` when the
//!   stop begins. Sent only when systemd gave a `NOTIFY_SOCKET`.
//! - **a ready file** (`run --ready-file PATH`): a JSON [`ReadyInfo`] (pid, the admin address,
//!   each source's real address), written whole (a temporary file renamed over it) once ready,
//!   and removed when the stop begins, so that a file present means "up now".
//!
//! "Ready" means: the queue is open, every source listens and delivery has started. Neither
//! signal is a durability promise; a failure to send them is logged and does not stop the
//! forwarder.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What the ready file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyInfo {
    /// The forwarder's process id.
    pub pid: u32,
    /// Where the admin listener (`/health`, `/metrics`, ...) listens, if it is enabled.
    pub admin: Option<SocketAddr>,
    /// Every source, in the configuration's order.
    pub sources: Vec<ReadySource>,
}

/// One source, as the ready file names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadySource {
    /// The source's type, as in the configuration (`"http"`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The address it really listens on (port 0 resolved).
    pub listen: SocketAddr,
    /// `udp`, `tcp` or `tls` for a syslog source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

/// The signals of one run: where to write, and whether to tell systemd.
#[derive(Debug, Default)]
pub struct Readiness {
    file: Option<PathBuf>,
}

impl Readiness {
    /// `file`: the `--ready-file` path, if any.
    pub fn new(file: Option<PathBuf>) -> Readiness {
        Readiness { file }
    }

    /// The forwarder is ready: writes the ready file and tells systemd.
    pub fn ready(&self, info: &ReadyInfo) {
        if let Some(path) = &self.file {
            match write_atomically(path, info) {
                Ok(()) => tracing::debug!(path = %path.display(), "ready file written"),
                Err(e) => tracing::error!(
                    path = %path.display(),
                    error = %e,
                    "cannot write the ready file"
                ),
            }
        }
        notify_systemd(sd_notify::NotifyState::Ready);
    }

    /// The stop begins: the ready file goes, systemd is told.
    pub fn stopping(&self) {
        notify_systemd(sd_notify::NotifyState::Stopping);
        if let Some(path) = &self.file {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "cannot remove the ready file"
                ),
            }
        }
    }
}

/// Writes `info` to a temporary file beside `path`, then renames it over `path`: a reader sees
/// no file or a whole one, never a half-written one.
fn write_atomically(path: &Path, info: &ReadyInfo) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut file = std::fs::File::create(&temporary)?;
    serde_json::to_writer(&mut file, info)?;
    file.write_all(b"\n")?;
    drop(file);
    std::fs::rename(&temporary, path)
}

fn notify_systemd(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(std::slice::from_ref(&state)) {
        tracing::warn!(error = %e, state = %state, "cannot notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ReadyInfo {
        ReadyInfo {
            pid: 42,
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 10081))),
            sources: vec![ReadySource {
                kind: "http".into(),
                listen: SocketAddr::from(([127, 0, 0, 1], 10080)),
                transport: None,
            }],
        }
    }

    #[test]
    fn the_ready_file_is_written_whole_then_removed_at_the_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ready.json");
        let readiness = Readiness::new(Some(path.clone()));
        readiness.ready(&info());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(serde_json::from_str::<ReadyInfo>(&text).unwrap(), info());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "the temporary file is left behind"
        );
        readiness.stopping();
        assert!(!path.exists());
        // A second stop (or a file someone removed) is not an error.
        readiness.stopping();
    }

    #[test]
    fn the_json_names_the_sources_by_type() {
        let json = serde_json::to_value(info()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "pid": 42,
                "admin": "127.0.0.1:10081",
                "sources": [{"type": "http", "listen": "127.0.0.1:10080"}],
            })
        );
    }
}
