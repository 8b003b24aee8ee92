//! Delivery through an email channel: one SMTP conversation per message (lettre, over rustls
//! with the system's roots), STARTTLS required unless the channel is `plain`, within a
//! deadline. Every message carries the event's id in an `X-Fleet-Event-Id` header, so a
//! receiver can tell a repeat (delivery is at least once).

use std::time::Duration;

use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::channels::{EmailChannel, SmtpSecurity};

/// The header that carries the event's id.
pub const EVENT_ID_HEADER: &str = "X-Fleet-Event-Id";

/// What the SMTP server answered to an accepted message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmtpReply {
    /// The reply code (250).
    pub code: u16,
    /// The reply's text, lines joined by spaces.
    pub text: String,
}

/// Why a message was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EmailError {
    /// The message could not be built (an address that no longer parses).
    #[error("message: {0}")]
    Message(String),
    /// The server refused it, or the conversation failed (connection, TLS, authentication).
    #[error("SMTP with {server}: {reason}")]
    Smtp {
        /// `host:port`.
        server: String,
        /// The reply code when the server gave one.
        code: Option<u16>,
        /// What went wrong.
        reason: String,
    },
    /// No answer within the deadline.
    #[error("SMTP with {server}: no answer within {timeout:?}")]
    Timeout {
        /// `host:port`.
        server: String,
        /// The deadline.
        timeout: Duration,
    },
}

impl EmailError {
    /// The server's reply code, when it gave one.
    pub fn code(&self) -> Option<u16> {
        match self {
            EmailError::Smtp { code, .. } => *code,
            _ => None,
        }
    }
}

/// Sends one message to `to` through the channel's server within `timeout`.
pub async fn send(
    channel: &EmailChannel,
    to: &str,
    subject: &str,
    body: &str,
    event_id: &str,
    timeout: Duration,
) -> Result<SmtpReply, EmailError> {
    let server = format!("{}:{}", channel.host, channel.port);
    let message = Message::builder()
        .from(
            channel
                .from
                .parse()
                .map_err(|e| EmailError::Message(format!("from: {e}")))?,
        )
        .to(to
            .parse()
            .map_err(|e| EmailError::Message(format!("to: {e}")))?)
        .subject(one_line(subject))
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str(EVENT_ID_HEADER),
            one_line(event_id),
        ))
        .header(ContentType::TEXT_PLAIN)
        .body(body.to_owned())
        .map_err(|e| EmailError::Message(e.to_string()))?;
    let smtp_error = |e: lettre::transport::smtp::Error| EmailError::Smtp {
        server: server.clone(),
        code: e.status().and_then(|c| c.to_string().parse().ok()),
        reason: e.to_string(),
    };
    let tls = match channel.security {
        SmtpSecurity::Plain => Tls::None,
        SmtpSecurity::StartTls => {
            Tls::Required(TlsParameters::new(channel.host.clone()).map_err(smtp_error)?)
        }
        SmtpSecurity::Tls => {
            Tls::Wrapper(TlsParameters::new(channel.host.clone()).map_err(smtp_error)?)
        }
    };
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&channel.host)
        .port(channel.port)
        .tls(tls)
        .timeout(Some(timeout));
    if !channel.username.is_empty() {
        builder = builder.credentials(Credentials::new(
            channel.username.clone(),
            channel.password.clone(),
        ));
    }
    let transport = builder.build();
    let sent = tokio::time::timeout(timeout, transport.send(message)).await;
    match sent {
        Err(_) => Err(EmailError::Timeout { server, timeout }),
        Ok(Err(e)) => Err(smtp_error(e)),
        Ok(Ok(reply)) => Ok(SmtpReply {
            code: reply.code().to_string().parse().unwrap_or(0),
            text: reply.message().collect::<Vec<_>>().join(" "),
        }),
    }
}

/// A header value on one line: line breaks (which would start a new header) become spaces.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}
