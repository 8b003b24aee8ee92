//! The notification rule of one event type, as an administrator sets it: which channels carry
//! it, the subject and body templates, and the limit per recipient. Checked whole when saved:
//! a rule that is accepted can always be rendered.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::limit::RateLimit;
use super::template::{Template, TemplateError};
use crate::fields::{self, FieldError};

/// Most channels one rule may name.
pub const MAX_CHANNELS: usize = 16;
/// Most messages per period a rule may allow one recipient.
pub const MAX_MESSAGES_PER_PERIOD: u32 = 10_000;
/// The shortest period of a limit (a digest at most once a minute per recipient).
pub const MIN_PERIOD: Duration = Duration::from_secs(60);
/// The longest period of a limit.
pub const MAX_PERIOD: Duration = Duration::from_secs(7 * 86_400);

/// A rule as written by an administrator (and saved, and pushed down the hierarchy).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuleSettings {
    /// The channels (by name) that carry it.
    pub channels: Vec<String>,
    /// The subject template (email subject; the first line elsewhere).
    pub subject: String,
    /// The body template.
    pub body: String,
    /// At most this many messages per `period` to one recipient.
    pub max_messages: u32,
    /// The limit's period.
    #[serde(with = "crate::config::human")]
    pub period: Duration,
}

impl Default for RuleSettings {
    fn default() -> Self {
        RuleSettings {
            channels: Vec::new(),
            subject: "[%SEVERITY%] %EVENT% on %COMPUTER%".into(),
            body: "%EVENT% (%EVENT_TYPE%, %SEVERITY%) on %COMPUTER% at %RISE_TIME%\n\
                   %DESCR%\nApplication: %KL_PRODUCT%\nServer: %SERVER%\nEvent id: %EVENT_ID%\n"
                .into(),
            max_messages: 10,
            period: Duration::from_secs(600),
        }
    }
}

/// Why a rule was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    /// A field is out of its limits.
    #[error(transparent)]
    Field(#[from] FieldError),
    /// A template does not parse.
    #[error("{field}: {source}")]
    Template {
        /// `subject` or `body`.
        field: &'static str,
        /// Why.
        source: TemplateError,
    },
}

/// A checked rule, its templates parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotificationRule {
    settings: RuleSettings,
    subject: Template,
    body: Template,
}

impl NotificationRule {
    /// Checks `settings`: at least one channel and at most [`MAX_CHANNELS`], each a valid
    /// name and none twice; both templates parse; the limit within its bounds.
    pub fn new(settings: RuleSettings) -> Result<Self, RuleError> {
        if settings.channels.is_empty() {
            return Err(FieldError::new("channels", "name at least one channel").into());
        }
        if settings.channels.len() > MAX_CHANNELS {
            return Err(FieldError::new(
                "channels",
                format!("at most {MAX_CHANNELS} channels per rule"),
            )
            .into());
        }
        for (i, c) in settings.channels.iter().enumerate() {
            fields::id(&format!("channels[{i}]"), c)?;
            if c.is_empty() {
                return Err(FieldError::new(&format!("channels[{i}]"), "empty").into());
            }
            if settings.channels[..i].contains(c) {
                return Err(
                    FieldError::new(&format!("channels[{i}]"), format!("{c:?} twice")).into(),
                );
            }
        }
        if !(1..=MAX_MESSAGES_PER_PERIOD).contains(&settings.max_messages) {
            return Err(FieldError::new(
                "max_messages",
                format!("must be within 1..={MAX_MESSAGES_PER_PERIOD}"),
            )
            .into());
        }
        if !(MIN_PERIOD..=MAX_PERIOD).contains(&settings.period) {
            return Err(FieldError::new(
                "period_secs",
                format!(
                    "must be within {} and {}",
                    humantime::format_duration(MIN_PERIOD),
                    humantime::format_duration(MAX_PERIOD)
                ),
            )
            .into());
        }
        let template = |field, text: &str| {
            Template::parse(text).map_err(|source| RuleError::Template { field, source })
        };
        Ok(NotificationRule {
            subject: template("subject", &settings.subject)?,
            body: template("body", &settings.body)?,
            settings,
        })
    }

    /// The rule as written.
    pub fn settings(&self) -> &RuleSettings {
        &self.settings
    }

    /// The subject template.
    pub fn subject(&self) -> &Template {
        &self.subject
    }

    /// The body template.
    pub fn body(&self) -> &Template {
        &self.body
    }

    /// The limit per recipient.
    pub fn limit(&self) -> RateLimit {
        RateLimit {
            max: self.settings.max_messages,
            period: self.settings.period,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(f: impl FnOnce(&mut RuleSettings)) -> Result<NotificationRule, RuleError> {
        let mut s = RuleSettings {
            channels: vec!["ops-mail".into()],
            ..Default::default()
        };
        f(&mut s);
        NotificationRule::new(s)
    }

    #[test]
    fn the_default_templates_parse_and_each_field_is_checked_by_name() {
        let r = rule(|_| {}).unwrap();
        assert_eq!(r.limit().max, 10);
        let field = |e: RuleError| match e {
            RuleError::Field(f) => f.field,
            RuleError::Template { field, .. } => field.to_owned(),
        };
        assert_eq!(field(rule(|s| s.channels.clear()).unwrap_err()), "channels");
        assert_eq!(
            field(rule(|s| s.channels.push("ops-mail".into())).unwrap_err()),
            "channels[1]"
        );
        assert_eq!(
            field(rule(|s| s.channels = vec!["a".into(); MAX_CHANNELS + 1]).unwrap_err()),
            "channels"
        );
        assert_eq!(
            field(rule(|s| s.channels.push(String::new())).unwrap_err()),
            "channels[1]"
        );
        assert_eq!(
            field(rule(|s| s.max_messages = 0).unwrap_err()),
            "max_messages"
        );
        assert_eq!(
            field(rule(|s| s.period = Duration::from_secs(59)).unwrap_err()),
            "period_secs"
        );
        let e = rule(|s| s.body = "%NOPE%".into()).unwrap_err();
        assert_eq!(
            e,
            RuleError::Template {
                field: "body",
                source: TemplateError::Unknown {
                    name: "NOPE".into()
                }
            }
        );
        assert!(
            e.to_string()
                .starts_with("body: unknown placeholder %NOPE%")
        );
    }

    #[test]
    fn settings_round_trip_as_json_with_a_humantime_period() {
        let r = rule(|s| s.period = Duration::from_secs(3600)).unwrap();
        let json = serde_json::to_string(r.settings()).unwrap();
        assert!(json.contains("\"period\":\"1h\""), "{json}");
        let back: RuleSettings = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, r.settings());
    }
}
