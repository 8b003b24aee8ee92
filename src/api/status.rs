//! Every error the server can answer with becomes a gRPC `Status` here, in one place, so each
//! code means one thing across all services.

use tonic::{Code, Status};

use crate::auth::AuthError;
use crate::catalog::CatalogError;
use crate::detectors::updates::UpdateError;
use crate::engine::EngineError;
use crate::flood::FloodError;
use crate::store::StoreError;

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        let msg = e.to_string();
        match e {
            EngineError::Invalid(crate::classify::ClassifyError::ServerOnly { .. }) => {
                Status::permission_denied(msg)
            }
            EngineError::Invalid(_) | EngineError::BadArgument { .. } => {
                Status::invalid_argument(msg)
            }
            EngineError::ShuttingDown => Status::unavailable(msg),
            EngineError::Internal(_) => Status::internal(msg),
            EngineError::NotFound(_) => Status::not_found(msg),
            EngineError::Update(u) => match u {
                UpdateError::NotFound(_) => Status::not_found(msg),
                UpdateError::Exists(_) => Status::already_exists(msg),
                UpdateError::Decided { .. } => Status::failed_precondition(msg),
            },
            EngineError::Store(s) => match s {
                StoreError::Unavailable(_) => Status::unavailable(msg),
                StoreError::BadPageToken => Status::invalid_argument(msg),
                StoreError::Full(_) => Status::resource_exhausted(msg),
                StoreError::Backend(_) => Status::internal(msg),
            },
            EngineError::Catalog(c) => match c {
                CatalogError::TypeExists(_) | CatalogError::IdTaken { .. } => {
                    Status::already_exists(msg)
                }
                CatalogError::NotFound(_) => Status::not_found(msg),
                CatalogError::Invalid { .. } => Status::invalid_argument(msg),
            },
            EngineError::Flood(f) => match f {
                FloodError::NoSuchBlock { .. } => Status::not_found(msg),
                FloodError::AlreadyBlocked { .. } => Status::failed_precondition(msg),
            },
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
            AuthError::Store(s) => Status::from(EngineError::Store(s)),
            AuthError::Internal(_) => Status::internal(msg),
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
