//! A SIEM destination as an administrator sets it: where (host, port, transport), how
//! (format, facility) and what (minimum severity, types), and where its export starts. Checked
//! whole before it is saved: a bad field is refused with its name.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::catalog::Severity;
use crate::classify::ClassifiedEvent;
use crate::clock::Timestamp;
use crate::fields::{self, FieldError};
use crate::store::StoredEvent;

/// Most destinations one server keeps (also the bound of the per-destination metric labels).
pub const MAX_DESTINATIONS: usize = 16;
/// Most types in one destination's filter.
pub const MAX_TYPES: usize = 256;
/// Longest destination name, bytes.
pub const NAME_BYTES: usize = 128;
/// The facility when none is given: 13, log audit (RFC 5424 table 1).
pub const DEFAULT_FACILITY: u8 = 13;

/// How the receiver is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// TCP, octet counted (RFC 6587).
    Tcp,
    /// TLS (RFC 5425), octet counted, the receiver's certificate verified.
    Tls,
    /// UDP (RFC 5426), one message per datagram.
    Udp,
}

/// What each message looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// RFC 5424 with structured data.
    Rfc5424,
    /// ArcSight CEF in an RFC 5424 message.
    Cef,
    /// QRadar LEEF 2.0 in an RFC 5424 message.
    Leef,
}

/// One destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    /// Its name: its cursor's and its metrics' key.
    pub name: String,
    /// The receiver's host.
    pub host: String,
    /// The receiver's port.
    pub port: u16,
    /// How it is reached.
    pub transport: Transport,
    /// The message format.
    pub format: Format,
    /// Only events at or above this severity.
    #[serde(default)]
    pub min_severity: Option<Severity>,
    /// Only these types (empty: all).
    #[serde(default)]
    pub event_types: BTreeSet<String>,
    /// The syslog facility, 0–23.
    pub facility: u8,
    /// TLS: a PEM file of the CA(s) to trust instead of the system's roots.
    #[serde(default)]
    pub ca_file: String,
    /// TLS: the name the receiver's certificate must carry (empty: `host`).
    #[serde(default)]
    pub server_name: String,
}

impl Destination {
    /// Checks every field; the error names the first bad one as the proto does.
    pub fn check(&self) -> Result<(), FieldError> {
        let name_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if self.name.is_empty() || self.name.len() > NAME_BYTES || !self.name.chars().all(name_ok) {
            return Err(FieldError::new(
                "name",
                format!("must be 1 to {NAME_BYTES} letters, digits, '-', '_' or '.'"),
            ));
        }
        fields::text("host", &self.host, fields::ID_BYTES)?;
        if self.host.is_empty() || self.host.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(FieldError::new("host", "must be a host name or an address"));
        }
        if self.port == 0 {
            return Err(FieldError::new("port", "must be 1 to 65535"));
        }
        if self.facility > 23 {
            return Err(FieldError::new("facility", "must be 0 to 23"));
        }
        if self.event_types.len() > MAX_TYPES {
            return Err(FieldError::new(
                "event_types",
                format!("at most {MAX_TYPES} types"),
            ));
        }
        for t in &self.event_types {
            fields::text("event_types", t, fields::NAME_BYTES)?;
            if t.is_empty() {
                return Err(FieldError::new("event_types", "an empty type"));
            }
        }
        let tls = self.transport == Transport::Tls;
        for (field, value) in [
            ("ca_file", &self.ca_file),
            ("server_name", &self.server_name),
        ] {
            if !value.is_empty() && !tls {
                return Err(FieldError::new(field, "only for transport TLS"));
            }
        }
        fields::text("server_name", &self.server_name, fields::ID_BYTES)?;
        if !self.server_name.is_empty()
            && rustls::pki_types::ServerName::try_from(self.server_name.as_str()).is_err()
        {
            return Err(FieldError::new(
                "server_name",
                "not a DNS name or an address",
            ));
        }
        if tls {
            let name = self.tls_name();
            if rustls::pki_types::ServerName::try_from(name).is_err() {
                return Err(FieldError::new(
                    "host",
                    "not a DNS name or an address for TLS",
                ));
            }
        }
        fields::text("ca_file", &self.ca_file, fields::ID_BYTES)?;
        if !self.ca_file.is_empty() {
            let path = std::path::Path::new(&self.ca_file);
            if !path.is_absolute() {
                return Err(FieldError::new("ca_file", "must be an absolute path"));
            }
            let pem = crate::notify::channels::read_ca_file(path)
                .map_err(|e| FieldError::new("ca_file", e))?;
            crate::notify::webhook::roots(Some(&pem))
                .map_err(|e| FieldError::new("ca_file", e.to_string()))?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(FieldError::new("ca_file", "holds no PEM certificate"));
            }
        }
        Ok(())
    }

    /// The name the receiver's TLS certificate is verified against.
    pub fn tls_name(&self) -> &str {
        if self.server_name.is_empty() {
            &self.host
        } else {
            &self.server_name
        }
    }

    /// Whether a stored event passes the filters.
    pub fn wants_stored(&self, e: &StoredEvent) -> bool {
        self.wants(e.severity, &e.event_type)
    }

    /// Whether a live event passes the filters.
    pub fn wants_live(&self, e: &ClassifiedEvent) -> bool {
        self.wants(e.event_type.severity, &e.event_type.name)
    }

    fn wants(&self, severity: Severity, event_type: &str) -> bool {
        self.min_severity.is_none_or(|m| severity >= m)
            && (self.event_types.is_empty() || self.event_types.contains(event_type))
    }
}

/// Where a destination's export starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Keep the saved cursor (a new destination: from the events stored from now on).
    Keep,
    /// From the events received at or after this time.
    From(Timestamp),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp() -> Destination {
        Destination {
            name: "siem-1".into(),
            host: "127.0.0.1".into(),
            port: 514,
            transport: Transport::Tcp,
            format: Format::Rfc5424,
            min_severity: None,
            event_types: BTreeSet::new(),
            facility: DEFAULT_FACILITY,
            ca_file: String::new(),
            server_name: String::new(),
        }
    }

    fn refused(d: Destination) -> String {
        d.check().expect_err("refused").field
    }

    #[test]
    fn each_bad_field_is_named() {
        assert!(tcp().check().is_ok());
        assert_eq!(
            refused(Destination {
                name: "".into(),
                ..tcp()
            }),
            "name"
        );
        assert_eq!(
            refused(Destination {
                name: "a b".into(),
                ..tcp()
            }),
            "name"
        );
        assert_eq!(
            refused(Destination {
                name: "x".repeat(129),
                ..tcp()
            }),
            "name"
        );
        assert_eq!(
            refused(Destination {
                host: "".into(),
                ..tcp()
            }),
            "host"
        );
        assert_eq!(
            refused(Destination {
                host: "a\0".into(),
                ..tcp()
            }),
            "host"
        );
        assert_eq!(refused(Destination { port: 0, ..tcp() }), "port");
        assert_eq!(
            refused(Destination {
                facility: 24,
                ..tcp()
            }),
            "facility"
        );
        let many = (0..=MAX_TYPES).map(|i| format!("T{i}")).collect();
        assert_eq!(
            refused(Destination {
                event_types: many,
                ..tcp()
            }),
            "event_types"
        );
        assert_eq!(
            refused(Destination {
                ca_file: "/etc/hostname".into(),
                ..tcp()
            }),
            "ca_file"
        );
        assert_eq!(
            refused(Destination {
                server_name: "x".into(),
                ..tcp()
            }),
            "server_name"
        );
        let tls = Destination {
            transport: Transport::Tls,
            ..tcp()
        };
        assert!(tls.check().is_ok());
        assert_eq!(
            refused(Destination {
                ca_file: "relative.pem".into(),
                ..tls.clone()
            }),
            "ca_file"
        );
        assert_eq!(
            refused(Destination {
                ca_file: "/dev/zero".into(),
                ..tls.clone()
            }),
            "ca_file"
        );
        assert_eq!(
            refused(Destination {
                ca_file: "/etc/hostname".into(),
                ..tls
            }),
            "ca_file"
        );
    }

    #[test]
    fn filters_select_by_severity_and_type() {
        let d = Destination {
            min_severity: Some(Severity::Warning),
            event_types: ["A".to_owned()].into(),
            ..tcp()
        };
        assert!(d.wants(Severity::Critical, "A"));
        assert!(!d.wants(Severity::Info, "A"));
        assert!(!d.wants(Severity::Critical, "B"));
        assert!(tcp().wants(Severity::Info, "B"));
    }
}
