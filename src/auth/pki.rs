//! The server's own certificate authority: created in the data directory on first start, it
//! signs the server's TLS certificate (unless the operator configured one) and every device
//! certificate issued at enrolment. A device certificate names its device in a URI subject
//! alternative name, `urn:fleet-events:device:<percent-encoded device_id>`, and carries its
//! issue time (µs) in its serial number, so revoking a device is one timestamp: every
//! certificate of that device issued at or before it is refused.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;

use super::AuthError;
use crate::clock::Timestamp;

/// The URI prefix of a device identity in a certificate's subject alternative name.
pub const DEVICE_URI_PREFIX: &str = "urn:fleet-events:device:";

/// Characters left as they are in the URI form of a device id (RFC 3986 unreserved).
const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The URI subject alternative name of `device_id`.
pub fn device_uri(device_id: &str) -> String {
    format!(
        "{DEVICE_URI_PREFIX}{}",
        percent_encoding::utf8_percent_encode(device_id, KEEP)
    )
}

/// Why the certificate files could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file holds no usable certificate or key.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Generating a key or certificate failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The certificate authority that issues device certificates, and the server certificate of
/// the client port.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM: what clients pin.
    ca_pem: String,
    /// The CA certificate, DER.
    ca_der: CertificateDer<'static>,
    /// Checks a device certificate's chain against the CA (the time is checked separately, on
    /// the server's clock).
    chain: Arc<dyn ClientCertVerifier>,
    /// How long an issued device certificate is valid.
    device_validity: std::time::Duration,
}

/// The files of the client port's TLS identity.
#[derive(Clone, Debug)]
pub struct ServerIdentity {
    /// Certificate chain, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
}

/// What a verified device certificate says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceCertificate {
    /// The device it names.
    pub device_id: String,
    /// When it was issued (from its serial number), µs.
    pub issued_at: Timestamp,
    /// Valid from.
    pub not_before: Timestamp,
    /// Valid until.
    pub not_after: Timestamp,
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes `text` to `path` (mode 0600 when `secret`), atomically.
fn write(path: &Path, text: &str, secret: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Timestamp ⇄ the `time` crate's date for rcgen.
fn to_datetime(t: Timestamp) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t.as_secs())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

impl Authority {
    /// Loads the CA from `ca_cert`/`ca_key`, creating both (the key file 0600) when neither
    /// exists. `now` dates a new CA.
    pub fn load_or_create(
        ca_cert: &Path,
        ca_key: &Path,
        now: Timestamp,
        device_validity: std::time::Duration,
    ) -> Result<Self, PkiError> {
        let (cert_pem, key_pem) = match (ca_cert.exists(), ca_key.exists()) {
            (true, true) => (read(ca_cert)?, read(ca_key)?),
            (false, false) => {
                let key = KeyPair::generate()?;
                let mut params = CertificateParams::new(Vec::<String>::new())?;
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                params.distinguished_name = DistinguishedName::new();
                params
                    .distinguished_name
                    .push(DnType::CommonName, "fleet-events CA");
                params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
                params.not_before = to_datetime(now.minus(Duration::from_secs(3600)));
                params.not_after = to_datetime(now.plus(Duration::from_secs(20 * 365 * 86_400)));
                let cert = params.self_signed(&key)?;
                write(ca_key, &key.serialize_pem(), true)?;
                write(ca_cert, &cert.pem(), false)?;
                tracing::info!(ca = %ca_cert.display(), "created this server's certificate authority");
                (cert.pem(), key.serialize_pem())
            }
            (true, false) | (false, true) => {
                return Err(PkiError::Invalid {
                    path: if ca_cert.exists() { ca_key } else { ca_cert }.to_owned(),
                    reason: "missing: the CA certificate and key go together (remove both to \
                             make a new CA, which invalidates every device certificate)"
                        .into(),
                });
            }
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Invalid {
            path: ca_key.to_owned(),
            reason: format!("not a PEM private key: {e}"),
        })?;
        let ca_der = first_certificate(&cert_pem).ok_or_else(|| PkiError::Invalid {
            path: ca_cert.to_owned(),
            reason: "holds no PEM certificate".into(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| PkiError::Invalid {
            path: ca_cert.to_owned(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_der.clone()).map_err(|e| PkiError::Invalid {
            path: ca_cert.to_owned(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
        let chain = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| PkiError::Invalid {
            path: ca_cert.to_owned(),
            reason: format!("cannot verify with it: {e}"),
        })?;
        Ok(Authority {
            issuer,
            ca_pem: cert_pem,
            ca_der,
            chain,
            device_validity,
        })
    }

    /// The CA certificate (PEM) clients pin.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA certificate (DER).
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// The verifier of device certificate chains (also used by the TLS handshake for the
    /// proof of key possession).
    pub fn chain_verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.chain.clone()
    }

    /// The server certificate of the client port from `cert`/`key`, creating both (signed by
    /// this CA, for `names`) when neither exists.
    pub fn server_identity(
        &self,
        cert: &Path,
        key: &Path,
        names: &[String],
        now: Timestamp,
    ) -> Result<ServerIdentity, PkiError> {
        if cert.exists() && key.exists() {
            return Ok(ServerIdentity {
                cert_pem: read(cert)?,
                key_pem: read(key)?,
            });
        }
        let kp = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        for n in names {
            let san = match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => match n.as_str().try_into() {
                    Ok(dns) => SanType::DnsName(dns),
                    Err(_) => continue,
                },
            };
            if !params.subject_alt_names.contains(&san) {
                params.subject_alt_names.push(san);
            }
        }
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_else(|| "localhost".into()),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = to_datetime(now.minus(Duration::from_secs(3600)));
        params.not_after = to_datetime(now.plus(Duration::from_secs(5 * 365 * 86_400)));
        let c = params.signed_by(&kp, &self.issuer)?;
        write(key, &kp.serialize_pem(), true)?;
        write(cert, &c.pem(), false)?;
        tracing::info!(cert = %cert.display(), "created the client port's server certificate");
        Ok(ServerIdentity {
            cert_pem: c.pem(),
            key_pem: kp.serialize_pem(),
        })
    }

    /// Signs a certificate for `device_id` from a PEM CSR. The CSR's subject common name and
    /// alternative names must be empty or name exactly this device; its signature must verify
    /// (proof that the caller holds the key). `issued_at` must be later than any revocation of
    /// the device. Returns the certificate (PEM) and when it expires.
    pub fn issue_device(
        &self,
        device_id: &str,
        csr_pem: &str,
        issued_at: Timestamp,
    ) -> Result<(String, Timestamp), AuthError> {
        if !csr_pem.contains("-----BEGIN CERTIFICATE REQUEST-----") {
            return Err(AuthError::BadArgument {
                field: "csr_pem",
                reason:
                    "not a PEM certificate signing request (-----BEGIN CERTIFICATE REQUEST-----)"
                        .into(),
            });
        }
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            AuthError::BadArgument {
                field: "csr_pem",
                reason: format!("unusable certificate signing request: {e}"),
            }
        })?;
        for (ty, value) in csr.params.distinguished_name.iter() {
            let text = dn_text(value).unwrap_or_default();
            if *ty != DnType::CommonName {
                return Err(AuthError::PermissionDenied(format!(
                    "the CSR's subject may hold only a common name (the device id), it also has {ty:?}"
                )));
            }
            if text != device_id {
                return Err(AuthError::PermissionDenied(format!(
                    "the CSR names {text:?}, not the enrolling device {device_id:?}"
                )));
            }
        }
        let own = device_uri(device_id);
        for san in &csr.params.subject_alt_names {
            let ok = matches!(san, SanType::URI(u) if u.as_str() == own);
            if !ok {
                return Err(AuthError::PermissionDenied(format!(
                    "the CSR asks for the extra name {san:?}; a device certificate names only {own}"
                )));
            }
        }
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(internal)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, device_id);
        params.subject_alt_names = vec![SanType::URI(own.as_str().try_into().map_err(internal)?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let mut serial = vec![0x01];
        serial.extend_from_slice(&issued_at.0.to_be_bytes());
        serial.extend_from_slice(&fastrand::u64(..).to_be_bytes());
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        // A minute of slack for clocks that are a little behind.
        params.not_before = to_datetime(issued_at.minus(Duration::from_secs(60)));
        let not_after = issued_at.plus(self.device_validity);
        params.not_after = to_datetime(not_after);
        csr.params = params;
        let cert = csr.signed_by(&self.issuer).map_err(internal)?;
        Ok((cert.pem(), Timestamp::from_secs(not_after.as_secs())))
    }

    /// Checks that `end_entity` (with `intermediates`) was issued by this CA, and reads the
    /// device it names. Validity dates are read, not checked: the caller checks them on its
    /// clock, call by call.
    pub fn verify_device(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<DeviceCertificate, AuthError> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(end_entity).map_err(|e| {
            AuthError::Unauthenticated(format!("the client certificate does not parse: {e}"))
        })?;
        let not_before = Timestamp::from_secs(cert.validity().not_before.timestamp());
        let not_after = Timestamp::from_secs(cert.validity().not_after.timestamp());
        // The chain is checked at a moment inside the certificate's own validity, so this
        // answers only "did our CA sign it"; expiry is the caller's, on the injectable clock.
        let inside = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            not_before.as_secs().max(0) as u64 + 1,
        ));
        self.chain
            .verify_client_cert(end_entity, intermediates, inside)
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
                    AuthError::Unauthenticated(
                        "the client certificate was not issued by this server's CA".into(),
                    )
                }
                other => AuthError::Unauthenticated(format!(
                    "the client certificate is not valid for this server: {other}"
                )),
            })?;
        let mut device = None;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(u) = name
                    && let Some(enc) = u.strip_prefix(DEVICE_URI_PREFIX)
                {
                    device = percent_encoding::percent_decode_str(enc)
                        .decode_utf8()
                        .ok()
                        .map(|s| s.into_owned());
                }
            }
        }
        let device_id = device.ok_or_else(|| {
            AuthError::Unauthenticated(format!(
                "the client certificate names no device ({DEVICE_URI_PREFIX}... alternative name)"
            ))
        })?;
        let serial = cert.raw_serial();
        let issued_at = if serial.len() == 17 && serial[0] == 0x01 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&serial[1..9]);
            Timestamp(i64::from_be_bytes(b))
        } else {
            return Err(AuthError::Unauthenticated(
                "the client certificate is not a device certificate of this server (serial)".into(),
            ));
        };
        Ok(DeviceCertificate {
            device_id,
            issued_at,
            not_before,
            not_after,
        })
    }
}

fn dn_text(v: &rcgen::DnValue) -> Option<String> {
    Some(match v {
        rcgen::DnValue::Utf8String(s) => s.clone(),
        rcgen::DnValue::PrintableString(s) => s.as_str().to_owned(),
        rcgen::DnValue::Ia5String(s) => s.as_str().to_owned(),
        rcgen::DnValue::TeletexString(s) => s.as_str().to_owned(),
        _ => return None,
    })
}

fn internal(e: impl std::fmt::Display) -> AuthError {
    AuthError::Internal(e.to_string())
}

/// The first certificate in a PEM text.
pub fn first_certificate(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes()).next()?.ok()
}
