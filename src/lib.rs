//! sekoia-forwarder: a disk-buffered, reliable log forwarder for the Sekoia.io HTTPS intake.
//!
//! Data flows one way: [`sources`] -> [`queue`] -> [`delivery`].
//!
//! - [`intake_api`]: the intake's wire format, shared by the local source, the delivery client
//!   and the mock intake.
//! - [`config`]: the TOML configuration and its built-in default.
//! - [`queue`]: the durable sled write-ahead queue (group commit, fsync, counters).
//! - [`delivery`]: drains the queue in batches to `{url}/jsons` and removes only what the
//!   intake acknowledged with one id per event.
//! - [`sources`]: where events come from (the local intake-compatible HTTP API).
//! - [`mock_intake`]: an intake look-alike with fault injection, for tests and offline trials.
//! - [`stats`]: counters declared once, as the JSON of `/status` and the families of `/metrics`.
//! - [`admin`]: liveness (`/health`), readiness (`/ready`), status and Prometheus metrics.
//! - [`ready`]: tells a supervisor or a script that the forwarder is up (systemd notify, a
//!   ready file).
//! - [`app`]: wires it all together and stops it cleanly.
//! - [`send`]: the one-shot `send` command (lines of files or stdin, delivered, then exit).
//!
//! Start reading at `docs/architecture.md`.

pub mod failpoint;

pub mod admin;
pub mod app;
pub mod config;
pub mod delivery;
pub mod intake_api;
pub mod mock_intake;
pub mod queue;
pub mod ready;
pub mod send;
pub mod sources;
pub mod stats;
