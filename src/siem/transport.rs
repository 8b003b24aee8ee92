//! The connections messages leave on: TCP and TLS with octet counting (RFC 6587, RFC 5425) and
//! UDP datagrams (RFC 5426). A send over TCP or TLS counts as done only once the receiver's TCP
//! stack acknowledged every byte (the socket's unacknowledged output queue is empty): syslog
//! has no acknowledgement of its own, and a write that only reached our kernel proves nothing.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};

use super::destination::{Destination, Transport};
use super::format;

/// Why a connection or a send failed (the text is what `last_error` and `TestDestination`
/// show).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The host did not resolve or the connection was refused or timed out.
    #[error("connect to {target}: {reason}")]
    Connect {
        /// host:port.
        target: String,
        /// What happened.
        reason: String,
    },
    /// The TLS handshake failed (the receiver does not speak TLS, or its certificate is not
    /// trusted or not for this name).
    #[error("TLS with {target}: {reason}")]
    Tls {
        /// host:port.
        target: String,
        /// What happened.
        reason: String,
    },
    /// Writing failed or the receiver did not acknowledge in time.
    #[error("send to {target}: {reason}")]
    Write {
        /// host:port.
        target: String,
        /// What happened.
        reason: String,
    },
}

/// An open connection to one destination.
pub enum Connection {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// A connected UDP socket.
    Udp(UdpSocket),
}

fn target(d: &Destination) -> String {
    if d.host.contains(':') {
        format!("[{}]:{}", d.host, d.port)
    } else {
        format!("{}:{}", d.host, d.port)
    }
}

/// The TLS client configuration of a destination: its CA file's roots, else the system's.
/// The CA file is read off the runtime.
async fn tls_config(d: &Destination) -> Result<rustls::ClientConfig, SendError> {
    let tls_error = |reason: String| SendError::Tls {
        target: target(d),
        reason,
    };
    let pem = if d.ca_file.is_empty() {
        None
    } else {
        let path = std::path::PathBuf::from(&d.ca_file);
        let read =
            tokio::task::spawn_blocking(move || crate::notify::channels::read_ca_file(&path))
                .await
                .map_err(|e| tls_error(e.to_string()))?;
        Some(read.map_err(|e| tls_error(format!("ca_file {e}")))?)
    };
    let roots =
        crate::notify::webhook::roots(pem.as_deref()).map_err(|e| tls_error(e.to_string()))?;
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(e.to_string()))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// Opens a connection to `d` within `timeout`.
pub async fn connect(d: &Destination, timeout: Duration) -> Result<Connection, SendError> {
    let connect_error = |reason: String| SendError::Connect {
        target: target(d),
        reason,
    };
    let addr = (d.host.as_str(), d.port);
    let run = async {
        match d.transport {
            Transport::Udp => {
                let peer = tokio::net::lookup_host(addr)
                    .await
                    .map_err(|e| connect_error(e.to_string()))?
                    .next()
                    .ok_or_else(|| connect_error("no address".into()))?;
                let local = if peer.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let socket = UdpSocket::bind(local)
                    .await
                    .map_err(|e| connect_error(e.to_string()))?;
                socket
                    .connect(peer)
                    .await
                    .map_err(|e| connect_error(e.to_string()))?;
                Ok(Connection::Udp(socket))
            }
            Transport::Tcp => {
                let tcp = TcpStream::connect(addr)
                    .await
                    .map_err(|e| connect_error(e.to_string()))?;
                let _ = tcp.set_nodelay(true);
                Ok(Connection::Tcp(tcp))
            }
            Transport::Tls => {
                let config = tls_config(d).await?;
                let name = rustls::pki_types::ServerName::try_from(d.tls_name().to_owned())
                    .map_err(|e| SendError::Tls {
                        target: target(d),
                        reason: e.to_string(),
                    })?;
                let tcp = TcpStream::connect(addr)
                    .await
                    .map_err(|e| connect_error(e.to_string()))?;
                let _ = tcp.set_nodelay(true);
                // The handshake has a deadline of its own: a receiver that does not speak TLS
                // never answers the hello, and that is a TLS failure, not a connect one.
                let handshake =
                    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp);
                let tls = match tokio::time::timeout(timeout, handshake).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        return Err(SendError::Tls {
                            target: target(d),
                            reason: e.to_string(),
                        });
                    }
                    Err(_) => {
                        return Err(SendError::Tls {
                            target: target(d),
                            reason: format!(
                                "no handshake in {timeout:?} (does the receiver speak TLS?)"
                            ),
                        });
                    }
                };
                Ok(Connection::Tls(Box::new(tls)))
            }
        }
    };
    tokio::time::timeout(timeout * 2, run)
        .await
        .unwrap_or_else(|_| Err(connect_error(format!("no answer in {timeout:?}"))))
}

/// What one [`Connection::send`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// Bytes written, framing included.
    pub bytes: usize,
    /// Messages cut to fit one datagram (UDP).
    pub truncated: u64,
}

impl Connection {
    /// Sends `messages` (each one syslog message, unframed) and, over TCP and TLS, waits until
    /// the receiver's TCP stack acknowledged all of it; fails after `timeout`.
    pub async fn send(
        &mut self,
        d: &Destination,
        messages: &[String],
        timeout: Duration,
    ) -> Result<Sent, SendError> {
        let write_error = |reason: String| SendError::Write {
            target: target(d),
            reason,
        };
        let deadline = Instant::now() + timeout;
        let run = async {
            let mut sent = Sent::default();
            match self {
                Connection::Udp(socket) => {
                    for m in messages {
                        let (datagram, cut) = format::datagram(m, format::MAX_DATAGRAM);
                        socket
                            .send(datagram.as_bytes())
                            .await
                            .map_err(|e| write_error(e.to_string()))?;
                        sent.bytes += datagram.len();
                        sent.truncated += u64::from(cut);
                    }
                }
                Connection::Tcp(_) | Connection::Tls(_) => {
                    let mut framed = Vec::with_capacity(messages.iter().map(|m| m.len() + 8).sum());
                    for m in messages {
                        framed.extend_from_slice(&format::octet_counted(m));
                    }
                    sent.bytes = framed.len();
                    match self {
                        Connection::Tcp(s) => {
                            s.write_all(&framed)
                                .await
                                .map_err(|e| write_error(e.to_string()))?;
                            s.flush().await.map_err(|e| write_error(e.to_string()))?;
                        }
                        Connection::Tls(s) => {
                            s.write_all(&framed)
                                .await
                                .map_err(|e| write_error(e.to_string()))?;
                            s.flush().await.map_err(|e| write_error(e.to_string()))?;
                        }
                        Connection::Udp(_) => {}
                    }
                    self.acknowledged(deadline).await.map_err(write_error)?;
                }
            }
            Ok(sent)
        };
        tokio::time::timeout(timeout, run)
            .await
            .unwrap_or_else(|_| Err(write_error(format!("not acknowledged in {timeout:?}"))))
    }

    /// Waits until the socket's output queue holds no unacknowledged byte, or fails when the
    /// peer closed or reset the connection.
    async fn acknowledged(&self, deadline: Instant) -> Result<(), String> {
        let tcp = match self {
            Connection::Tcp(s) => s,
            Connection::Tls(s) => s.get_ref().0,
            Connection::Udp(_) => return Ok(()),
        };
        let mut pause = Duration::from_micros(200);
        loop {
            if let Some(e) = tcp.take_error().map_err(|e| e.to_string())? {
                return Err(e.to_string());
            }
            match unacknowledged(tcp) {
                Some(0) => return Ok(()),
                Some(_) => {}
                None => return Ok(()), // not measurable here: the write is all we know
            }
            if Instant::now() >= deadline {
                return Err("the receiver did not acknowledge in time".into());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Whether the receiver closed the connection (a read would return end of file or an
    /// error): checked before a send so that messages are not written into a dead connection.
    pub fn closed_by_peer(&self) -> bool {
        let tcp = match self {
            Connection::Tcp(s) => s,
            Connection::Tls(s) => s.get_ref().0,
            Connection::Udp(_) => return false,
        };
        let mut buf = [0u8; 1];
        match tcp.try_read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false, // a receiver that talks back: ignored
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(_) => true,
        }
    }
}

/// Bytes written to `tcp` that its peer has not acknowledged (Linux `SIOCOUTQ`); `None` when
/// the kernel does not say.
fn unacknowledged(tcp: &TcpStream) -> Option<i32> {
    let mut pending: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one c_int through the pointer, which is valid for the
    // call; the descriptor is borrowed from a live socket.
    let rc = unsafe { libc::ioctl(tcp.as_raw_fd(), libc::TIOCOUTQ, &mut pending) };
    (rc == 0).then_some(pending)
}
