//! Syslog over UDP: one message per datagram (RFC 5426).
//!
//! UDP has no flow control: while the queue makes a batch durable, datagrams wait in the
//! socket's receive buffer (`receive_buffer_bytes`, SO_RCVBUF), and once it is full the kernel
//! drops them. Those drops cannot be prevented from here, only made visible: the kernel's
//! count for this socket (the `drops` column of `/proc/net/udp`) is read every second into
//! `sekoia_forwarder_syslog_kernel_dropped_datagrams_total`. Use TCP or TLS where a loss is
//! not acceptable.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::framing::{FrameDecoder, Oversize};
use super::store::Store;
use super::SyslogSourceStats;

/// Most datagrams appended at once.
const BATCH_DATAGRAMS: usize = 1000;
/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;
/// How often the kernel's drop count is read.
const DROPS_EVERY: Duration = Duration::from_secs(1);

/// Binds the socket with the receive buffer asked for (the kernel may give less; what it
/// gave is logged).
pub fn bind(addr: SocketAddr, receive_buffer_bytes: usize) -> anyhow::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .context("cannot make a UDP socket")?;
    if let Err(e) = socket.set_recv_buffer_size(receive_buffer_bytes) {
        tracing::warn!(error = %e, "cannot set the UDP receive buffer size");
    }
    socket
        .set_nonblocking(true)
        .context("cannot make the UDP socket non-blocking")?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot listen on udp://{addr}"))?;
    let given = socket.recv_buffer_size().unwrap_or(0);
    if given < receive_buffer_bytes {
        tracing::warn!(
            asked = receive_buffer_bytes,
            given,
            "the kernel gave the syslog UDP socket a smaller receive buffer than \
             receive_buffer_bytes (raise net.core.rmem_max)"
        );
    }
    UdpSocket::from_std(socket.into()).context("cannot register the UDP socket")
}

/// Receives until `stop`; each batch of datagrams is durable before the next is read.
pub async fn run(
    socket: UdpSocket,
    store: Arc<Store>,
    max_event_bytes: usize,
    oversize: Oversize,
    stop: CancellationToken,
) {
    let mut decoder = FrameDecoder::new(max_event_bytes, oversize);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut batch = Vec::new();
    let drops = KernelDrops::of(&socket);
    let mut tick = tokio::time::interval(DROPS_EVERY);
    loop {
        let first = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            _ = tick.tick() => {
                drops.read_into(&store.stats);
                continue;
            }
            received = socket.recv_from(&mut buf) => received,
        };
        let mut datagrams = 0;
        let mut received = first;
        loop {
            match received {
                Ok((n, _peer)) => {
                    datagrams += 1;
                    batch.extend(decoder.message(Bytes::copy_from_slice(&buf[..n])));
                }
                Err(e) => tracing::debug!(error = %e, "syslog UDP receive failed"),
            }
            if datagrams >= BATCH_DATAGRAMS {
                break;
            }
            received = match socket.try_recv_from(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                other => other,
            };
        }
        store
            .stats
            .datagrams
            .fetch_add(datagrams as u64, Ordering::Relaxed);
        if store.store(&batch, &stop).await.is_err() {
            break;
        }
        batch.clear();
    }
    drops.read_into(&store.stats);
}

/// The kernel's count of datagrams dropped for this socket (its receive buffer full), where
/// the kernel tells it (`/proc/net/udp`, `/proc/net/udp6` on Linux).
struct KernelDrops {
    inode: Option<u64>,
}

impl KernelDrops {
    fn of(socket: &UdpSocket) -> KernelDrops {
        #[cfg(target_os = "linux")]
        let inode = rustix::fs::fstat(socket).ok().map(|st| st.st_ino);
        #[cfg(not(target_os = "linux"))]
        let inode = None;
        KernelDrops { inode }
    }

    fn read_into(&self, stats: &SyslogSourceStats) {
        let Some(inode) = self.inode else {
            return;
        };
        let drops = ["/proc/net/udp", "/proc/net/udp6"]
            .iter()
            .filter_map(|table| std::fs::read_to_string(table).ok())
            .find_map(|table| drops_of(&table, inode));
        if let Some(drops) = drops {
            stats
                .kernel_dropped_datagrams
                .store(drops, Ordering::Relaxed);
        }
    }
}

/// The `drops` column of the socket with this inode, in a `/proc/net/udp` table.
fn drops_of(table: &str, inode: u64) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let this = fields.get(9)?.parse::<u64>().ok()?;
        (this == inode).then(|| fields.last()?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_read_from_the_line_of_the_socket() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  771: 0100007F:2932 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 123456 2 0000000000000000 17\n\
  772: 0100007F:2933 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 654321 2 0000000000000000 0\n";
        assert_eq!(drops_of(table, 123456), Some(17));
        assert_eq!(drops_of(table, 654321), Some(0));
        assert_eq!(drops_of(table, 1), None);
    }
}
