//! Connecting to a fleet-events server as a client: TLS pinned to the server's CA, and a
//! credential (a bearer token, or a device certificate for mutual TLS). The CLI, the tests and
//! the load benchmarks connect through here; any generated client takes the [`AuthChannel`].

use std::path::Path;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How to reach and authenticate to a server.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// The CA certificate (PEM) the server's certificate must chain to (`<data-dir>/ca.pem`);
    /// required for an `https://` address.
    pub ca_pem: Option<String>,
    /// A device certificate and its key (PEM), for mutual TLS.
    pub identity: Option<(String, String)>,
    /// A bearer token, sent as `authorization: Bearer <token>` on every call.
    pub token: Option<String>,
    /// The name the server's certificate must carry, when it is not the address's host.
    pub domain: Option<String>,
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address or options are unusable.
    #[error("{0}")]
    Config(String),
    /// Connecting failed.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The address.
        url: String,
        /// The cause.
        source: tonic::transport::Error,
    },
}

impl ClientOptions {
    /// Reads the CA and the token from a server's data directory, as the CLI does on the
    /// server's own machine (`ca.pem`, `admin.token`); missing files are left unset.
    pub fn from_data_dir(dir: &Path) -> Self {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .ok()
                .map(|s| s.trim().to_owned())
        };
        ClientOptions {
            ca_pem: read(crate::config::CA_CERT_FILE).map(|s| s + "\n"),
            identity: None,
            token: read(crate::config::ADMIN_TOKEN_FILE),
            domain: None,
        }
    }
}

/// A channel that adds the bearer token (if any) to every call.
#[derive(Clone, Debug)]
pub struct AuthChannel {
    channel: Channel,
    authorization: Option<http::HeaderValue>,
}

impl AuthChannel {
    /// The underlying channel (no token added).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }
}

/// The URL of a server address: `HOST:PORT` (as grpcurl and the other gRPC tools take it)
/// means TLS, `https://HOST:PORT`; an address with a scheme (`https://`, or `http://` for a
/// plaintext server) is kept as it is.
pub fn server_url(address: &str) -> String {
    if address.contains("://") {
        address.to_owned()
    } else {
        format!("https://{address}")
    }
}

/// The endpoint for the server `address` (see [`server_url`]) with `options`' TLS settings.
pub fn endpoint(address: &str, options: &ClientOptions) -> Result<Endpoint, ClientError> {
    let url = &server_url(address);
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| ClientError::Config(format!("bad server address {url:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if url.starts_with("https://") {
        let ca = options.ca_pem.as_ref().ok_or_else(|| {
            ClientError::Config(
                "an https:// server needs its CA certificate (--ca, e.g. <data-dir>/ca.pem)".into(),
            )
        })?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = &options.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        if let Some(d) = &options.domain {
            tls = tls.domain_name(d.clone());
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| ClientError::Config(format!("TLS settings: {e}")))?;
    }
    Ok(endpoint)
}

/// Wraps a connected channel with the token of `options`.
pub fn authenticate(channel: Channel, options: &ClientOptions) -> Result<AuthChannel, ClientError> {
    let authorization = match &options.token {
        Some(t) => Some(
            http::HeaderValue::from_str(&format!("Bearer {}", t.trim()))
                .map_err(|_| ClientError::Config("the token is not visible ASCII".into()))?,
        ),
        None => None,
    };
    Ok(AuthChannel {
        channel,
        authorization,
    })
}

/// Connects to `address`: `HOST:PORT` or `https://HOST:PORT` (TLS), or `http://HOST:PORT` for
/// a plaintext server.
pub async fn connect(address: &str, options: &ClientOptions) -> Result<AuthChannel, ClientError> {
    let url = &server_url(address);
    let channel =
        endpoint(url, options)?
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                url: url.to_owned(),
                source,
            })?;
    authenticate(channel, options)
}

impl tower::Service<http::Request<Body>> for AuthChannel {
    type Response = <Channel as tower::Service<http::Request<Body>>>::Response;
    type Error = <Channel as tower::Service<http::Request<Body>>>::Error;
    type Future = <Channel as tower::Service<http::Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.channel, cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        if let Some(v) = &self.authorization
            && !req.headers().contains_key(http::header::AUTHORIZATION)
        {
            req.headers_mut()
                .insert(http::header::AUTHORIZATION, v.clone());
        }
        self.channel.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::server_url;

    /// `HOST:PORT` means TLS, as in grpcurl; a scheme is kept.
    #[test]
    fn addresses_without_a_scheme_are_tls() {
        assert_eq!(server_url("127.0.0.1:50051"), "https://127.0.0.1:50051");
        assert_eq!(server_url("fleet.example:443"), "https://fleet.example:443");
        assert_eq!(server_url("[::1]:50051"), "https://[::1]:50051");
        assert_eq!(server_url("http://10.0.0.1:50051"), "http://10.0.0.1:50051");
        assert_eq!(
            server_url("https://10.0.0.1:50051"),
            "https://10.0.0.1:50051"
        );
    }
}
