//! The client port's transport and its one authorisation layer.
//!
//! [`incoming`] accepts TCP connections (at most `max_connections` open at once), completes
//! the TLS handshake within a deadline, and hands tonic a [`ClientConn`] whose connect info
//! carries the client certificate, if any. The handshake accepts any client certificate whose
//! key the client proves it holds; whether our CA issued it, whether it is valid now and not
//! revoked is decided per call by [`AuthorizeLayer`], so each refusal is a precise gRPC status
//! (not a failed handshake), and a revocation reaches long-lived connections at their next call.
//!
//! [`AuthorizeLayer`] runs before any handler: it looks the method up in
//! [`crate::auth::policy`], authenticates the bearer token or device certificate, and either
//! answers UNAUTHENTICATED / PERMISSION_DENIED or passes the call on with its [`Principal`] in
//! the request's extensions (see [`principal`]).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::Either;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::body::Body;
use tonic::transport::server::Connected;

use crate::auth::pki::DeviceCertificate;
use crate::auth::policy::{self, Callers};
use crate::auth::{AccessControl, AuthError, Principal, authorise};

/// The client's certificate as presented on one connection, verified once (lazily) for the
/// life of the connection; its dates and revocation are checked at every call.
#[derive(Debug)]
pub struct PeerCertificate {
    end_entity: CertificateDer<'static>,
    intermediates: Vec<CertificateDer<'static>>,
    verified: OnceLock<Result<DeviceCertificate, AuthError>>,
}

/// What the authorisation layer knows of a connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// A number unique to this connection for the life of the process.
    pub connection: u64,
    /// The client's address.
    pub remote: Option<SocketAddr>,
    /// The client certificate, when the client sent one.
    pub certificate: Option<Arc<PeerCertificate>>,
    /// Set by [`AuthorizeLayer`] at the connection's first request; until then the
    /// connection is closed after `first_request_timeout`.
    pub requested: Arc<AtomicBool>,
}

impl PeerInfo {
    fn new(remote: SocketAddr, certificate: Option<Arc<PeerCertificate>>) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        PeerInfo {
            connection: NEXT.fetch_add(1, Ordering::Relaxed),
            remote: Some(remote),
            certificate,
            requested: Arc::new(AtomicBool::new(false)),
        }
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// One accepted client connection: plaintext or TLS, holding its slot of `max_connections`.
/// It reads as closed once `first_request` passes without a request.
pub struct ClientConn {
    io: Io,
    info: PeerInfo,
    first_request: Option<Pin<Box<tokio::time::Sleep>>>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl ClientConn {
    fn new(
        io: Io,
        info: PeerInfo,
        first_request_timeout: Duration,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> Self {
        ClientConn {
            io,
            info,
            first_request: Some(Box::pin(tokio::time::sleep(first_request_timeout))),
            _slot: slot,
        }
    }
}

impl Connected for ClientConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for ClientConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(deadline) = this.first_request.as_mut() {
            if this.info.requested.load(Ordering::Relaxed) {
                this.first_request = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                tracing::debug!(remote = ?this.info.remote, "no request in time: connection closed");
                return Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()));
            }
        }
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Asks every client for a certificate, accepts any whose key the client proves it holds
/// (the handshake signature is checked by the CA's verifier), and leaves the rest to the
/// per-call check.
#[derive(Debug)]
struct DeferredClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for DeferredClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The rustls configuration of the client port: the server's certificate chain and key (PEM),
/// HTTP/2 by ALPN, client certificates requested and checked per call.
pub fn tls_config(
    cert_pem: &str,
    key_pem: &str,
    client_chain: Arc<dyn ClientCertVerifier>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls_cert: {e}"))?;
    if certs.is_empty() {
        return Err("tls_cert holds no PEM certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("tls_key holds no usable PEM private key: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_client_cert_verifier(Arc::new(DeferredClientVerifier {
        inner: client_chain,
    }))
    .with_single_cert(certs, key)
    .map_err(|e| format!("tls_cert/tls_key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The bounds of the accept loop.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Most connections open at once; the rest wait in the kernel's backlog.
    pub max_connections: usize,
    /// Time a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// Time a connection may stay open before its first request.
    pub first_request_timeout: Duration,
}

/// Accepts client connections on `listener` until `stop`: at most `max_connections` open at
/// once (the rest wait in the kernel's backlog), each TLS handshake (when `tls` is set) done
/// within `handshake_timeout` on a task of its own. When accepting fails (out of file
/// descriptors), the loop waits [`ACCEPT_RETRY`] and tries again, logging at most once per
/// [`ACCEPT_ERROR_LOG_EVERY`].
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: ConnectionLimits,
    stop: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<ClientConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let handshake_timeout = limits.handshake_timeout;
    let mut failures: u64 = 0;
    let mut last_logged: Option<std::time::Instant> = None;
    let acceptor = tls.map(TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let slot = tokio::select! {
                _ = stop.cancelled() => return,
                s = slots.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => return },
            };
            let (tcp, remote) = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: the pending connection stays
                        // in the backlog; wait a little (no busy loop), then try again.
                        failures += 1;
                        if last_logged.is_none_or(|t| t.elapsed() >= ACCEPT_ERROR_LOG_EVERY) {
                            tracing::warn!(error = %e, failures, "accepting a connection failed; retrying");
                            last_logged = Some(std::time::Instant::now());
                        }
                        tokio::time::sleep(ACCEPT_RETRY).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let tx = tx.clone();
            match &acceptor {
                None => {
                    let conn = ClientConn::new(
                        Io::Plain(tcp),
                        PeerInfo::new(remote, None),
                        limits.first_request_timeout,
                        slot,
                    );
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let tls =
                            match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp))
                                .await
                            {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%remote, "TLS handshake timed out");
                                    return;
                                }
                            };
                        let certificate = tls.get_ref().1.peer_certificates().and_then(|chain| {
                            let (first, rest) = chain.split_first()?;
                            Some(Arc::new(PeerCertificate {
                                end_entity: first.clone().into_owned(),
                                intermediates: rest
                                    .iter()
                                    .map(|c| c.clone().into_owned())
                                    .collect(),
                                verified: OnceLock::new(),
                            }))
                        });
                        let conn = ClientConn::new(
                            Io::Tls(Box::new(tls)),
                            PeerInfo::new(remote, certificate),
                            limits.first_request_timeout,
                            slot,
                        );
                        let _ = tx.send(Ok(conn)).await;
                    });
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// How long the accept loop waits after a failed accept (e.g. EMFILE) before trying again.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// At most one log line per this period about failing accepts.
pub const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// The caller of the current request, put there by [`AuthorizeLayer`].
pub fn principal<T>(request: &tonic::Request<T>) -> Principal {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .unwrap_or(Principal::Anonymous)
}

/// Checks that a device-scoped field names the caller's own device (filling in an empty one).
pub fn speak_for(principal: &Principal, field: &str, device_id: &mut String) -> Result<(), Status> {
    crate::auth::speak_for(principal, field, device_id).map_err(Status::from)
}

/// The tower layer that authenticates and authorises every call of the client port.
#[derive(Clone)]
pub struct AuthorizeLayer {
    access: Arc<AccessControl>,
}

impl AuthorizeLayer {
    /// Checks calls against `access`.
    pub fn new(access: Arc<AccessControl>) -> Self {
        AuthorizeLayer { access }
    }
}

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            access: self.access.clone(),
        }
    }
}

/// See [`AuthorizeLayer`].
#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    access: Arc<AccessControl>,
}

/// Headers people put tokens in by mistake.
const WRONG_HEADERS: &[&str] = &["token", "x-token", "api-key", "x-api-key", "bearer", "auth"];

impl<S> Authorize<S> {
    fn check(&self, req: &http::Request<Body>) -> Result<Principal, AuthError> {
        let path = req.uri().path();
        let callers = policy::callers(path);
        match callers {
            Callers::Open => return Ok(Principal::Anonymous),
            Callers::Nobody(_) => {
                authorise(
                    path.trim_start_matches('/'),
                    &callers,
                    &Principal::Anonymous,
                )?;
            }
            Callers::Allowed { .. } => {}
        }
        let headers = req.headers();
        let mut auth = headers.get_all(http::header::AUTHORIZATION).iter();
        let principal = match (auth.next(), auth.next()) {
            (Some(_), Some(_)) => {
                return Err(AuthError::Unauthenticated(
                    "authorization: sent more than once".into(),
                ));
            }
            (Some(v), None) => {
                let v = v.to_str().map_err(|_| {
                    AuthError::Unauthenticated("authorization: not visible ASCII".into())
                })?;
                let token = match v.split_once(' ') {
                    Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
                    _ => {
                        return Err(AuthError::Unauthenticated(
                            "authorization: expected `Bearer <token>`".into(),
                        ));
                    }
                };
                self.access.authenticate_token(token)?
            }
            (None, _) => match req
                .extensions()
                .get::<PeerInfo>()
                .and_then(|p| p.certificate.as_ref())
            {
                Some(cert) => {
                    let verified = cert.verified.get_or_init(|| {
                        self.access
                            .authority()
                            .verify_device(&cert.end_entity, &cert.intermediates)
                    });
                    match verified {
                        Ok(device) => self.access.authenticate_device(device)?,
                        Err(e) => return Err(AuthError::Unauthenticated(e.to_string())),
                    }
                }
                None => {
                    if let Some(h) = WRONG_HEADERS.iter().find(|h| headers.contains_key(**h)) {
                        return Err(AuthError::Unauthenticated(format!(
                            "no credential: a token goes in the `authorization` header as \
                             `Bearer <token>`, not in {h:?}"
                        )));
                    }
                    Principal::Anonymous
                }
            },
        };
        let method = path.trim_start_matches('/');
        authorise(method, &callers, &principal)?;
        Ok(principal)
    }
}

impl<S> tower::Service<http::Request<Body>> for Authorize<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<std::future::Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        if let Some(peer) = req.extensions().get::<PeerInfo>() {
            peer.requested.store(true, Ordering::Relaxed);
        }
        match self.check(&req) {
            Ok(principal) => {
                req.extensions_mut().insert(principal);
                Either::Right(self.inner.call(req))
            }
            Err(e) => {
                tracing::debug!(path = req.uri().path(), error = %e, "call refused");
                Either::Left(std::future::ready(Ok(Status::from(e).into_http())))
            }
        }
    }
}
