//! The certificates of the hierarchy's mutual-TLS links: the files named in `[hierarchy]`,
//! read and checked once at start-up (the listener and the sender's transport build their TLS
//! configuration from them), and the names a peer's certificate vouches for.

use crate::config::HierarchyConfig;

/// A certificate file of `[hierarchy]` is missing, unreadable or holds no PEM.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsFileError(String);

/// This server's certificate and key, and the CA its peers' certificates must chain to (PEM).
#[derive(Clone, Debug)]
pub struct LinkCertificates {
    /// `tls_cert`.
    pub cert: Vec<u8>,
    /// `tls_key`.
    pub key: Vec<u8>,
    /// `tls_ca`.
    pub ca: Vec<u8>,
}

impl LinkCertificates {
    /// Reads the configured files; `None` when this server takes no part in a hierarchy.
    pub fn load(h: &HierarchyConfig) -> Result<Option<Self>, TlsFileError> {
        if h.upstream.is_none() && h.listen.is_none() {
            return Ok(None);
        }
        let read = |what: &str, p: &Option<std::path::PathBuf>| {
            let p = p
                .as_ref()
                .ok_or_else(|| TlsFileError(format!("hierarchy.{what} is not set")))?;
            std::fs::read(p).map_err(|e| TlsFileError(format!("{what} {}: {e}", p.display())))
        };
        let cert = read("tls_cert", &h.tls_cert)?;
        let key = read("tls_key", &h.tls_key)?;
        let ca = read("tls_ca", &h.tls_ca)?;
        for (what, pem, marker) in [
            ("tls_cert", &cert, "CERTIFICATE"),
            ("tls_key", &key, "PRIVATE KEY"),
            ("tls_ca", &ca, "CERTIFICATE"),
        ] {
            if !String::from_utf8_lossy(pem).contains(marker) {
                return Err(TlsFileError(format!(
                    "hierarchy.{what} holds no PEM {marker}"
                )));
            }
        }
        Ok(Some(LinkCertificates { cert, key, ca }))
    }
}

/// The names a peer's certificate (DER) vouches for: its subject common names and DNS names.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push((*d).to_owned());
            }
        }
    }
    names
}
