//! `[[source]] type = "syslog"`: where a syslog source listens, how, and whose events it
//! receives.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::reading::{self, check, IntakeKey, ReadingSource};
use crate::sources::syslog::framing::Oversize;

/// `[[source]] type = "syslog"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogSourceConfig {
    /// `udp://ADDR:PORT`, `tcp://ADDR:PORT` or `tls://ADDR:PORT`.
    pub listen: Listen,
    /// The intake key of every event of this source: exactly one of the three is given.
    #[serde(default)]
    pub intake_key: Option<IntakeKey>,
    /// The name of an environment variable that holds the key.
    #[serde(default)]
    pub intake_key_env: Option<String>,
    /// A file that holds the key (surrounding whitespace ignored), e.g. a systemd credential.
    #[serde(default)]
    pub intake_key_file: Option<PathBuf>,
    /// Largest event; a longer message is cut as `oversize` says.
    #[serde(default = "reading::default_max_event_bytes")]
    pub max_event_bytes: usize,
    #[serde(default)]
    pub oversize: Oversize,
    /// TCP/TLS: connections served at once; further connections wait in the kernel's backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// TCP/TLS: most bytes of messages all connections together hold read and not yet durable;
    /// a connection with no room left stops reading (its sender is pushed back).
    #[serde(default = "default_max_buffered_bytes")]
    pub max_buffered_bytes: usize,
    /// TCP/TLS: a connection that sends nothing for that long is closed.
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// TCP/TLS: time a message (and a TLS handshake) may take from its first byte to its last.
    #[serde(default = "default_message_timeout_secs")]
    pub message_timeout_secs: u64,
    /// UDP: the socket's receive buffer (SO_RCVBUF), what absorbs a burst while the queue
    /// commits; the kernel may cap it (`net.core.rmem_max`).
    #[serde(default = "default_receive_buffer_bytes")]
    pub receive_buffer_bytes: usize,
    /// TLS: the server's certificate chain and private key (PEM).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// TLS: when given, clients must present a certificate signed by one of these CAs (PEM).
    #[serde(default)]
    pub tls_client_ca: Option<PathBuf>,
}

fn default_max_connections() -> usize {
    1024
}
fn default_max_buffered_bytes() -> usize {
    64 << 20
}
fn default_idle_timeout_secs() -> u64 {
    300
}
fn default_message_timeout_secs() -> u64 {
    60
}
fn default_receive_buffer_bytes() -> usize {
    4 << 20
}

super::reading::reading_source!(SyslogSourceConfig);

impl SyslogSourceConfig {
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    pub fn message_timeout(&self) -> Duration {
        Duration::from_secs(self.message_timeout_secs)
    }

    /// Checks what types alone cannot; the error is `(key, what is expected)`.
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        self.check_key_and_size()?;
        check(
            self.max_connections >= 1,
            "max_connections",
            "expected at least 1",
        )?;
        check(
            self.max_buffered_bytes >= self.max_event_bytes.max(1 << 20),
            "max_buffered_bytes",
            "expected at least 1048576 and at least max_event_bytes",
        )?;
        check(
            self.idle_timeout_secs >= 1,
            "idle_timeout_secs",
            "expected at least 1",
        )?;
        check(
            self.message_timeout_secs >= 1,
            "message_timeout_secs",
            "expected at least 1",
        )?;
        let tls = matches!(self.listen, Listen::Tls(_));
        check(
            !tls || (self.tls_cert.is_some() && self.tls_key.is_some()),
            "tls_cert",
            "a tls:// source needs tls_cert and tls_key",
        )?;
        check(
            tls || (self.tls_cert.is_none()
                && self.tls_key.is_none()
                && self.tls_client_ca.is_none()),
            "tls_cert",
            "tls_cert, tls_key and tls_client_ca are for a tls:// source",
        )?;
        Ok(())
    }
}

/// Where a syslog source listens, and over what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Listen {
    Udp(SocketAddr),
    Tcp(SocketAddr),
    Tls(SocketAddr),
}

impl Listen {
    pub fn addr(self) -> SocketAddr {
        match self {
            Listen::Udp(a) | Listen::Tcp(a) | Listen::Tls(a) => a,
        }
    }

    pub fn scheme(self) -> &'static str {
        match self {
            Listen::Udp(_) => "udp",
            Listen::Tcp(_) => "tcp",
            Listen::Tls(_) => "tls",
        }
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", self.scheme(), self.addr())
    }
}

impl TryFrom<String> for Listen {
    type Error = String;

    fn try_from(text: String) -> Result<Listen, String> {
        let expected = || {
            format!("expected udp://ADDR:PORT, tcp://ADDR:PORT or tls://ADDR:PORT, not {text:?}")
        };
        let (scheme, addr) = text.split_once("://").ok_or_else(expected)?;
        let addr: SocketAddr = addr.parse().map_err(|_| expected())?;
        match scheme {
            "udp" => Ok(Listen::Udp(addr)),
            "tcp" => Ok(Listen::Tcp(addr)),
            "tls" => Ok(Listen::Tls(addr)),
            _ => Err(expected()),
        }
    }
}
