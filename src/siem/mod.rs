//! SIEM export: events leave as syslog for a SIEM to read. [`destination`]: what an
//! administrator sets; [`format`]: RFC 5424 with structured data, CEF and LEEF 2.0;
//! [`transport`]: TCP and TLS with octet counting, UDP; [`exporter`]: a durable cursor per
//! destination over the event store, moved only once the receiver has the events.

pub mod destination;
pub mod exporter;
pub mod format;
pub mod transport;
