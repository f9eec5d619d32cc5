//! Sources: where events come from. Each one appends to the queue and answers its sender only
//! once the queue says the events are durable.
//!
//! - [`http`]: the local intake-compatible HTTP API;
//! - [`server`]: the protected connection server (connection limit, time limits for slow
//!   clients) that the HTTP source is built on and that other stream sources reuse;
//! - [`syslog`]: syslog over UDP, TCP and TLS;
//! - [`file`]: files tailed, with their positions checkpointed in the queue;
//! - [`stdin`]: one event per line of the standard input (and of the `send` command's files);
//! - [`durable`]: appending until the queue says durable, waiting out a full queue (shared).

pub mod durable;
pub mod file;
pub mod http;
pub mod server;
pub mod stdin;
pub mod syslog;
