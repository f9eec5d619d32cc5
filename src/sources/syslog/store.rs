//! From messages to durable events: what every syslog transport shares.
//!
//! Syslog has no acknowledgement (UDP none at all, TCP and TLS only a byte stream), so the
//! promise is about what reached the queue: a transport reads at most a batch ahead of what it
//! has handed to the queue, and hands over at most [`crate::sources::durable::DEPTH`] batches
//! that are not yet durable. When the queue is full it stops reading and waits; the kernel's
//! flow control then pushes back on a TCP sender, and a UDP sender's datagrams pile up in the
//! socket buffer, then are dropped by the kernel and counted.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::budget::Budget;
use super::framing::{Frame, Oversize};
use super::SyslogSourceStats;
use crate::config::IntakeKey;
use crate::queue::Queue;
use crate::sources::durable::{Appender, Durable, InFlight, Lines};

pub use crate::sources::durable::Stopped;

/// What every connection (or the UDP socket) of one source shares.
#[derive(Debug)]
pub struct Store {
    pub queue: Queue,
    pub stats: Arc<SyslogSourceStats>,
    /// The source's name in logs: `syslog source tcp://127.0.0.1:10514`.
    pub name: String,
    /// Room for what the TCP/TLS connections have read and not yet stored.
    pub budget: Budget,
    appender: Appender,
}

impl Store {
    pub fn new(
        queue: Queue,
        intake_key: IntakeKey,
        oversize: Oversize,
        stats: Arc<SyslogSourceStats>,
        budget: Budget,
        name: String,
    ) -> Store {
        let lines = Lines {
            key: intake_key,
            oversize,
            counters: stats.clone(),
        };
        Store {
            appender: Appender::new(
                queue.clone(),
                name.clone(),
                lines,
                "TCP senders are pushed back, UDP datagrams wait in the socket buffer",
            ),
            queue,
            stats,
            name,
            budget,
        }
    }

    /// Hands `frames` to the queue behind the connection's batches in flight
    /// ([`Appender::submit`]).
    pub async fn submit<T>(
        &self,
        in_flight: &mut InFlight<T>,
        frames: Vec<Frame>,
        kept: T,
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        self.appender
            .submit(in_flight, frames, Vec::new(), kept, stop)
            .await
    }

    /// The connection's oldest batch in flight once it is durable ([`Appender::durable`]).
    pub async fn durable<T>(
        &self,
        in_flight: &mut InFlight<T>,
        stop: &CancellationToken,
    ) -> Option<Result<Durable<T>, Stopped>> {
        self.appender.durable(in_flight, stop).await
    }

    /// Appends `frames` as events and returns once they are durable, waiting as long as the
    /// queue is full; `Err` only if `stop` comes first (they were not stored).
    pub async fn store(&self, frames: &[Frame], stop: &CancellationToken) -> Result<(), Stopped> {
        self.appender
            .store(frames, &[], stop)
            .await
            .inspect_err(|_| {
                // What was read from the socket and is not durable is lost with the connection:
                // said, never silent.
                tracing::warn!(
                    source = %self.name,
                    messages = frames.len(),
                    "the source stopped while the queue could not take its messages: they were \
                     read from the socket but not stored"
                );
            })
    }
}
