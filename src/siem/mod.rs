//! SIEM export (issue 12, in progress; not yet wired to the server): events leave as syslog
//! for a SIEM to read. So far: [`format`], RFC 5424 with structured data, CEF and LEEF 2.0,
//! and the framings of RFC 6587 (TCP, TLS) and RFC 5426 (UDP).

pub mod format;
