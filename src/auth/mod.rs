//! Who may call what: the server's trust model, free of gRPC types.
//!
//! - [`pki`]: the server's own CA (device certificates, the client port's certificate).
//! - [`policy`]: the one table of RPCs and the callers each allows.
//! - [`audit`]: the stored audit events of administrative writes.
//! - [`AccessControl`] (here): bearer tokens (hashed), enrolment tokens, device revocations;
//!   authenticating one call's credential and authorising it against the table.
//!
//! Credentials are kept as shared records in the store, so servers sharing one PostgreSQL
//! database share tokens and revocations (refreshed every `auth.refresh_interval`).

pub mod audit;
pub mod pki;
pub mod policy;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::clock::{SharedClock, Timestamp};
use crate::store::{EventStore, StoreError};
use pki::{Authority, DeviceCertificate};
use policy::Callers;

/// What a bearer token may do (see [`policy`] for the RPCs of each).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Query, subscribe, list, get.
    Viewer,
    /// Viewer, plus the frequent-event actions and the `Check*` calls.
    Operator,
    /// Everything.
    Admin,
    /// An integration: events and reports for any device, nothing administrative.
    Ingest,
}

impl Role {
    /// Every role, in order.
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Operator, Role::Admin, Role::Ingest];

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Ingest => "ingest",
        }
    }

    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// The authenticated caller of one RPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// A person or integration with a bearer token.
    Token {
        /// The token's name.
        name: String,
        /// Its role.
        role: Role,
    },
    /// An agent with a device certificate of this server's CA.
    Device {
        /// The device the certificate names.
        device_id: String,
        /// When that certificate was issued (a revocation after it ends it).
        issued_at: Timestamp,
        /// When that certificate expires.
        not_after: Timestamp,
    },
    /// Nobody: only for the RPCs the table leaves open.
    Anonymous,
}

impl Principal {
    /// How audit events name the caller: `token:NAME` or `device:ID`.
    pub fn label(&self) -> String {
        match self {
            Principal::Token { name, .. } => format!("token:{name}"),
            Principal::Device { device_id, .. } => format!("device:{device_id}"),
            Principal::Anonymous => "anonymous".into(),
        }
    }

    /// The device this caller may speak for: `Some(id)` for a device certificate (only that
    /// device), `None` for tokens (any device).
    pub fn own_device(&self) -> Option<&str> {
        match self {
            Principal::Device { device_id, .. } => Some(device_id),
            _ => None,
        }
    }
}

/// Why a call or an access request was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credential, or one the server cannot accept (unknown, revoked, expired, malformed).
    #[error("{0}")]
    Unauthenticated(String),
    /// The credential is valid but may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// A device's certificate named another device.
    #[error("{0}")]
    OtherDevice(String),
    /// A field of an access request is malformed.
    #[error("{field}: {reason}")]
    BadArgument {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// No such token or enrolment token.
    #[error("no {} {name:?}", resource_noun(kind))]
    NotFound {
        /// The resource's proto message name, e.g. `fleetevents.v1.TokenInfo`.
        kind: &'static str,
        /// Its name or id.
        name: String,
    },
    /// A token of that name exists (revoked tokens keep their names).
    #[error(
        "a {} named {name:?} exists (revoked tokens keep their names)",
        resource_noun(kind)
    )]
    Exists {
        /// The resource's proto message name.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// The credential store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

/// How a message names a resource kind of [`AuthError`].
fn resource_noun(kind: &str) -> &'static str {
    match kind {
        "fleetevents.v1.EnrollmentTokenInfo" => "enrolment token",
        _ => "token",
    }
}

/// A bearer token as kept: never its secret, only the secret's SHA-256.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiToken {
    /// Unique name.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// SHA-256 of the secret, hex.
    pub hash: String,
    /// When it was made.
    pub created_at: Timestamp,
    /// The credential that made it.
    pub created_by: String,
    /// When it was revoked.
    pub revoked_at: Option<Timestamp>,
}

/// An enrolment token as kept.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnrollmentToken {
    /// The public half of the secret; names the token.
    pub id: String,
    /// SHA-256 of the whole secret, hex.
    pub hash: String,
    /// A group or label recorded on its enrolments.
    pub label: String,
    /// Enrolments allowed.
    pub uses: u32,
    /// Enrolments made.
    pub used: u32,
    /// When it was made.
    pub created_at: Timestamp,
    /// When it stops working.
    pub expires_at: Timestamp,
    /// When it was revoked.
    pub revoked_at: Option<Timestamp>,
    /// The credential that made it.
    pub created_by: String,
}

/// A revoked device: its certificates issued at or before `revoked_at` are refused.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceRevocation {
    /// The device.
    pub device_id: String,
    /// When it was revoked.
    pub revoked_at: Timestamp,
    /// Who revoked it.
    pub revoked_by: String,
}

const TOKEN_KIND: &str = "auth_token";
const ENROLL_KIND: &str = "auth_enrollment_token";
const REVOKE_KIND: &str = "auth_device_revocation";
/// The prefix of bearer tokens (helps secret scanners and users tell what a string is).
pub const TOKEN_PREFIX: &str = "fet_";
/// The prefix of enrolment tokens.
pub const ENROLL_PREFIX: &str = "fee_";
/// The name of the admin token written at first start.
pub const BOOTSTRAP_ADMIN: &str = "admin";
/// Longest token name and enrolment label, bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Most enrolments one token allows.
pub const MAX_ENROLL_USES: u32 = 1_000_000;
/// Longest life of an enrolment token.
pub const MAX_ENROLL_VALID: Duration = Duration::from_secs(365 * 86_400);
/// Longest credential accepted in a header or request, bytes (longer is refused unread).
const MAX_SECRET_BYTES: usize = 256;

fn sha256_hex(s: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    // On every call of a token holder: one allocation, not one per byte.
    let mut hex = String::with_capacity(64);
    for b in d.as_ref() {
        hex.push(char::from(HEX[usize::from(b >> 4)]));
        hex.push(char::from(HEX[usize::from(b & 15)]));
    }
    hex
}

fn random_secret(bytes: usize) -> Result<String, AuthError> {
    use base64::Engine as _;
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| AuthError::Internal("no randomness from the system".into()))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

fn valid_name(field: &'static str, s: &str, allow_empty: bool) -> Result<(), AuthError> {
    if s.is_empty() && allow_empty {
        return Ok(());
    }
    if s.is_empty() || s.len() > MAX_NAME_BYTES {
        return Err(AuthError::BadArgument {
            field,
            reason: format!("must be 1-{MAX_NAME_BYTES} bytes"),
        });
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '@')))
    {
        return Err(AuthError::BadArgument {
            field,
            reason: format!("{c:?} is not allowed (A-Z a-z 0-9 _ . - @)"),
        });
    }
    Ok(())
}

/// Tokens by secret hash, for the per-call look-up.
type TokenIndex = HashMap<String, Arc<ApiToken>>;

/// The live tokens, as every call reads them.
#[derive(Default)]
struct LiveTokens {
    /// By the SHA-256 of the secret.
    by_hash: TokenIndex,
    /// Their names, for long-lived calls re-checking their caller.
    names: std::collections::HashSet<String>,
}

impl LiveTokens {
    fn new(by_hash: TokenIndex) -> Self {
        let names = by_hash.values().map(|t| t.name.clone()).collect();
        LiveTokens { by_hash, names }
    }
}

/// A device's current enrolment: what its newest certificate is.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Enrollment {
    /// The device.
    pub device_id: String,
    /// When its newest certificate was issued.
    pub issued_at: Timestamp,
    /// When that certificate expires.
    pub not_after: Timestamp,
    /// The enrolment token's label.
    pub label: String,
    /// The id of the enrolment token it enrolled with.
    pub token_id: String,
}

const ENROLLED_KIND: &str = "auth_enrolled_device";

/// Credentials and the checks made on every call.
pub struct AccessControl {
    store: Arc<EventStore>,
    clock: SharedClock,
    authority: Authority,
    /// Live (unrevoked) tokens by hash: read on every call without a lock.
    live_tokens: ArcSwap<LiveTokens>,
    /// This server's id: no device may enrol under it.
    server_id: String,
    /// Revoked devices: read on every device call without a lock.
    revoked: ArcSwap<HashMap<String, Timestamp>>,
    /// Serialises administrative changes (check, save, swap in).
    admin: tokio::sync::Mutex<()>,
    /// Counts changes that can end a session (a token or device revoked, here or, seen at a
    /// refresh, on another server), so open streams re-check when one happens instead of
    /// polling.
    changes: tokio::sync::watch::Sender<u64>,
}

impl AccessControl {
    /// Loads the credentials saved in `store`.
    pub async fn load(
        store: Arc<EventStore>,
        clock: SharedClock,
        authority: Authority,
        server_id: &str,
    ) -> Result<Self, AuthError> {
        let ac = AccessControl {
            store,
            clock,
            authority,
            server_id: server_id.to_owned(),
            live_tokens: ArcSwap::from_pointee(LiveTokens::default()),
            revoked: ArcSwap::from_pointee(HashMap::new()),
            admin: tokio::sync::Mutex::new(()),
            changes: tokio::sync::watch::Sender::new(0),
        };
        ac.refresh().await?;
        Ok(ac)
    }

    /// The certificate authority.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Re-reads tokens and revocations from the store (other servers sharing a PostgreSQL
    /// database change them too).
    pub async fn refresh(&self) -> Result<(), AuthError> {
        let tokens = self.tokens().await?;
        let index: TokenIndex = tokens
            .into_iter()
            .filter(|t| t.revoked_at.is_none())
            .map(|t| (t.hash.clone(), Arc::new(t)))
            .collect();
        let live = LiveTokens::new(index);
        let mut revoked = HashMap::new();
        for json in self.store.load_shared_records(REVOKE_KIND).await? {
            let r: DeviceRevocation = decode(&json)?;
            revoked.insert(r.device_id, r.revoked_at);
        }
        // A token gone from the live set, or a revocation new or moved: open sessions look.
        let ends_sessions = self
            .live_tokens
            .load()
            .names
            .iter()
            .any(|n| !live.names.contains(n))
            || revoked
                .iter()
                .any(|(d, at)| self.revoked.load().get(d) != Some(at));
        self.live_tokens.store(Arc::new(live));
        self.revoked.store(Arc::new(revoked));
        if ends_sessions {
            self.note_change();
        }
        Ok(())
    }

    /// Wakes every open session to re-check its credential.
    fn note_change(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver woken whenever a token or a device is revoked (here, or on another server
    /// sharing the database, seen at the next refresh): long calls re-check their credential
    /// with [`AccessControl::still_valid`] then, instead of polling.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Every bearer token, revoked ones included, by name.
    pub async fn tokens(&self) -> Result<Vec<ApiToken>, AuthError> {
        self.store
            .load_shared_records(TOKEN_KIND)
            .await?
            .iter()
            .map(|j| decode(j))
            .collect()
    }

    /// Makes the first admin token when no live admin token exists (first start, or every
    /// admin token revoked): returns its secret for the caller to write to a 0600 file.
    pub async fn bootstrap_admin(&self) -> Result<Option<String>, AuthError> {
        let _g = self.admin.lock().await;
        let tokens = self.tokens().await?;
        if tokens
            .iter()
            .any(|t| t.role == Role::Admin && t.revoked_at.is_none())
        {
            return Ok(None);
        }
        let mut name = BOOTSTRAP_ADMIN.to_owned();
        let mut n = 1;
        while tokens.iter().any(|t| t.name == name) {
            n += 1;
            name = format!("{BOOTSTRAP_ADMIN}-{n}");
        }
        let (_, secret) = self.put_token(&name, Role::Admin, "bootstrap").await?;
        Ok(Some(secret))
    }

    async fn put_token(
        &self,
        name: &str,
        role: Role,
        by: &str,
    ) -> Result<(ApiToken, String), AuthError> {
        let secret = format!("{TOKEN_PREFIX}{}", random_secret(32)?);
        let t = ApiToken {
            name: name.to_owned(),
            role,
            hash: sha256_hex(&secret),
            created_at: self.clock.now(),
            created_by: by.to_owned(),
            revoked_at: None,
        };
        self.store
            .save_shared_record(TOKEN_KIND, name, encode(&t)?)
            .await?;
        let mut index = self.live_tokens.load().by_hash.clone();
        index.insert(t.hash.clone(), Arc::new(t.clone()));
        self.live_tokens.store(Arc::new(LiveTokens::new(index)));
        Ok((t, secret))
    }

    /// Creates a named bearer token; returns it and its secret (shown once).
    pub async fn create_token(
        &self,
        name: &str,
        role: Role,
        by: &Principal,
    ) -> Result<(ApiToken, String), AuthError> {
        valid_name("name", name, false)?;
        let _g = self.admin.lock().await;
        if self.tokens().await?.iter().any(|t| t.name == name) {
            return Err(AuthError::Exists {
                kind: "fleetevents.v1.TokenInfo",
                name: name.to_owned(),
            });
        }
        self.put_token(name, role, &by.label()).await
    }

    /// Revokes a bearer token: refused from the next call on.
    pub async fn revoke_token(&self, name: &str) -> Result<ApiToken, AuthError> {
        let _g = self.admin.lock().await;
        let mut t = self
            .tokens()
            .await?
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| AuthError::NotFound {
                kind: "fleetevents.v1.TokenInfo",
                name: name.to_owned(),
            })?;
        if t.revoked_at.is_none() {
            t.revoked_at = Some(self.clock.now());
            self.store
                .save_shared_record(TOKEN_KIND, name, encode(&t)?)
                .await?;
            let mut index = self.live_tokens.load().by_hash.clone();
            index.remove(&t.hash);
            self.live_tokens.store(Arc::new(LiveTokens::new(index)));
            self.note_change();
        }
        Ok(t)
    }

    /// Every enrolment token.
    pub async fn enrollment_tokens(&self) -> Result<Vec<EnrollmentToken>, AuthError> {
        self.store
            .load_shared_records(ENROLL_KIND)
            .await?
            .iter()
            .map(|j| decode(j))
            .collect()
    }

    /// Creates an enrolment token for `uses` enrolments (0 = 1) within `valid_for`.
    pub async fn create_enrollment_token(
        &self,
        uses: u32,
        valid_for: Duration,
        label: &str,
        by: &Principal,
    ) -> Result<(EnrollmentToken, String), AuthError> {
        valid_name("label", label, true)?;
        if uses > MAX_ENROLL_USES {
            return Err(AuthError::BadArgument {
                field: "uses",
                reason: format!("at most {MAX_ENROLL_USES}"),
            });
        }
        if valid_for > MAX_ENROLL_VALID {
            return Err(AuthError::BadArgument {
                field: "valid_for_secs",
                reason: format!("at most {} (one year)", MAX_ENROLL_VALID.as_secs()),
            });
        }
        let id = random_secret(9)?;
        let secret = format!("{ENROLL_PREFIX}{id}.{}", random_secret(32)?);
        let now = self.clock.now();
        let t = EnrollmentToken {
            id: id.clone(),
            hash: sha256_hex(&secret),
            label: label.to_owned(),
            uses: uses.max(1),
            used: 0,
            created_at: now,
            expires_at: now.plus(if valid_for.is_zero() {
                Duration::from_secs(86_400)
            } else {
                valid_for
            }),
            revoked_at: None,
            created_by: by.label(),
        };
        self.store
            .save_shared_record(ENROLL_KIND, &id, encode(&t)?)
            .await?;
        Ok((t, secret))
    }

    /// Revokes an enrolment token.
    pub async fn revoke_enrollment_token(&self, id: &str) -> Result<EnrollmentToken, AuthError> {
        let _g = self.admin.lock().await;
        let mut t = self
            .enrollment_tokens()
            .await?
            .into_iter()
            .find(|t| t.id == id)
            .ok_or_else(|| AuthError::NotFound {
                kind: "fleetevents.v1.EnrollmentTokenInfo",
                name: id.to_owned(),
            })?;
        if t.revoked_at.is_none() {
            t.revoked_at = Some(self.clock.now());
            self.store
                .save_shared_record(ENROLL_KIND, id, encode(&t)?)
                .await?;
        }
        Ok(t)
    }

    /// Enrols `device_id` with an enrolment token and a CSR: uses the token once and returns
    /// the device certificate (PEM), its expiry and the token's label.
    pub async fn enroll(
        &self,
        secret: &str,
        device_id: &str,
        csr_pem: &str,
        limits: &crate::classify::Limits,
    ) -> Result<(String, Timestamp, Enrollment), AuthError> {
        check_device_id(device_id, limits)?;
        if device_id == self.server_id {
            return Err(AuthError::PermissionDenied(format!(
                "device_id: {device_id:?} is this server's own id"
            )));
        }
        let id = secret
            .strip_prefix(ENROLL_PREFIX)
            .filter(|_| secret.len() <= MAX_SECRET_BYTES)
            .and_then(|rest| rest.split_once('.'))
            .map(|(id, _)| id.to_owned())
            .ok_or_else(|| {
                AuthError::Unauthenticated(format!(
                    "token: not an enrolment token (they start with {ENROLL_PREFIX})"
                ))
            })?;
        let _g = self.admin.lock().await;
        // Compare-and-swap on the shared record: two servers cannot both take the last use.
        for _ in 0..16 {
            let old_json = self.store.load_shared_record(ENROLL_KIND, &id).await?;
            let Some(old_json) = old_json else {
                return Err(AuthError::Unauthenticated(
                    "token: unknown enrolment token".into(),
                ));
            };
            let mut t: EnrollmentToken = decode(&old_json)?;
            if t.hash != sha256_hex(secret) {
                return Err(AuthError::Unauthenticated(
                    "token: unknown enrolment token".into(),
                ));
            }
            let now = self.clock.now();
            if t.revoked_at.is_some() {
                return Err(AuthError::Unauthenticated(
                    "token: the enrolment token was revoked".into(),
                ));
            }
            if now >= t.expires_at {
                return Err(AuthError::Unauthenticated(format!(
                    "token: the enrolment token expired at {}",
                    t.expires_at.to_rfc3339()
                )));
            }
            if t.used >= t.uses {
                return Err(AuthError::Unauthenticated(format!(
                    "token: the enrolment token is used up ({} of {} uses)",
                    t.used, t.uses
                )));
            }
            // An enrolled device is not taken over by whoever holds an enrolment token: its
            // certificate must be revoked (or expired) first.
            if let Some(e) = self.enrollment(device_id).await?
                && now < e.not_after
                && self
                    .revoked
                    .load()
                    .get(device_id)
                    .is_none_or(|r| e.issued_at > *r)
            {
                return Err(AuthError::PermissionDenied(format!(
                    "device_id: {device_id:?} is enrolled already (its certificate is valid \
                     until {}); revoke the device first, or renew with its certificate",
                    e.not_after.to_rfc3339()
                )));
            }
            // The CSR is checked before a use is taken: a bad CSR costs no use.
            let issued_at = self.issue_time(device_id, now);
            let (pem, not_after) = self.authority.issue_device(device_id, csr_pem, issued_at)?;
            t.used += 1;
            if self
                .store
                .swap_shared_record(ENROLL_KIND, &id, &old_json, encode(&t)?)
                .await?
            {
                let e = Enrollment {
                    device_id: device_id.to_owned(),
                    issued_at,
                    not_after,
                    label: t.label,
                    token_id: t.id,
                };
                self.store
                    .save_shared_record(ENROLLED_KIND, device_id, encode(&e)?)
                    .await?;
                return Ok((pem, not_after, e));
            }
        }
        Err(AuthError::Internal(
            "the enrolment token kept changing under this request; try again".into(),
        ))
    }

    /// A device's current enrolment, if it has one.
    pub async fn enrollment(&self, device_id: &str) -> Result<Option<Enrollment>, AuthError> {
        match self
            .store
            .load_shared_record(ENROLLED_KIND, device_id)
            .await?
        {
            Some(json) => Ok(Some(decode(&json)?)),
            None => Ok(None),
        }
    }

    /// A renewed certificate for `device_id`, whose current certificate authenticated the call.
    pub async fn renew(
        &self,
        device_id: &str,
        csr_pem: &str,
    ) -> Result<(String, Timestamp), AuthError> {
        let _g = self.admin.lock().await;
        let issued_at = self.issue_time(device_id, self.clock.now());
        let (pem, not_after) = self.authority.issue_device(device_id, csr_pem, issued_at)?;
        let mut e = self.enrollment(device_id).await?.unwrap_or(Enrollment {
            device_id: device_id.to_owned(),
            issued_at,
            not_after,
            label: String::new(),
            token_id: String::new(),
        });
        e.issued_at = issued_at;
        e.not_after = not_after;
        self.store
            .save_shared_record(ENROLLED_KIND, device_id, encode(&e)?)
            .await?;
        Ok((pem, not_after))
    }

    /// The issue time of a new certificate: now, but always after the device's revocation, so
    /// a certificate issued after a revocation is never revoked by it.
    fn issue_time(&self, device_id: &str, now: Timestamp) -> Timestamp {
        match self.revoked.load().get(device_id) {
            Some(r) if *r >= now => Timestamp(r.0 + 1),
            _ => now,
        }
    }

    /// Revokes every certificate of `device_id` issued until now.
    pub async fn revoke_device(
        &self,
        device_id: &str,
        by: &Principal,
        limits: &crate::classify::Limits,
    ) -> Result<DeviceRevocation, AuthError> {
        check_device_id(device_id, limits)?;
        let _g = self.admin.lock().await;
        let r = DeviceRevocation {
            device_id: device_id.to_owned(),
            revoked_at: self.clock.now(),
            revoked_by: by.label(),
        };
        self.store
            .save_shared_record(REVOKE_KIND, device_id, encode(&r)?)
            .await?;
        let mut revoked = HashMap::clone(&self.revoked.load());
        revoked.insert(r.device_id.clone(), r.revoked_at);
        self.revoked.store(Arc::new(revoked));
        self.note_change();
        Ok(r)
    }

    /// The principal of a bearer token (the text after `Bearer `).
    pub fn authenticate_token(&self, secret: &str) -> Result<Principal, AuthError> {
        if secret.is_empty() {
            return Err(AuthError::Unauthenticated(
                "authorization: the bearer token is empty".into(),
            ));
        }
        if secret.len() > MAX_SECRET_BYTES || !secret.starts_with(TOKEN_PREFIX) {
            return Err(AuthError::Unauthenticated(format!(
                "authorization: not a fleet-events token (they start with {TOKEN_PREFIX})"
            )));
        }
        match self.live_tokens.load().by_hash.get(&sha256_hex(secret)) {
            Some(t) => Ok(Principal::Token {
                name: t.name.clone(),
                role: t.role,
            }),
            None => Err(AuthError::Unauthenticated(
                "authorization: unknown or revoked token".into(),
            )),
        }
    }

    /// The principal of a verified device certificate, checked now: within its validity on
    /// the server's clock and not revoked.
    pub fn authenticate_device(&self, cert: &DeviceCertificate) -> Result<Principal, AuthError> {
        let now = self.clock.now();
        if now < cert.not_before {
            return Err(AuthError::Unauthenticated(format!(
                "the device certificate of {:?} is not valid before {}",
                cert.device_id,
                cert.not_before.to_rfc3339()
            )));
        }
        if now >= cert.not_after {
            return Err(AuthError::Unauthenticated(format!(
                "the device certificate of {:?} expired at {}",
                cert.device_id,
                cert.not_after.to_rfc3339()
            )));
        }
        if let Some(at) = self.revoked.load().get(&cert.device_id)
            && cert.issued_at <= *at
        {
            return Err(AuthError::Unauthenticated(format!(
                "the device certificate of {:?} was revoked at {}",
                cert.device_id,
                at.to_rfc3339()
            )));
        }
        Ok(Principal::Device {
            device_id: cert.device_id.clone(),
            issued_at: cert.issued_at,
            not_after: cert.not_after,
        })
    }

    /// Whether a caller authenticated earlier still holds: its token not revoked, its device
    /// certificate not expired nor revoked. Long-lived calls (`Stream`, `Subscribe`) check it
    /// as they go, so a revocation also ends the calls already open.
    pub fn still_valid(&self, principal: &Principal) -> Result<(), AuthError> {
        match principal {
            Principal::Token { name, .. } => {
                if self.live_tokens.load().names.contains(name) {
                    Ok(())
                } else {
                    Err(AuthError::Unauthenticated(format!(
                        "the token {name:?} was revoked"
                    )))
                }
            }
            Principal::Device {
                device_id,
                issued_at,
                not_after,
            } => {
                let now = self.clock.now();
                if now >= *not_after {
                    return Err(AuthError::Unauthenticated(format!(
                        "the device certificate of {device_id:?} expired at {}",
                        not_after.to_rfc3339()
                    )));
                }
                match self.revoked.load().get(device_id) {
                    Some(at) if issued_at <= at => Err(AuthError::Unauthenticated(format!(
                        "the device certificate of {device_id:?} was revoked at {}",
                        at.to_rfc3339()
                    ))),
                    _ => Ok(()),
                }
            }
            Principal::Anonymous => Ok(()),
        }
    }
}

/// Checks `principal` against the callers a table entry allows.
pub fn authorise(method: &str, callers: &Callers, principal: &Principal) -> Result<(), AuthError> {
    match callers {
        Callers::Open => Ok(()),
        Callers::Nobody(why) => Err(AuthError::PermissionDenied(format!("{method}: {why}"))),
        Callers::Allowed { roles, device } => match principal {
            Principal::Anonymous => Err(AuthError::Unauthenticated(format!(
                "{method} needs a credential: `authorization: Bearer <token>` or a device \
                 certificate (mutual TLS)"
            ))),
            Principal::Token { name, role } if !roles.contains(role) => {
                Err(AuthError::PermissionDenied(format!(
                    "{method} is not allowed to token {name:?} (role {}); allowed: {}",
                    role.as_str(),
                    policy::describe(callers)
                )))
            }
            Principal::Device { device_id, .. } if !device => {
                Err(AuthError::PermissionDenied(format!(
                    "{method} is not allowed to a device certificate (device {device_id:?}); \
                     allowed: {}",
                    policy::describe(callers)
                )))
            }
            _ => Ok(()),
        },
    }
}

/// Checks that a device-scoped request names the caller's own device. An empty `device_id`
/// means "mine" and is filled in; tokens may name any device.
pub fn speak_for(
    principal: &Principal,
    field: &str,
    device_id: &mut String,
) -> Result<(), AuthError> {
    if let Some(own) = principal.own_device() {
        if device_id.is_empty() {
            own.clone_into(device_id);
        } else if device_id != own {
            return Err(AuthError::OtherDevice(format!(
                "{field}: the certificate of device {own:?} may not speak for device {}",
                crate::fields::shown(device_id)
            )));
        }
    }
    Ok(())
}

fn check_device_id(device_id: &str, limits: &crate::classify::Limits) -> Result<(), AuthError> {
    if device_id.is_empty() || device_id.len() > limits.max_device_id_bytes {
        return Err(AuthError::BadArgument {
            field: "device_id",
            reason: format!("must be 1-{} bytes", limits.max_device_id_bytes),
        });
    }
    if device_id.chars().any(char::is_control) {
        return Err(AuthError::BadArgument {
            field: "device_id",
            reason: "must not contain control characters".into(),
        });
    }
    Ok(())
}

fn encode<T: Serialize>(v: &T) -> Result<String, AuthError> {
    serde_json::to_string(v).map_err(|e| AuthError::Internal(e.to_string()))
}

fn decode<T: for<'de> Deserialize<'de>>(json: &str) -> Result<T, AuthError> {
    serde_json::from_str(json).map_err(|e| AuthError::Internal(format!("saved credential: {e}")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_hashes_are_lowercase_hex_sha256() {
        // FIPS 180-2's example: stored hashes must not change with the encoding's code.
        assert_eq!(
            super::sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
