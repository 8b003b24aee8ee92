//! Every error the server can answer with becomes a gRPC `Status` here, in one place, so each
//! code means one thing across all services.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

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
use crate::fields::FieldError;
use crate::flood::FloodError;
use crate::hierarchy::relay::RelayError;
use crate::hierarchy::secondaries::LinkError;
use crate::store::{StoreError, StoreErrorKind};

/// `google.rpc.ErrorInfo.domain` of every error this server answers with: reasons are unique
/// within it.
pub const ERROR_DOMAIN: &str = "fleet-events";

/// Why a call was refused: a stable code sent as `google.rpc.ErrorInfo.reason`, so clients
/// branch on it instead of parsing message text. Each reason has one gRPC code
/// ([`Reason::code`]); the README's error table lists them all.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A field is missing, malformed or over its limit (with a `BadRequest` naming it).
    InvalidField,
    /// A message could not be decoded (not protobuf, or a string field not UTF-8).
    UndecodableMessage,
    /// A page token that this server did not hand out (with a `BadRequest` on `page_token`).
    BadPageToken,
    /// A Relay stream broke the relay protocol (no hello first, a malformed message).
    RelayProtocol,
    /// A message over the server's size limit.
    MessageTooLarge,
    /// No credential, or one the server does not accept (unknown, revoked, expired).
    Unauthenticated,
    /// The credential's role (or the listener) does not allow the call.
    NotPermitted,
    /// A device's certificate named another device.
    OtherDevice,
    /// An event type only the server's own detectors raise.
    ServerOnlyType,
    /// The named resource does not exist (with a `ResourceInfo`).
    NotFound,
    /// A resource of that name exists already (with a `ResourceInfo`).
    AlreadyExists,
    /// The device and type are blocked already.
    AlreadyBlocked,
    /// The update was approved or rejected already.
    AlreadyDecided,
    /// A test notification names no rule or channel that could be tested.
    NothingToTest,
    /// A relay message came out of order (a batch before the hello, a second hello).
    RelayOutOfOrder,
    /// The hierarchy has a loop: this server is in the event's server chain.
    HierarchyLoop,
    /// A secondary used this server's own id.
    OwnServerId,
    /// A relay stream sent no hello in time.
    HelloTimeout,
    /// The server is shutting down (with a `RetryInfo`).
    ShuttingDown,
    /// The store cannot commit now (with a `RetryInfo`).
    StoreUnavailable,
    /// The store is full (with a `RetryInfo`).
    StoreFull,
    /// The server's subscription limits are reached (with a `RetryInfo`).
    TooManySubscribers,
    /// A configured maximum of entries (channels, SIEM destinations) is reached.
    LimitReached,
    /// The data volume cannot be measured.
    VolumeUnreadable,
    /// The store failed in a way a retry does not cure.
    Internal,
    /// The server failed while serving the call.
    ServerFailed,
}

impl Reason {
    /// Every reason, in the README's table order.
    pub const ALL: [Reason; 26] = [
        Reason::InvalidField,
        Reason::UndecodableMessage,
        Reason::BadPageToken,
        Reason::RelayProtocol,
        Reason::MessageTooLarge,
        Reason::Unauthenticated,
        Reason::NotPermitted,
        Reason::OtherDevice,
        Reason::ServerOnlyType,
        Reason::NotFound,
        Reason::AlreadyExists,
        Reason::AlreadyBlocked,
        Reason::AlreadyDecided,
        Reason::NothingToTest,
        Reason::RelayOutOfOrder,
        Reason::HierarchyLoop,
        Reason::OwnServerId,
        Reason::HelloTimeout,
        Reason::ShuttingDown,
        Reason::StoreUnavailable,
        Reason::StoreFull,
        Reason::TooManySubscribers,
        Reason::LimitReached,
        Reason::VolumeUnreadable,
        Reason::Internal,
        Reason::ServerFailed,
    ];

    /// The code sent as `ErrorInfo.reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidField => "INVALID_FIELD",
            Reason::UndecodableMessage => "UNDECODABLE_MESSAGE",
            Reason::BadPageToken => "BAD_PAGE_TOKEN",
            Reason::RelayProtocol => "RELAY_PROTOCOL",
            Reason::MessageTooLarge => "MESSAGE_TOO_LARGE",
            Reason::Unauthenticated => "UNAUTHENTICATED",
            Reason::NotPermitted => "NOT_PERMITTED",
            Reason::OtherDevice => "OTHER_DEVICE",
            Reason::ServerOnlyType => "SERVER_ONLY_TYPE",
            Reason::NotFound => "NOT_FOUND",
            Reason::AlreadyExists => "ALREADY_EXISTS",
            Reason::AlreadyBlocked => "ALREADY_BLOCKED",
            Reason::AlreadyDecided => "ALREADY_DECIDED",
            Reason::NothingToTest => "NOTHING_TO_TEST",
            Reason::RelayOutOfOrder => "RELAY_OUT_OF_ORDER",
            Reason::HierarchyLoop => "HIERARCHY_LOOP",
            Reason::OwnServerId => "OWN_SERVER_ID",
            Reason::HelloTimeout => "HELLO_TIMEOUT",
            Reason::ShuttingDown => "SHUTTING_DOWN",
            Reason::StoreUnavailable => "STORE_UNAVAILABLE",
            Reason::StoreFull => "STORE_FULL",
            Reason::TooManySubscribers => "TOO_MANY_SUBSCRIBERS",
            Reason::LimitReached => "LIMIT_REACHED",
            Reason::VolumeUnreadable => "VOLUME_UNREADABLE",
            Reason::Internal => "INTERNAL",
            Reason::ServerFailed => "SERVER_FAILED",
        }
    }

    /// The gRPC code every refusal of this reason has.
    pub fn code(self) -> Code {
        use Reason::*;
        match self {
            InvalidField | UndecodableMessage | BadPageToken | RelayProtocol => {
                Code::InvalidArgument
            }
            MessageTooLarge | StoreFull | TooManySubscribers | LimitReached => {
                Code::ResourceExhausted
            }
            Unauthenticated => Code::Unauthenticated,
            NotPermitted | OtherDevice | ServerOnlyType => Code::PermissionDenied,
            NotFound => Code::NotFound,
            AlreadyExists => Code::AlreadyExists,
            AlreadyBlocked | AlreadyDecided | NothingToTest | RelayOutOfOrder | HierarchyLoop
            | OwnServerId => Code::FailedPrecondition,
            HelloTimeout => Code::DeadlineExceeded,
            ShuttingDown | StoreUnavailable => Code::Unavailable,
            VolumeUnreadable | Internal | ServerFailed => Code::Internal,
        }
    }

    /// How long a client should wait before retrying (`google.rpc.RetryInfo`), for the
    /// refusals a retry can cure; `None` for the rest (a too-large message or a configured
    /// maximum fails again however long one waits).
    pub fn retry_after(self) -> Option<Duration> {
        match self {
            Reason::ShuttingDown | Reason::StoreUnavailable | Reason::TooManySubscribers => {
                Some(Duration::from_secs(1))
            }
            Reason::StoreFull => Some(Duration::from_secs(60)),
            _ => None,
        }
    }
}

/// A refusal being built: a reason, a message and the details that go with them.
#[must_use]
pub struct Refusal {
    reason: Reason,
    message: String,
    details: ErrorDetails,
}

impl Refusal {
    /// A refusal for `reason`, with its `ErrorInfo` and (where it has one) `RetryInfo`.
    pub fn new(reason: Reason, message: impl Into<String>) -> Refusal {
        let mut details = ErrorDetails::new();
        details.set_error_info(
            reason.as_str(),
            ERROR_DOMAIN,
            std::collections::HashMap::new(),
        );
        if let Some(after) = reason.retry_after() {
            details.set_retry_info(Some(after));
        }
        // Cut here as well as on the wire: `ResourceInfo` repeats the message, and the
        // details header is not cut the way `grpc-message` is.
        let message = message.into();
        let message = match cut_message(&message) {
            std::borrow::Cow::Borrowed(_) => message,
            std::borrow::Cow::Owned(cut) => cut,
        };
        Refusal {
            reason,
            message,
            details,
        }
    }

    /// Names the bad field (`BadRequest.field_violations`).
    pub fn field(mut self, field: &str, description: impl Into<String>) -> Refusal {
        let description = description.into();
        self.details
            .add_bad_request_violation(cut_message(field), cut_message(&description));
        self
    }

    /// Names the resource (`ResourceInfo`): its kind (a proto message name such as
    /// `fleetevents.v1.EventType`) and its name or key.
    pub fn resource(mut self, kind: &str, name: impl Into<String>) -> Refusal {
        let name = name.into();
        self.details
            .set_resource_info(kind, cut_message(&name), "", self.message.clone());
        self
    }

    /// The status to answer with.
    pub fn status(self) -> Status {
        Status::with_error_details(self.reason.code(), self.message, self.details)
    }
}

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Status {
        r.status()
    }
}

/// A refusal for `reason` with its message and nothing but the standard details.
pub fn refuse(reason: Reason, message: impl Into<String>) -> Status {
    Refusal::new(reason, message).status()
}

/// An `INVALID_ARGUMENT` naming `field` (in the message and in a `BadRequest`).
pub fn bad_field(field: &str, reason: impl std::fmt::Display) -> Status {
    let reason = reason.to_string();
    // A reason that names the field already (an inner error's own text) is said once.
    let reason = match reason
        .strip_prefix(field)
        .and_then(|r| r.strip_prefix(": "))
    {
        Some(rest) => rest.to_owned(),
        None => reason,
    };
    Refusal::new(Reason::InvalidField, format!("{field}: {reason}"))
        .field(field, reason)
        .status()
}

/// An `INVALID_ARGUMENT` for a `page_token` this server did not hand out
/// ([`Reason::BadPageToken`], with a `BadRequest` naming `page_token`).
pub fn bad_page_token(why: impl std::fmt::Display) -> Status {
    let why = why.to_string();
    Refusal::new(Reason::BadPageToken, format!("page_token: {why}"))
        .field("page_token", why)
        .status()
}

/// A `NOT_FOUND` for the resource `kind` named `name`.
pub fn not_found(kind: &str, name: &str, message: impl Into<String>) -> Status {
    Refusal::new(Reason::NotFound, message)
        .resource(kind, name)
        .status()
}

/// An `ALREADY_EXISTS` for the resource `kind` named `name`.
pub fn exists(kind: &str, name: &str, message: impl Into<String>) -> Status {
    Refusal::new(Reason::AlreadyExists, message)
        .resource(kind, name)
        .status()
}

/// The refusal of the `index`th message of a `Stream` (1-based) whose event id is `event_id`
/// (`None` when it could not be decoded): the message says which event, and the details keep
/// what they said and add `event_index` (and `event_id`) to the `ErrorInfo`'s metadata and
/// the event to each field violation's description.
pub fn in_stream(status: Status, index: u64, event_id: Option<&str>) -> Status {
    let which = match event_id {
        Some(id) => format!("event #{index} (event_id {})", crate::fields::shown(id)),
        None => format!("event #{index}"),
    };
    let mut details = status.get_error_details();
    let (reason, mut metadata) = match details.error_info() {
        Some(info) => (info.reason.clone(), info.metadata.clone()),
        None => (
            fallback_reason(status.code()).to_owned(),
            Default::default(),
        ),
    };
    metadata.insert("event_index".to_owned(), index.to_string());
    if let Some(id) = event_id {
        metadata.insert("event_id".to_owned(), id.to_owned());
    }
    details.set_error_info(reason, ERROR_DOMAIN, metadata);
    if let Some(bad) = details.bad_request() {
        let violations: Vec<_> = bad
            .field_violations
            .iter()
            .map(|v| {
                tonic_types::FieldViolation::new(
                    v.field.clone(),
                    format!("{which}: {}", v.description),
                )
            })
            .collect();
        details.set_bad_request(violations);
    }
    Status::with_error_details(
        status.code(),
        format!("{which}: {}", status.message()),
        details,
    )
}

/// The `ErrorInfo.reason` of a status the gRPC layer made itself (an unknown method, a
/// cancelled call): the code's name.
pub fn fallback_reason(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        let msg = e.to_string();
        match e.kind() {
            StoreErrorKind::Unavailable => refuse(Reason::StoreUnavailable, msg),
            StoreErrorKind::BadPageToken => {
                bad_page_token("not a token this server issued for this query")
            }
            StoreErrorKind::Full => refuse(Reason::StoreFull, msg),
            StoreErrorKind::Backend => refuse(Reason::Internal, msg),
        }
    }
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        match e {
            EngineError::Invalid(crate::classify::ClassifyError::ServerOnly { .. }) => {
                refuse(Reason::ServerOnlyType, e.to_string())
            }
            EngineError::Invalid(crate::classify::ClassifyError::Invalid { field, reason }) => {
                bad_field(field, reason)
            }
            EngineError::ShuttingDown => refuse(Reason::ShuttingDown, e.to_string()),
            EngineError::Store(s) => s.into(),
        }
    }
}

impl From<CatalogError> for Status {
    fn from(e: CatalogError) -> Status {
        let msg = e.to_string();
        match e {
            CatalogError::TypeExists(name) => exists("fleetevents.v1.EventType", &name, msg),
            CatalogError::IdTaken { id, .. } => Refusal::new(Reason::AlreadyExists, msg.clone())
                .resource("fleetevents.v1.EventType", id.to_string())
                .field("event_type_id", msg)
                .status(),
            CatalogError::NotFound(name) => not_found("fleetevents.v1.EventType", &name, msg),
            CatalogError::Invalid { field, reason } => bad_field(field, reason),
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
            BlockError::Refused(FloodError::NoSuchBlock {
                device_id,
                event_type,
            }) => not_found(
                "fleetevents.v1.FrequentEventBlock",
                &format!("{device_id}/{event_type}"),
                msg,
            ),
            BlockError::Refused(FloodError::AlreadyBlocked {
                device_id,
                event_type,
            }) => Refusal::new(Reason::AlreadyBlocked, msg)
                .resource(
                    "fleetevents.v1.FrequentEventBlock",
                    format!("{device_id}/{event_type}"),
                )
                .status(),
            BlockError::Store(s) => s.into(),
        }
    }
}

impl From<DeviceError> for Status {
    fn from(e: DeviceError) -> Status {
        match e {
            DeviceError::BadArgument(f) => f.into(),
            DeviceError::NotFound(ref id) => not_found("fleetevents.v1.Device", id, e.to_string()),
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
            CertificateError::NotFound(ref key) => {
                not_found("fleetevents.v1.MdmCertificate", key, e.to_string())
            }
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
            UpdateError::NotFound(id) => not_found("fleetevents.v1.Update", &id, msg),
            UpdateError::Exists(id) => exists("fleetevents.v1.Update", &id, msg),
            UpdateError::Decided { id, .. } => Refusal::new(Reason::AlreadyDecided, msg)
                .resource("fleetevents.v1.Update", id)
                .status(),
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
            CapacityError::Volume { .. } => refuse(Reason::VolumeUnreadable, e.to_string()),
            CapacityError::Raise(r) => r.into(),
            CapacityError::Store(s) => s.into(),
        }
    }
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Status {
        let msg = e.to_string();
        match e {
            AuthError::Unauthenticated(_) => refuse(Reason::Unauthenticated, msg),
            AuthError::PermissionDenied(_) => refuse(Reason::NotPermitted, msg),
            AuthError::OtherDevice(_) => refuse(Reason::OtherDevice, msg),
            AuthError::BadArgument { field, reason } => bad_field(field, reason),
            AuthError::NotFound { kind, name } => not_found(kind, &name, msg),
            AuthError::Exists { kind, name } => exists(kind, &name, msg),
            AuthError::Store(s) => s.into(),
            AuthError::Internal(_) => refuse(Reason::Internal, msg),
        }
    }
}

impl From<RelayError> for Status {
    fn from(e: RelayError) -> Status {
        let msg = e.to_string();
        match e {
            RelayError::Invalid(_) | RelayError::NoHello => refuse(Reason::RelayProtocol, msg),
            RelayError::OutOfOrder(_) => refuse(Reason::RelayOutOfOrder, msg),
            RelayError::Loop(_) => refuse(Reason::HierarchyLoop, msg),
            RelayError::HelloTimeout(_) => refuse(Reason::HelloTimeout, msg),
            RelayError::NoCertificate => refuse(Reason::Unauthenticated, msg),
            RelayError::WrongListener
            | RelayError::NotCertified { .. }
            | RelayError::NotFromSender(_) => refuse(Reason::NotPermitted, msg),
            RelayError::Link(LinkError::Invalid(_)) => refuse(Reason::RelayProtocol, msg),
            RelayError::Link(LinkError::OwnId(_)) => refuse(Reason::OwnServerId, msg),
            RelayError::Event(e) => Status::from(e),
            RelayError::ShuttingDown => refuse(Reason::ShuttingDown, msg),
            RelayError::Unstored(_) => refuse(Reason::StoreUnavailable, msg),
        }
    }
}

/// Prefix of tonic's message for a message over the decoding limit.
const TOO_LARGE: &str = "Error, decoded message length too large";

/// Prefix of tonic's message for a message it could not decode (not protobuf, or a string
/// field that is not UTF-8); tonic says `INTERNAL`.
const UNDECODABLE: &str = "failed to decode Protobuf message";

/// Maps the statuses tonic makes itself when it reads a message to this server's contract:
/// a message over the size limit (tonic: `OUT_OF_RANGE`) is `RESOURCE_EXHAUSTED`
/// ([`Reason::MessageTooLarge`]), as gRPC's other implementations say; an undecodable one
/// (tonic: `INTERNAL`) is the client's fault, `INVALID_ARGUMENT`
/// ([`Reason::UndecodableMessage`]). Any other status is returned as it is.
pub fn decode_status(s: Status) -> Status {
    if s.code() == Code::OutOfRange && s.message().starts_with(TOO_LARGE) {
        refuse(Reason::MessageTooLarge, s.message().to_owned())
    } else if s.code() == Code::Internal && s.message().starts_with(UNDECODABLE) {
        refuse(
            Reason::UndecodableMessage,
            format!("the message could not be decoded: {}", s.message()),
        )
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
    let std::borrow::Cow::Owned(cut) = cut_message(&text) else {
        return;
    };
    let encoded = percent_encoding::utf8_percent_encode(&cut, MESSAGE_ENCODING).to_string();
    if let Ok(v) = http::HeaderValue::from_str(&encoded) {
        headers.insert("grpc-message", v);
    }
}

/// `text` whole when at most [`MAX_STATUS_MESSAGE_BYTES`], else cut at a character before
/// that many bytes and saying so, with the length it had.
pub fn cut_message(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_STATUS_MESSAGE_BYTES {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = MAX_STATUS_MESSAGE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!(
        "{}… (message cut, {} bytes in all)",
        &text[..end],
        text.len()
    ))
}

/// Longest `grpc-status-details-bin` the server sends, in bytes of base64. With a cut
/// `grpc-message` (at most three times [`MAX_STATUS_MESSAGE_BYTES`] once percent-encoded) the
/// status stays well under a client's 16 KiB header list limit.
pub const MAX_STATUS_DETAILS_BYTES: usize = 8 * 1024;

/// The header that carries a status's `google.rpc.Status` (base64).
const STATUS_DETAILS_HEADER: &str = "grpc-status-details-bin";

/// Keeps the `grpc-status-details-bin` in `headers` within [`MAX_STATUS_DETAILS_BYTES`]: a
/// longer one has its message cut like `grpc-message`, then keeps, in order, the details that
/// still fit (the `ErrorInfo` that names the reason is small and comes first of the long
/// ones). The refusals the server builds are cut already ([`Refusal::new`]); this is the net
/// under every other status, so that no answer becomes an HTTP/2 error at the client.
pub fn cap_status_details(headers: &mut http::HeaderMap) {
    use base64::Engine;
    use prost::Message;
    let Some(value) = headers.get(STATUS_DETAILS_HEADER) else {
        return;
    };
    if value.len() <= MAX_STATUS_DETAILS_BYTES {
        return;
    }
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_encode_padding(false)
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let decoded = engine
        .decode(value.as_bytes())
        .ok()
        .and_then(|bytes| tonic_types::pb::Status::decode(bytes.as_slice()).ok());
    let Some(mut status) = decoded else {
        // Not ours to repair: a status without details beats an answer the client drops.
        tracing::warn!(
            "dropping an undecodable grpc-status-details-bin of {} bytes",
            value.len()
        );
        headers.remove(STATUS_DETAILS_HEADER);
        return;
    };
    if let std::borrow::Cow::Owned(cut) = cut_message(&status.message) {
        status.message = cut;
    }
    // Raw bytes that encode to at most the limit in base64.
    let budget = MAX_STATUS_DETAILS_BYTES / 4 * 3;
    let mut used = status.message.len() + 16;
    let before = status.details.len();
    status.details.retain(|detail| {
        let size = detail.encoded_len() + 8;
        let fits = used + size <= budget;
        if fits {
            used += size;
        }
        fits
    });
    if status.details.len() < before {
        tracing::warn!(
            "{} status detail(s) left out: over {MAX_STATUS_DETAILS_BYTES} bytes",
            before - status.details.len()
        );
    }
    let encoded = engine.encode(status.encode_to_vec());
    match http::HeaderValue::from_str(&encoded) {
        Ok(v) => {
            headers.insert(STATUS_DETAILS_HEADER, v);
        }
        Err(_) => {
            headers.remove(STATUS_DETAILS_HEADER);
        }
    }
}

/// Every response of a gRPC port passes here: the status of a failed call (in the headers of
/// a trailers-only answer, or in the trailers at the end of a streamed body) is completed by
/// [`complete_status`], then its message and details are cut by [`cap_status_message`] and
/// [`cap_status_details`].
pub fn finish_response(
    resp: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    use http_body_util::BodyExt;
    let (mut parts, body) = resp.into_parts();
    complete_status(&mut parts.headers);
    cap_status_message(&mut parts.headers);
    cap_status_details(&mut parts.headers);
    let body = body.map_frame(|frame| match frame.into_trailers() {
        Ok(mut trailers) => {
            complete_status(&mut trailers);
            cap_status_message(&mut trailers);
            cap_status_details(&mut trailers);
            http_body::Frame::trailers(trailers)
        }
        Err(frame) => frame,
    });
    http::Response::from_parts(parts, tonic::body::Body::new(body))
}

/// Gives an error status in `headers` the details every refusal carries: the statuses tonic
/// makes before a handler runs (a unary message too large or undecodable, an unknown method)
/// are mapped by [`decode_status`], and one without `grpc-status-details-bin` gets an
/// `ErrorInfo` whose reason is its code's name ([`fallback_reason`]).
pub fn complete_status(headers: &mut http::HeaderMap) {
    let failed = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() != b"0");
    if !failed || headers.contains_key("grpc-status-details-bin") {
        return;
    }
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    let status = decode_status(status);
    let status = if status.details().is_empty() {
        let mut details = ErrorDetails::new();
        details.set_error_info(
            fallback_reason(status.code()),
            ERROR_DOMAIN,
            std::collections::HashMap::new(),
        );
        Status::with_error_details(status.code(), status.message(), details)
    } else {
        status
    };
    let _ = status.add_header(headers);
}

impl From<FieldError> for Status {
    fn from(e: FieldError) -> Status {
        bad_field(&e.field, e.reason)
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

    /// A refusal built with a huge message keeps its details header small: the message is cut
    /// where it is built (and `ResourceInfo`, which repeats it, with it).
    #[test]
    fn refusals_cut_their_message_before_the_details_repeat_it() {
        let long = format!("x: {}", "\\0".repeat(8192));
        let status = Refusal::new(Reason::OtherDevice, long.clone())
            .field(&"f".repeat(5000), long.clone())
            .resource("fleetevents.v1.Device", long)
            .status();
        let mut headers = http::HeaderMap::new();
        status.add_header(&mut headers).unwrap();
        let details = headers.get(STATUS_DETAILS_HEADER).unwrap().len();
        assert!(details <= MAX_STATUS_DETAILS_BYTES, "{details}");
        assert!(
            status
                .message()
                .ends_with("(message cut, 16387 bytes in all)")
        );
        let kept = status.get_error_details();
        assert_eq!(kept.error_info().unwrap().reason, "OTHER_DEVICE");
        assert!(kept.resource_info().unwrap().resource_name.len() < 2 * MAX_STATUS_MESSAGE_BYTES);
        assert_eq!(kept.bad_request().unwrap().field_violations.len(), 1);
    }

    /// Any other status whose details are over the limit loses its cut message's length and
    /// then, in order, the details that do not fit; the reason stays.
    #[test]
    fn oversized_details_are_cut_and_the_reason_kept() {
        use prost::Message;
        let mut details = ErrorDetails::new();
        details.set_error_info(
            "OTHER_DEVICE",
            ERROR_DOMAIN,
            std::collections::HashMap::new(),
        );
        details.set_resource_info("kind", "r".repeat(20_000), "", "d");
        let long = "m".repeat(20_000);
        let status = Status::with_error_details(Code::PermissionDenied, long, details);
        let mut headers = http::HeaderMap::new();
        status.add_header(&mut headers).unwrap();
        assert!(headers.get(STATUS_DETAILS_HEADER).unwrap().len() > MAX_STATUS_DETAILS_BYTES);
        cap_status_message(&mut headers);
        cap_status_details(&mut headers);
        let size = headers.get(STATUS_DETAILS_HEADER).unwrap().len();
        assert!(size <= MAX_STATUS_DETAILS_BYTES, "{size}");
        let back = Status::from_header_map(&headers).unwrap();
        assert_eq!(back.code(), Code::PermissionDenied);
        let kept = back.get_error_details();
        assert_eq!(kept.error_info().unwrap().reason, "OTHER_DEVICE");
        assert!(kept.resource_info().is_none(), "too long to keep");
        let inner = tonic_types::pb::Status::decode(back.details()).unwrap();
        assert!(
            inner.message.ends_with("(message cut, 20000 bytes in all)"),
            "{}",
            inner.message
        );
        // Small details pass untouched.
        let small = refuse(Reason::OtherDevice, "short");
        let mut headers = http::HeaderMap::new();
        small.add_header(&mut headers).unwrap();
        let before = headers.clone();
        cap_status_details(&mut headers);
        assert_eq!(headers, before);
    }
}
