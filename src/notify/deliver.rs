//! One message through one channel to one recipient, whatever carries it: the same report for
//! email, webhook and program, as `TestNotification` returns it and the worker counts it.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::channels::{Channel, ChannelKind, read_ca_file};
use super::{email, program, webhook};
use crate::classify::ClassifiedEvent;

/// A rendered notification: the event it is about, its subject and body.
pub struct Message<'a> {
    /// The event (for a digest: a summary entry of the rule's type).
    pub event: &'a ClassifiedEvent,
    /// The rendered subject.
    pub subject: String,
    /// The rendered body.
    pub body: String,
}

/// What became of one delivery.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    /// The channel.
    pub channel: String,
    /// The recipient (a mail address; the channel's name for a webhook or a program).
    pub recipient: String,
    /// Accepted: SMTP 2xx, HTTP 2xx, exit code 0.
    pub delivered: bool,
    /// The server's answer or what went wrong, for an operator.
    pub detail: String,
    /// The SMTP reply code, when there was one.
    pub smtp_code: Option<u16>,
    /// The HTTP status, when there was one.
    pub http_status: Option<u16>,
    /// The program's exit code, when it exited.
    pub exit_code: Option<i32>,
}

/// Delivers `message` through `channel` to `recipient` within `timeout` (a program channel
/// has its own timeout).
pub async fn deliver(
    channel: &Channel,
    recipient: &str,
    message: &Message<'_>,
    server_id: &str,
    timeout: Duration,
) -> Delivery {
    let mut d = Delivery {
        channel: channel.name.clone(),
        recipient: recipient.to_owned(),
        ..Delivery::default()
    };
    match &channel.kind {
        ChannelKind::Email(e) => {
            match email::send(
                e,
                recipient,
                &message.subject,
                &message.body,
                &message.event.event_id,
                timeout,
            )
            .await
            {
                Ok(reply) => {
                    d.delivered = true;
                    d.smtp_code = Some(reply.code);
                    d.detail = format!("{} {}", reply.code, reply.text);
                }
                Err(err) => {
                    d.smtp_code = err.code();
                    d.detail = err.to_string();
                }
            }
        }
        ChannelKind::Webhook(w) => {
            let roots = match &w.ca_file {
                Some(path) => {
                    let path = path.clone();
                    match tokio::task::spawn_blocking(move || read_ca_file(&path)).await {
                        Ok(Ok(pem)) => webhook::roots(Some(&pem)).map(Arc::new),
                        Ok(Err(e)) => Err(webhook::WebhookError::Url(format!("ca_file {e}"))),
                        Err(e) => Err(webhook::WebhookError::Url(format!("ca_file: {e}"))),
                    }
                }
                None => Ok(system_roots()),
            };
            let json = webhook::payload(message.event, server_id, &message.subject, &message.body);
            let posted = match roots {
                Ok(roots) => webhook::post(w, roots, &json, timeout).await,
                Err(e) => Err(e),
            };
            match posted {
                Ok(status) => {
                    d.delivered = true;
                    d.http_status = Some(status);
                    d.detail = format!("HTTP {status}");
                }
                Err(err) => {
                    if let webhook::WebhookError::Status { status, .. } = &err {
                        d.http_status = Some(*status);
                    }
                    d.detail = err.to_string();
                }
            }
        }
        ChannelKind::Program(p) => {
            match program::run(p, message.event, server_id, &message.subject, &message.body).await {
                Ok(outcome) => {
                    d.delivered = outcome.delivered();
                    d.exit_code = outcome.exit_code;
                    d.detail = match (outcome.exit_code, outcome.timed_out) {
                        (_, true) => format!("killed after {:?}", p.timeout),
                        (Some(code), _) => format!("exit code {code}"),
                        (None, _) => "killed by a signal".to_owned(),
                    };
                    if !outcome.stderr_tail.is_empty() && !d.delivered {
                        d.detail = format!("{}: {}", d.detail, outcome.stderr_tail.trim_end());
                    }
                }
                Err(e) => d.detail = format!("cannot run {}: {e}", p.path.display()),
            }
        }
    }
    d
}

/// The system's trusted roots, read once.
fn system_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            Arc::new(webhook::roots(None).unwrap_or_else(|_| rustls::RootCertStore::empty()))
        })
        .clone()
}
