//! Notifications: what an administrator sets per event type beside storage (the seed's own
//! words), and their delivery. The domain parts so far, free of I/O:
//! - [`template`]: message templates with the original product's placeholders, checked when
//!   a rule is saved;
//! - [`rules`]: the rule of one event type (channels, subject and body, limit per recipient);
//! - [`limit`]: the limit per recipient and the digest of what it held back;
//! - [`channels`]: email (SMTP), webhook and program channels, checked when saved;
//! - [`program`]: delivery through a program channel (no shell, a clean environment, a
//!   deadline that kills the process group);
//! - [`webhook`]: delivery through a webhook (one POST of the event as JSON, TLS to the
//!   system's roots or the channel's CA, a deadline).

pub mod channels;
pub mod limit;
pub mod program;
pub mod rules;
pub mod template;
pub mod webhook;
