//! `fleet-events notify ...`: notification channels, the rule of a type, test deliveries
//! (administrator token).

use anyhow::Context;
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use fleet_events::api::notify::pb_channel;
use fleet_events::api::proto::{
    self, catalog_service_client::CatalogServiceClient, notification_channel::Kind,
    notification_service_client::NotificationServiceClient,
};
use fleet_events::notify::channels::Channel;

use super::ServerArg;

/// `fleet-events notify ...`
#[derive(clap::Subcommand, Debug)]
pub enum NotifyCommand {
    /// List the server's channels (secrets shown as ***).
    Channels {
        #[command(flatten)]
        server: ServerArg,
    },
    /// Add or replace a channel, given as JSON (see the README), e.g.
    /// '{"name":"ops-mail","kind":{"email":{"host":"mail.example.org","port":587,
    /// "from":"fleet@example.org","to":["oncall@example.org"]}}}'.
    PutChannel {
        #[command(flatten)]
        server: ServerArg,
        /// The channel as JSON; `@FILE` reads it from a file.
        json: String,
    },
    /// Remove a channel.
    RemoveChannel {
        #[command(flatten)]
        server: ServerArg,
        /// Its name.
        name: String,
    },
    /// Show the notification rule of an event type.
    Rule {
        #[command(flatten)]
        server: ServerArg,
        /// The event type.
        event_type: String,
    },
    /// Set (and turn on) the notification rule of an event type.
    SetRule {
        #[command(flatten)]
        server: ServerArg,
        /// The event type.
        event_type: String,
        /// A channel that carries it (repeat for more).
        #[arg(long = "channel", required = true)]
        channels: Vec<String>,
        /// Subject template, e.g. "[%SEVERITY%] %EVENT% on %COMPUTER%" (default when omitted).
        #[arg(long, default_value = "")]
        subject: String,
        /// Body template (default when omitted).
        #[arg(long, default_value = "")]
        body: String,
        /// At most this many messages per period to one recipient (default 10).
        #[arg(long, default_value_t = 0)]
        max_messages: u32,
        /// The limit's period, e.g. 10m, 1h (default 10m).
        #[arg(long)]
        period: Option<humantime::Duration>,
    },
    /// Remove the notification rule of an event type.
    ClearRule {
        #[command(flatten)]
        server: ServerArg,
        /// The event type.
        event_type: String,
    },
    /// Send one notification now through a type's rule (or one channel) and print what each
    /// receiver answered; exits non-zero when one was not delivered.
    Test {
        #[command(flatten)]
        server: ServerArg,
        /// The event type whose rule is used.
        event_type: String,
        /// Only this channel.
        #[arg(long, default_value = "")]
        channel: String,
        /// The device named in the sample event.
        #[arg(long, default_value = "")]
        device: String,
    },
}

/// Runs one `notify` command.
pub async fn run(command: NotifyCommand) -> anyhow::Result<()> {
    match command {
        NotifyCommand::Channels { server } => {
            let list = NotificationServiceClient::new(server.connect().await?)
                .list_channels(proto::ListChannelsRequest {})
                .await?
                .into_inner();
            let mut table = Table::new();
            table.load_preset(UTF8_BORDERS_ONLY);
            table.set_header(["Name", "Kind", "Where", "Recipients"]);
            for c in list.channels {
                let (kind, target, to) = match c.kind {
                    Some(Kind::Email(e)) => {
                        ("email", format!("{}:{}", e.host, e.port), e.to.join(", "))
                    }
                    Some(Kind::Webhook(w)) => ("webhook", w.url, String::new()),
                    Some(Kind::Program(p)) => ("program", p.path, String::new()),
                    None => ("?", String::new(), String::new()),
                };
                table.add_row([c.name, kind.to_owned(), target, to]);
            }
            println!("{table}");
        }
        NotifyCommand::PutChannel { server, json } => {
            let text = match json.strip_prefix('@') {
                Some(path) => {
                    std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?
                }
                None => json,
            };
            let channel: Channel = serde_json::from_str(&text)
                .context("the channel is not valid JSON of a channel")?;
            let saved = NotificationServiceClient::new(server.connect().await?)
                .put_channel(pb_channel(channel))
                .await?
                .into_inner();
            println!("channel {} saved", saved.name);
        }
        NotifyCommand::RemoveChannel { server, name } => {
            NotificationServiceClient::new(server.connect().await?)
                .remove_channel(proto::RemoveChannelRequest { name: name.clone() })
                .await?;
            println!("channel {name} removed");
        }
        NotifyCommand::Rule { server, event_type } => {
            let t = CatalogServiceClient::new(server.connect().await?)
                .get_event_type(proto::GetEventTypeRequest {
                    event_type,
                    event_type_id: 0,
                })
                .await?
                .into_inner();
            match t.notification {
                None => println!("{}: no notification rule", t.event_type),
                Some(r) => {
                    println!("event type:   {}", t.event_type);
                    println!("notify:       {}", if t.notify { "on" } else { "off" });
                    println!("channels:     {}", r.channels.join(", "));
                    println!(
                        "limit:        {} per {}s per recipient",
                        r.max_messages, r.period_secs
                    );
                    println!("subject:      {}", r.subject);
                    println!("body:\n{}", r.body);
                }
            }
        }
        NotifyCommand::SetRule {
            server,
            event_type,
            channels,
            subject,
            body,
            max_messages,
            period,
        } => {
            let period_secs = match period {
                Some(p) => u32::try_from(p.as_secs()).context("--period is too long")?,
                None => 0,
            };
            let t = CatalogServiceClient::new(server.connect().await?)
                .update_event_type_settings(proto::UpdateEventTypeSettingsRequest {
                    event_type,
                    notify: Some(true),
                    notification: Some(proto::NotificationRule {
                        channels,
                        subject,
                        body,
                        max_messages,
                        period_secs,
                    }),
                    ..Default::default()
                })
                .await?
                .into_inner();
            println!("{}: notification rule set", t.event_type);
        }
        NotifyCommand::ClearRule { server, event_type } => {
            let t = CatalogServiceClient::new(server.connect().await?)
                .update_event_type_settings(proto::UpdateEventTypeSettingsRequest {
                    event_type,
                    notification: Some(proto::NotificationRule::default()),
                    ..Default::default()
                })
                .await?
                .into_inner();
            println!("{}: notification rule removed", t.event_type);
        }
        NotifyCommand::Test {
            server,
            event_type,
            channel,
            device,
        } => {
            let r = NotificationServiceClient::new(server.connect().await?)
                .test_notification(proto::TestNotificationRequest {
                    event_type,
                    channel,
                    device_id: device,
                })
                .await?
                .into_inner();
            let mut table = Table::new();
            table.load_preset(UTF8_BORDERS_ONLY);
            table.set_header(["Channel", "Recipient", "Delivered", "Answer"]);
            let failed = r.deliveries.iter().filter(|d| !d.delivered).count();
            for d in r.deliveries {
                table.add_row([
                    d.channel,
                    d.recipient,
                    if d.delivered { "yes" } else { "NO" }.to_owned(),
                    d.detail,
                ]);
            }
            println!("{table}");
            if failed > 0 {
                anyhow::bail!("{failed} delivery(ies) failed");
            }
        }
    }
    Ok(())
}
