//! The metrics port: plain HTTP/1.1, `GET /metrics` and nothing else. Bounded like the
//! client port: at most [`MAX_CONNECTIONS`] connections (more wait in the kernel's backlog),
//! headers within [`HEADER_TIMEOUT`], a connection closed after [`CONNECTION_LIFETIME`].
//! With a token configured every scrape must carry it (`Authorization: Bearer ...`, which
//! Prometheus sends from `authorization.credentials_file`); a server listening beyond the
//! loopback interface must have one (see `config::MetricsConfig`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{CONTENT_TYPE, MetricSources, render};

/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection is kept, however busy (Prometheus opens another).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// Serves the metrics on `listener` until `shutdown`. `token`, when set, is the bearer
/// token every scrape must present.
pub async fn serve(
    listener: TcpListener,
    sources: Arc<MetricSources>,
    token: Option<String>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let expected = token.map(|t| Arc::new(digest(t.as_bytes())));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p,
            _ = shutdown.cancelled() => return,
        };
        // The semaphore is never closed.
        let Ok(permit) = permit else { return };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "metrics port: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let (sources, expected, shutdown) = (sources.clone(), expected.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let (sources, expected) = (sources.clone(), expected.clone());
                async move { Ok::<_, Infallible>(answer(req, &sources, expected.as_deref()).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_LIFETIME, connection) => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

/// The answer to one request.
async fn answer(
    req: Request<Incoming>,
    sources: &MetricSources,
    expected: Option<&[u8; 32]>,
) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: the metrics are at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if let Some(expected) = expected
        && !authorized(&req, expected)
    {
        let mut r = plain(
            StatusCode::UNAUTHORIZED,
            "a bearer token is required (metrics.token_file)\n",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"fleet-events metrics\""),
        );
        return r;
    }
    let body = render(sources).await;
    Response::builder()
        .header(header::CONTENT_TYPE, CONTENT_TYPE)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

/// Whether `req` carries the expected bearer token. The presented token is hashed before it
/// is compared, so the comparison's time says nothing of the token.
fn authorized(req: &Request<Incoming>, expected: &[u8; 32]) -> bool {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|presented| digest(presented.trim().as_bytes()) == *expected)
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(text.as_bytes())))
        .unwrap_or_default()
}
