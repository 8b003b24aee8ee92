//! Delivery through a webhook channel: one HTTP/1.1 POST of the event as JSON, over TLS for
//! `https://` (the system's trusted roots, or the channel's own CA file), with the channel's
//! secret header, all within a deadline. A 2xx answer is a delivery; anything else is a
//! failure with its status, retried by the caller.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};

use super::channels::WebhookChannel;
use crate::classify::ClassifiedEvent;

/// How much of an answer's body is read (and kept for the error message).
pub const ANSWER_BYTES: usize = 1024;

/// Why a webhook call failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    /// The URL cannot be called (checked when saved; kept for a changed saved record).
    #[error("webhook URL: {0}")]
    Url(String),
    /// No connection to the host.
    #[error("cannot connect to {host}: {reason}")]
    Connect {
        /// `host:port`.
        host: String,
        /// Why.
        reason: String,
    },
    /// The TLS handshake failed (an untrusted certificate, a name mismatch, no TLS).
    #[error("TLS with {host}: {reason}")]
    Tls {
        /// The host.
        host: String,
        /// Why.
        reason: String,
    },
    /// The HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(String),
    /// It answered with a status other than 2xx.
    #[error("answered HTTP {status}: {body}")]
    Status {
        /// The status code.
        status: u16,
        /// The start of its body.
        body: String,
    },
    /// No answer within the deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// The JSON a webhook receives: the event, and the rendered subject and body.
pub fn payload(
    event: &ClassifiedEvent,
    server_id: &str,
    subject: &str,
    body: &str,
) -> serde_json::Value {
    let t = &event.event_type;
    serde_json::json!({
        "event_id": event.event_id,
        "device_id": event.device_id,
        "event_type": t.name,
        "event_type_id": t.id,
        "display_name": t.display_name,
        "severity": t.severity.as_str(),
        "occurred_at": event.occurred_at.to_rfc3339(),
        "received_at": event.received_at.to_rfc3339(),
        "application": event.application,
        "params": event.params,
        "origin_server": event.relay.as_ref().map(|r| r.origin_server.clone()).unwrap_or_default(),
        "server": server_id,
        "subject": subject,
        "body": body,
    })
}

/// The TLS roots a webhook channel trusts: the PEM certificates of its `ca_file`, else the
/// system's trusted roots.
pub fn roots(ca_pem: Option<&str>) -> Result<rustls::RootCertStore, WebhookError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            use rustls::pki_types::pem::PemObject;
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| WebhookError::Url(format!("ca_file: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| WebhookError::Url(format!("ca_file: {e}")))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    Ok(roots)
}

/// POSTs `json` to the channel's URL within `deadline`; returns the 2xx status.
pub async fn post(
    hook: &WebhookChannel,
    roots: Arc<rustls::RootCertStore>,
    json: &serde_json::Value,
    deadline: Duration,
) -> Result<u16, WebhookError> {
    tokio::time::timeout(deadline, exchange(hook, roots, json))
        .await
        .unwrap_or(Err(WebhookError::Timeout(deadline)))
}

async fn exchange(
    hook: &WebhookChannel,
    roots: Arc<rustls::RootCertStore>,
    json: &serde_json::Value,
) -> Result<u16, WebhookError> {
    let uri: http::Uri = hook
        .url
        .parse()
        .map_err(|e| WebhookError::Url(format!("{e}")))?;
    let https = uri.scheme_str() == Some("https");
    let host = uri
        .host()
        .ok_or_else(|| WebhookError::Url("no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let target = format!("{host}:{port}");
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| WebhookError::Connect {
            host: target.clone(),
            reason: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or(target.clone());
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let mut request = Request::post(path)
        .header(header::HOST, authority)
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::USER_AGENT,
            concat!("fleet-events/", env!("CARGO_PKG_VERSION")),
        );
    if !hook.secret_header.is_empty() {
        request = request.header(hook.secret_header.as_str(), hook.secret.as_str());
    }
    let request = request
        .body(Full::new(Bytes::from(json.to_string())))
        .map_err(|e| WebhookError::Http(e.to_string()))?;
    if https {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| WebhookError::Tls {
            host: host.clone(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = ServerName::try_from(host.clone()).map_err(|e| WebhookError::Tls {
            host: host.clone(),
            reason: e.to_string(),
        })?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| WebhookError::Tls {
                host: host.clone(),
                reason: e.to_string(),
            })?;
        send(TokioIo::new(tls), request).await
    } else {
        send(TokioIo::new(tcp), request).await
    }
}

async fn send<I>(io: I, request: Request<Full<Bytes>>) -> Result<u16, WebhookError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| WebhookError::Http(e.to_string()))?;
    let connection = tokio::spawn(connection);
    let answer = sender
        .send_request(request)
        .await
        .map_err(|e| WebhookError::Http(e.to_string()));
    let result = match answer {
        Ok(answer) => {
            let status = answer.status().as_u16();
            // Read at most ANSWER_BYTES of the answer, for the error message.
            let mut body = answer.into_body();
            let mut kept = Vec::new();
            while kept.len() < ANSWER_BYTES {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            kept.extend_from_slice(data);
                        }
                    }
                    _ => break,
                }
            }
            kept.truncate(ANSWER_BYTES);
            if (200..300).contains(&status) {
                Ok(status)
            } else {
                Err(WebhookError::Status {
                    status,
                    body: String::from_utf8_lossy(&kept).into_owned(),
                })
            }
        }
        Err(e) => Err(e),
    };
    connection.abort();
    result
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use tokio::sync::mpsc;

    use super::*;

    /// What the test receiver saw of one call.
    #[derive(Debug)]
    struct Seen {
        path: String,
        headers: http::HeaderMap,
        body: serde_json::Value,
    }

    /// A real HTTP/1.1 receiver on 127.0.0.1:0 (TLS with `tls`), answering `status` with
    /// `answer` (or never, with `hang`), reporting each call on the channel.
    async fn receiver(
        status: u16,
        answer: &'static str,
        hang: bool,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> (u16, mpsc::UnboundedReceiver<Seen>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let bytes = body.collect().await.unwrap().to_bytes();
                            let _ = tx.send(Seen {
                                path: parts.uri.to_string(),
                                headers: parts.headers,
                                body: serde_json::from_slice(&bytes).unwrap(),
                            });
                            if hang {
                                std::future::pending::<()>().await;
                            }
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from_static(answer.as_bytes())))
                                    .unwrap(),
                            )
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(config) => {
                            let Ok(tls) = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await
                            else {
                                return;
                            };
                            let _ = http.serve_connection(TokioIo::new(tls), service).await;
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                        }
                    }
                });
            }
        });
        (port, rx)
    }

    fn event() -> ClassifiedEvent {
        crate::notify::testing::event("e-9", "laptop-9", &[("code", "503")])
    }

    fn hook(url: String, secret: &str) -> WebhookChannel {
        WebhookChannel {
            url,
            secret_header: if secret.is_empty() {
                String::new()
            } else {
                "X-Fleet-Secret".into()
            },
            secret: secret.into(),
            ca_file: None,
        }
    }

    fn no_roots() -> Arc<rustls::RootCertStore> {
        Arc::new(rustls::RootCertStore::empty())
    }

    #[tokio::test]
    async fn posts_the_event_as_json_and_reports_the_status() {
        let (port, mut seen) = receiver(204, "", false, None).await;
        let json = payload(&event(), "primary-1", "the subject", "the body");
        let status = post(
            &hook(format!("http://127.0.0.1:{port}/in?x=1"), ""),
            no_roots(),
            &json,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(status, 204);
        let s = seen.recv().await.unwrap();
        assert_eq!(s.path, "/in?x=1");
        assert_eq!(s.headers["content-type"], "application/json");
        assert!(!s.headers.contains_key("x-fleet-secret"));
        assert_eq!(s.body["event_id"], "e-9");
        assert_eq!(s.body["device_id"], "laptop-9");
        assert_eq!(s.body["event_type"], "KLSRV_EVENT_HOSTS_CONFLICT");
        assert_eq!(s.body["event_type_id"], 4102);
        assert_eq!(s.body["severity"], "WARNING");
        assert_eq!(s.body["params"]["code"], "503");
        assert_eq!(s.body["server"], "primary-1");
        assert_eq!(s.body["subject"], "the subject");
    }

    #[tokio::test]
    async fn a_refusal_a_dead_host_and_a_silent_one_are_each_their_own_error() {
        let (port, _seen) = receiver(500, "boom", false, None).await;
        let json = payload(&event(), "s", "", "");
        let url = format!("http://127.0.0.1:{port}/");
        assert_eq!(
            post(&hook(url, ""), no_roots(), &json, Duration::from_secs(10)).await,
            Err(WebhookError::Status {
                status: 500,
                body: "boom".into()
            })
        );
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        assert!(matches!(
            post(
                &hook(format!("http://127.0.0.1:{closed}/"), ""),
                no_roots(),
                &json,
                Duration::from_secs(10)
            )
            .await,
            Err(WebhookError::Connect { .. })
        ));
        let (port, _seen) = receiver(200, "", true, None).await;
        assert_eq!(
            post(
                &hook(format!("http://127.0.0.1:{port}/"), ""),
                no_roots(),
                &json,
                Duration::from_millis(300)
            )
            .await,
            Err(WebhookError::Timeout(Duration::from_millis(300)))
        );
    }

    /// Over https the secret header is sent, the receiver's certificate must chain to the
    /// trusted roots, and a receiver the roots do not vouch for gets nothing.
    #[tokio::test]
    async fn https_sends_the_secret_only_to_a_trusted_receiver() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert_pem = cert.cert.pem();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into()),
        )
        .unwrap();
        let (port, mut seen) = receiver(200, "ok", false, Some(Arc::new(server))).await;
        let json = payload(&event(), "s", "", "");
        let trusted = Arc::new(roots(Some(&cert_pem)).unwrap());
        let url = format!("https://localhost:{port}/hook");
        assert_eq!(
            post(
                &hook(url.clone(), "s3cret"),
                trusted,
                &json,
                Duration::from_secs(10)
            )
            .await,
            Ok(200)
        );
        let s = seen.recv().await.unwrap();
        assert_eq!(s.headers["x-fleet-secret"], "s3cret");
        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let untrusted = Arc::new(roots(Some(&other.cert.pem())).unwrap());
        assert!(matches!(
            post(
                &hook(url, "s3cret"),
                untrusted,
                &json,
                Duration::from_secs(10)
            )
            .await,
            Err(WebhookError::Tls { .. })
        ));
        assert!(
            seen.try_recv().is_err(),
            "the untrusted call reached nobody"
        );
    }
}
