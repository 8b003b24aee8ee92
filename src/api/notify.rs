//! `fleetevents.v1.NotificationService`: the server's notification channels and test
//! deliveries. Rules are catalog settings (`CatalogService.UpdateEventTypeSettings`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::auth::principal;
use super::proto::{
    self, DeliveryReport, ListChannelsRequest, ListChannelsResponse, RemoveChannelRequest,
    TestNotificationRequest, TestNotificationResponse, notification_channel::Kind,
    notification_service_server::NotificationService,
};
use super::status::{Reason, bad_field, not_found, refuse};
use super::validate::Checked;
use crate::auth::audit::{self, AuditArea};
use crate::catalog::Catalog;
use crate::classify::{ClassifiedEvent, Origin};
use crate::engine::Engine;
use crate::notify::channels::{
    Channel, ChannelKind, EmailChannel, ProgramChannel, SmtpSecurity, WebhookChannel,
};
use crate::notify::deliver::{Delivery, Message, deliver};
use crate::notify::registry::{ChannelError, ChannelRegistry};
use crate::notify::rules::{NotificationRule, RuleSettings};

/// How much longer than one delivery's timeout a whole `TestNotification` may take.
const TEST_GRACE: Duration = Duration::from_secs(10);

/// A program channel's timeout when the request gives none.
const DEFAULT_PROGRAM_TIMEOUT: Duration = Duration::from_secs(30);

/// The NotificationService adapter.
pub struct NotificationApi {
    engine: Arc<Engine>,
    catalog: Arc<Catalog>,
    channels: Arc<ChannelRegistry>,
    timeout: Duration,
}

impl NotificationApi {
    /// Serves `channels`; test deliveries use `catalog`'s rules and give up after `timeout`
    /// (SMTP and webhooks); `engine` raises the audit events.
    pub fn new(
        engine: Arc<Engine>,
        catalog: Arc<Catalog>,
        channels: Arc<ChannelRegistry>,
        timeout: Duration,
    ) -> Self {
        NotificationApi {
            engine,
            catalog,
            channels,
            timeout,
        }
    }
}

impl From<ChannelError> for Status {
    fn from(e: ChannelError) -> Status {
        match e {
            ChannelError::Invalid(f) => f.into(),
            ChannelError::NotFound(ref name) => {
                not_found("fleetevents.v1.NotificationChannel", name, e.to_string())
            }
            ChannelError::Full => refuse(Reason::LimitReached, e.to_string()),
            ChannelError::Store(s) => s.into(),
        }
    }
}

/// A wire channel as a domain channel (checked by the registry).
fn channel(c: proto::NotificationChannel) -> Result<Channel, Status> {
    let kind = match c.kind {
        None => return Err(bad_field("kind", "one of email, webhook or program")),
        Some(Kind::Email(e)) => ChannelKind::Email(EmailChannel {
            host: e.host,
            port: u16::try_from(e.port)
                .map_err(|_| bad_field("email.port", "a port number (1-65535)"))?,
            security: match proto::SmtpSecurity::try_from(e.security) {
                Ok(proto::SmtpSecurity::Unspecified | proto::SmtpSecurity::Starttls) => {
                    SmtpSecurity::StartTls
                }
                Ok(proto::SmtpSecurity::Tls) => SmtpSecurity::Tls,
                Ok(proto::SmtpSecurity::Plain) => SmtpSecurity::Plain,
                Err(_) => return Err(bad_field("email.security", "unknown value")),
            },
            username: e.username,
            password: e.password,
            from: e.from,
            to: e.to,
        }),
        Some(Kind::Webhook(w)) => ChannelKind::Webhook(WebhookChannel {
            url: w.url,
            secret_header: w.secret_header,
            secret: w.secret,
            ca_file: (!w.ca_file.is_empty()).then(|| PathBuf::from(w.ca_file)),
        }),
        Some(Kind::Program(p)) => ChannelKind::Program(ProgramChannel {
            path: PathBuf::from(p.path),
            args: p.args,
            timeout: match p.timeout_secs {
                0 => DEFAULT_PROGRAM_TIMEOUT,
                s => Duration::from_secs(u64::from(s)),
            },
        }),
    };
    Ok(Channel { name: c.name, kind })
}

/// A domain channel on the wire (as listed; the CLI sends one this way).
pub fn pb_channel(c: Channel) -> proto::NotificationChannel {
    let kind = match c.kind {
        ChannelKind::Email(e) => Kind::Email(proto::EmailChannel {
            host: e.host,
            port: u32::from(e.port),
            security: match e.security {
                SmtpSecurity::StartTls => proto::SmtpSecurity::Starttls,
                SmtpSecurity::Tls => proto::SmtpSecurity::Tls,
                SmtpSecurity::Plain => proto::SmtpSecurity::Plain,
            } as i32,
            username: e.username,
            password: e.password,
            from: e.from,
            to: e.to,
        }),
        ChannelKind::Webhook(w) => Kind::Webhook(proto::WebhookChannel {
            url: w.url,
            secret_header: w.secret_header,
            secret: w.secret,
            ca_file: w
                .ca_file
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        }),
        ChannelKind::Program(p) => Kind::Program(proto::ProgramChannel {
            path: p.path.display().to_string(),
            args: p.args,
            timeout_secs: u32::try_from(p.timeout.as_secs()).unwrap_or(u32::MAX),
        }),
    };
    proto::NotificationChannel {
        name: c.name,
        kind: Some(kind),
    }
}

fn report(d: Delivery) -> DeliveryReport {
    DeliveryReport {
        channel: d.channel,
        recipient: d.recipient,
        delivered: d.delivered,
        detail: d.detail,
        smtp_code: d.smtp_code.map_or(0, u32::from),
        http_status: d.http_status.map_or(0, u32::from),
        exit_code: d.exit_code,
    }
}

#[tonic::async_trait]
impl NotificationService for NotificationApi {
    async fn put_channel(
        &self,
        request: Request<proto::NotificationChannel>,
    ) -> Result<Response<proto::NotificationChannel>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let c = channel(request.into_inner())?;
        let saved = self.channels.put(c).await?;
        audit::record(
            &self.engine,
            AuditArea::Catalog,
            &who,
            "PutChannel",
            format!("notification-channel:{}", saved.name),
            format!("{:?}", saved.kind),
        )
        .await;
        Ok(Response::new(pb_channel(saved)))
    }

    async fn list_channels(
        &self,
        _request: Request<ListChannelsRequest>,
    ) -> Result<Response<ListChannelsResponse>, Status> {
        Ok(Response::new(ListChannelsResponse {
            channels: self.channels.list().into_iter().map(pb_channel).collect(),
        }))
    }

    async fn remove_channel(
        &self,
        request: Request<RemoveChannelRequest>,
    ) -> Result<Response<proto::NotificationChannel>, Status> {
        request.get_ref().check()?;
        let who = principal(&request);
        let name = request.into_inner().name;
        let gone = self.channels.remove(&name).await?;
        audit::record(
            &self.engine,
            AuditArea::Catalog,
            &who,
            "RemoveChannel",
            format!("notification-channel:{name}"),
            "removed".to_owned(),
        )
        .await;
        Ok(Response::new(pb_channel(gone)))
    }

    async fn test_notification(
        &self,
        request: Request<TestNotificationRequest>,
    ) -> Result<Response<TestNotificationResponse>, Status> {
        request.get_ref().check()?;
        let r = request.into_inner();
        if r.event_type.is_empty() {
            return Err(bad_field("event_type", "required"));
        }
        let event_type = self.catalog.by_name(&r.event_type).ok_or_else(|| {
            not_found(
                "fleetevents.v1.EventType",
                &r.event_type,
                format!("event type {:?} is not in the catalog", r.event_type),
            )
        })?;
        let settings = match (&event_type.settings.notification, r.channel.is_empty()) {
            (Some(rule), true) => rule.clone(),
            (Some(rule), false) => RuleSettings {
                channels: vec![r.channel.clone()],
                ..rule.clone()
            },
            (None, false) => RuleSettings {
                channels: vec![r.channel.clone()],
                ..RuleSettings::default()
            },
            (None, true) => {
                return Err(refuse(
                    Reason::NothingToTest,
                    format!(
                        "event type {:?} has no notification rule: name a channel to test",
                        event_type.name
                    ),
                ));
            }
        };
        let rule = NotificationRule::new(settings).map_err(|e| bad_field("rule", e))?;
        let now = self.engine.clock().now();
        let event = ClassifiedEvent {
            event_id: format!("test-{}", uuid::Uuid::new_v4()),
            device_id: if r.device_id.is_empty() {
                "test-device".to_owned()
            } else {
                r.device_id
            },
            event_type,
            occurred_at: now,
            received_at: now,
            application: "fleet-events".into(),
            params: [("test".to_owned(), "true".to_owned())]
                .into_iter()
                .collect(),
            origin: Origin::Server,
            blocked: false,
            relay: None,
        };
        let server_id = self.engine.server_id().to_owned();
        let message = Message {
            event: &event,
            subject: rule.subject().render(&event, &server_id),
            body: rule.body().render(&event, &server_id),
        };
        let mut targets = Vec::new();
        for name in &rule.settings().channels {
            let c = self.channels.get(name).ok_or_else(|| {
                not_found(
                    "fleetevents.v1.NotificationChannel",
                    name,
                    format!("no notification channel {name:?}"),
                )
            })?;
            for address in c.recipients() {
                targets.push((c.clone(), address));
            }
        }
        // One deadline for the whole call: a relay that accepts and never answers must not
        // hold it for a timeout per recipient.
        let deadline = tokio::time::Instant::now() + self.timeout + TEST_GRACE;
        let mut deliveries = Vec::new();
        for (c, address) in targets {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let d = if left.is_zero() {
                Delivery {
                    channel: c.name.clone(),
                    recipient: address,
                    detail: "not tried: the test's deadline passed".into(),
                    ..Delivery::default()
                }
            } else {
                deliver(&c, &address, &message, &server_id, left.min(self.timeout)).await
            };
            deliveries.push(report(d));
        }
        Ok(Response::new(TestNotificationResponse { deliveries }))
    }
}
