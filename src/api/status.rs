//! Every error the server can answer with becomes a gRPC `Status` here, in one place, so each
//! code means one thing across all services.

use tonic::{Code, Status};

use crate::auth::AuthError;
use crate::blocks::BlockError;
use crate::catalog::CatalogError;
use crate::catalog::admin::CatalogAdminError;
use crate::detectors::capacity::CapacityError;
use crate::detectors::certificates::CertificateError;
use crate::detectors::devices::DeviceError;
use crate::detectors::licences::LicenceError;
use crate::detectors::push::PushError;
use crate::detectors::updates::UpdateError;
use crate::engine::EngineError;
use crate::flood::FloodError;
use crate::hierarchy::relay::RelayError;
use crate::hierarchy::secondaries::LinkError;
use crate::store::{StoreError, StoreErrorKind};

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        let msg = e.to_string();
        match e.kind() {
            StoreErrorKind::Unavailable => Status::unavailable(msg),
            StoreErrorKind::BadPageToken => Status::invalid_argument(msg),
            StoreErrorKind::Full => Status::resource_exhausted(msg),
            StoreErrorKind::Backend => Status::internal(msg),
        }
    }
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        match e {
            EngineError::Invalid(crate::classify::ClassifyError::ServerOnly { .. }) => {
                Status::permission_denied(e.to_string())
            }
            EngineError::Invalid(_) => Status::invalid_argument(e.to_string()),
            EngineError::ShuttingDown => Status::unavailable(e.to_string()),
            EngineError::Store(s) => s.into(),
        }
    }
}

impl From<CatalogError> for Status {
    fn from(e: CatalogError) -> Status {
        let msg = e.to_string();
        match e {
            CatalogError::TypeExists(_) | CatalogError::IdTaken { .. } => {
                Status::already_exists(msg)
            }
            CatalogError::NotFound(_) => Status::not_found(msg),
            CatalogError::Invalid { .. } => Status::invalid_argument(msg),
        }
    }
}

impl From<CatalogAdminError> for Status {
    fn from(e: CatalogAdminError) -> Status {
        match e {
            CatalogAdminError::Refused(c) => c.into(),
            CatalogAdminError::Store(s) => s.into(),
        }
    }
}

impl From<BlockError> for Status {
    fn from(e: BlockError) -> Status {
        let msg = e.to_string();
        match e {
            BlockError::Refused(FloodError::NoSuchBlock { .. }) => Status::not_found(msg),
            BlockError::Refused(FloodError::AlreadyBlocked { .. }) => {
                Status::failed_precondition(msg)
            }
            BlockError::Store(s) => s.into(),
        }
    }
}

impl From<DeviceError> for Status {
    fn from(e: DeviceError) -> Status {
        match e {
            DeviceError::BadArgument(f) => f.into(),
            DeviceError::NotFound(_) => Status::not_found(e.to_string()),
            DeviceError::Raise(r) => r.into(),
            DeviceError::Store(s) => s.into(),
        }
    }
}

impl From<LicenceError> for Status {
    fn from(e: LicenceError) -> Status {
        match e {
            LicenceError::BadArgument(f) => f.into(),
            LicenceError::Raise(r) => r.into(),
            LicenceError::Store(s) => s.into(),
        }
    }
}

impl From<CertificateError> for Status {
    fn from(e: CertificateError) -> Status {
        match e {
            CertificateError::BadArgument(f) => f.into(),
            CertificateError::NotFound(_) => Status::not_found(e.to_string()),
            CertificateError::Raise(r) => r.into(),
            CertificateError::Store(s) => s.into(),
        }
    }
}

impl From<UpdateError> for Status {
    fn from(e: UpdateError) -> Status {
        let msg = e.to_string();
        match e {
            UpdateError::BadArgument(f) => f.into(),
            UpdateError::NotFound(_) => Status::not_found(msg),
            UpdateError::Exists(_) => Status::already_exists(msg),
            UpdateError::Decided { .. } => Status::failed_precondition(msg),
            UpdateError::Raise(r) => r.into(),
            UpdateError::Store(s) => s.into(),
        }
    }
}

impl From<PushError> for Status {
    fn from(e: PushError) -> Status {
        match e {
            PushError::BadArgument(f) => f.into(),
            PushError::Raise(r) => r.into(),
        }
    }
}

impl From<CapacityError> for Status {
    fn from(e: CapacityError) -> Status {
        match e {
            CapacityError::BadArgument(f) => f.into(),
            CapacityError::Volume { .. } => Status::internal(e.to_string()),
            CapacityError::Raise(r) => r.into(),
            CapacityError::Store(s) => s.into(),
        }
    }
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Status {
        let msg = e.to_string();
        match e {
            AuthError::Unauthenticated(_) => Status::unauthenticated(msg),
            AuthError::PermissionDenied(_) => Status::permission_denied(msg),
            AuthError::BadArgument { .. } => Status::invalid_argument(msg),
            AuthError::NotFound(_) => Status::not_found(msg),
            AuthError::Exists(_) => Status::already_exists(msg),
            AuthError::Store(s) => s.into(),
            AuthError::Internal(_) => Status::internal(msg),
        }
    }
}

impl From<RelayError> for Status {
    fn from(e: RelayError) -> Status {
        let msg = e.to_string();
        match e {
            RelayError::Invalid(_) | RelayError::NoHello => Status::invalid_argument(msg),
            RelayError::OutOfOrder(_) | RelayError::Loop(_) => Status::failed_precondition(msg),
            RelayError::HelloTimeout(_) => Status::deadline_exceeded(msg),
            RelayError::NoCertificate => Status::unauthenticated(msg),
            RelayError::WrongListener
            | RelayError::NotCertified { .. }
            | RelayError::NotFromSender(_) => Status::permission_denied(msg),
            RelayError::Link(LinkError::Invalid(_)) => Status::invalid_argument(msg),
            RelayError::Link(LinkError::OwnId(_)) => Status::failed_precondition(msg),
            RelayError::Event(e) => Status::from(e),
            RelayError::Unstored(_) | RelayError::ShuttingDown => Status::unavailable(msg),
        }
    }
}

/// An `INVALID_ARGUMENT` naming `field`.
pub fn bad_field(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

/// Prefix of tonic's message for a message over the decoding limit.
const TOO_LARGE: &str = "Error, decoded message length too large";

/// Tonic reports a message over the size limit as `OUT_OF_RANGE`; gRPC's other
/// implementations (and our contract) say `RESOURCE_EXHAUSTED`. Maps that one case.
pub fn decode_status(s: Status) -> Status {
    if s.code() == Code::OutOfRange && s.message().starts_with(TOO_LARGE) {
        Status::resource_exhausted(s.message().to_owned())
    } else {
        s
    }
}

/// Longest status message the server sends, in bytes of text before percent-encoding. A
/// longer one is cut (at a character, saying so): a `grpc-message` over a client's header
/// limit (16 KiB in hyper and grpc-go) would turn the answer into an HTTP/2 reset.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 1024;

/// Characters a `grpc-message` value percent-encodes (gRPC's rules, as tonic writes them).
const MESSAGE_ENCODING: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'?')
    .add(b'{')
    .add(b'}');

/// Cuts the `grpc-message` in `headers` (response headers or trailers) to
/// [`MAX_STATUS_MESSAGE_BYTES`] of text.
pub fn cap_status_message(headers: &mut http::HeaderMap) {
    let Some(value) = headers.get("grpc-message") else {
        return;
    };
    // Percent-encoding never shortens: a short header is a short message.
    if value.len() <= MAX_STATUS_MESSAGE_BYTES {
        return;
    }
    let decoded: Vec<u8> = percent_encoding::percent_decode(value.as_bytes()).collect();
    let text = String::from_utf8_lossy(&decoded);
    if text.len() <= MAX_STATUS_MESSAGE_BYTES {
        return;
    }
    let mut end = MAX_STATUS_MESSAGE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let cut = format!(
        "{}… (message cut, {} bytes in all)",
        &text[..end],
        text.len()
    );
    let encoded = percent_encoding::utf8_percent_encode(&cut, MESSAGE_ENCODING).to_string();
    if let Ok(v) = http::HeaderValue::from_str(&encoded) {
        headers.insert("grpc-message", v);
    }
}

/// Every response of the client port passes here: [`rewrite_too_large`], and the status
/// message cut by [`cap_status_message`] whether it comes in the headers (a trailers-only
/// answer) or in the trailers at the end of a streamed body.
pub fn finish_response(
    resp: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    use http_body_util::BodyExt;
    let (mut parts, body) = rewrite_too_large(resp).into_parts();
    cap_status_message(&mut parts.headers);
    let body = body.map_frame(|frame| match frame.into_trailers() {
        Ok(mut trailers) => {
            cap_status_message(&mut trailers);
            http_body::Frame::trailers(trailers)
        }
        Err(frame) => frame,
    });
    http::Response::from_parts(parts, tonic::body::Body::new(body))
}

/// Rewrites the `grpc-status` header of a trailers-only response that carries tonic's
/// over-size error (unary calls fail before the handler runs), see [`decode_status`].
pub fn rewrite_too_large<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let is_too_large = resp.headers().get("grpc-status").is_some_and(|v| v == "11")
        && resp
            .headers()
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.starts_with(TOO_LARGE) || m.starts_with("Error,%20decoded"));
    if is_too_large {
        resp.headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    resp
}

impl From<crate::fields::FieldError> for Status {
    fn from(e: crate::fields::FieldError) -> Status {
        Status::invalid_argument(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message_of(status: &Status) -> (usize, String) {
        let mut headers = http::HeaderMap::new();
        status.add_header(&mut headers).unwrap();
        cap_status_message(&mut headers);
        let v = headers.get("grpc-message").unwrap();
        let text = percent_encoding::percent_decode(v.as_bytes())
            .decode_utf8()
            .unwrap()
            .into_owned();
        (v.len(), text)
    }

    /// A long message is cut at a character and says so; a short one is left alone.
    #[test]
    fn long_status_messages_are_cut_at_a_character() {
        let (_, short) = message_of(&Status::invalid_argument("x: é 100% {bad}"));
        assert_eq!(short, "x: é 100% {bad}");
        let long = format!("x: {}", "é".repeat(10_000));
        let (encoded, text) = message_of(&Status::invalid_argument(long));
        assert!(encoded < 4 * MAX_STATUS_MESSAGE_BYTES, "{encoded}");
        assert!(text.starts_with("x: éé"), "{text}");
        assert!(
            text.ends_with("… (message cut, 20003 bytes in all)"),
            "{text}"
        );
        let ascii = "a".repeat(MAX_STATUS_MESSAGE_BYTES + 1);
        let (_, text) = message_of(&Status::internal(ascii));
        assert!(
            text.starts_with(&"a".repeat(MAX_STATUS_MESSAGE_BYTES)),
            "{text}"
        );
        assert!(text.contains("cut"));
    }
}
