//! The integration tests, as one test binary: one compile of the shared helpers and one link,
//! where a binary per file cost CI minutes. Each module is the tests of one concern, run on
//! the embedded SQLite store and again on PostgreSQL by `scripts/test.sh`
//! (`cargo test --release --test integration <module>::` runs one module).
//!
//! Two tests stay binaries of their own: `tests/fuzz.rs`, whose panic hook counts every panic
//! of the process (which must be the server's alone), and `tests/postgres_outage.rs`, which
//! stops the PostgreSQL cluster every other test of the pass uses.

#[path = "../common/mod.rs"]
mod common;

mod auth;
mod boundaries;
mod detectors;
mod devices;
mod events;
mod flood;
mod hardening;
mod hierarchy;
mod hierarchy_crash;
mod metrics;
mod notify;
mod postgres_auth;
mod postgres_shared;
mod process;
mod siem;
mod store;
mod store_conformance;
