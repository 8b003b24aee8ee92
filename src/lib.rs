//! fleet-events: an Administration Server event service. Devices, MDM components and other
//! servers send events over gRPC; the server classifies each one against its event catalog,
//! blocks floods per (device, event type), stores events with per-type retention under an event
//! cap, and streams classified events to subscribers.
//!
//! The crate map:
//! - [`clock`]: the injectable source of "now" (tests use a manual clock).
//! - [`catalog`]: event types (the seed's 19 warnings and their neighbours, application types),
//!   lock-free look-up by string or ID, per-type settings.
//! - [`classify`]: validation of an incoming event and its classification.
//! - [`flood`]: per-(device, type) sliding-window counters, blocks and the three admin actions.
//! - [`store`]: the `EventStore` interface and its backends, SQLite (embedded, the default) and
//!   PostgreSQL (shared by several servers): group commit, cap, retention, the hierarchy outbox.
//! - [`bus`]: fan-out of classified events to live subscribers, never blocking ingest.
//! - [`engine`]: the data path of one event, tying the above together; free of gRPC types.
//! - [`detectors`]: parts that raise catalog events from what they observe, periodic ones behind
//!   one `Detector` trait and runner: the device registry (heartbeats, identity conflicts,
//!   status, inactivity), push results, capacity, certificates, licences, updates.
//! - [`hierarchy`]: the server hierarchy's rules: the primary's registry of secondaries, the
//!   secondary's link state, the two disconnection events, settings pushed down.
//! - [`auth`]: the trust model: the server's CA and device certificates, bearer tokens with
//!   roles, enrolment tokens, revocations, the table of who may call what, audit events.
//! - [`client`]: connecting to a server with TLS and a credential (the CLI, tests, benches).
//! - [`api`]: the tonic services, thin adapters over the engine; errors become `Status` there.
//! - [`config`]: the `Config` struct, from TOML, environment and flags.
//! - [`datadir`]: the lock that keeps a data directory to one server.
//! - [`metrics`]: Prometheus metrics on a port of their own, read from the parts' counters.
//! - [`notify`]: notification rules per event type (templates so far).
//! - [`siem`]: SIEM export formats (RFC 5424, CEF, LEEF) and framings.
//! - [`server`]: start-up, health, reflection and graceful shutdown.

#![warn(missing_docs)]

pub mod api;
pub mod auth;
pub mod blocks;
pub mod bus;
pub mod catalog;
pub mod classify;
pub mod client;
pub mod clock;
pub mod config;
pub mod datadir;
pub mod detectors;
pub mod engine;
pub mod fields;
pub mod flood;
pub mod hierarchy;
pub mod maintenance;
pub mod metrics;
pub mod notify;
pub mod recent;
pub mod server;
pub mod siem;
pub mod store;
