//! The message templates of notification rules, with the original product's placeholders.
//! A template is parsed when its rule is saved, so an unknown placeholder is refused then, by
//! name, and never surprises anyone at delivery time.
//!
//! | placeholder | value |
//! |---|---|
//! | `%EVENT%` | the type's display name |
//! | `%EVENT_TYPE%` | the type string |
//! | `%EVENT_TYPE_ID%` | the numeric type ID (empty when the type has none) |
//! | `%EVENT_ID%` | the event's id |
//! | `%SEVERITY%` | `INFO`, `WARNING`, `FUNCTIONAL_FAILURE` or `CRITICAL` |
//! | `%COMPUTER%` | the device id |
//! | `%DESCR%` | the event's `description` parameter, else the type's description |
//! | `%RISE_TIME%` | when it happened, RFC 3339 in UTC |
//! | `%RECEIVED_TIME%` | when the server received it, RFC 3339 in UTC |
//! | `%KL_PRODUCT%` | the application that sent it |
//! | `%SERVER%` | the id of the server that notifies |
//! | `%PARAM:name%` | the event parameter `name` (empty when the event has none) |
//! | `%%` | a literal `%` |

use crate::classify::ClassifiedEvent;

/// Longest template accepted, in bytes.
pub const MAX_TEMPLATE_BYTES: usize = 8 * 1024;

/// What a placeholder stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placeholder {
    /// `%EVENT%`: the type's display name.
    Event,
    /// `%EVENT_TYPE%`: the type string.
    EventType,
    /// `%EVENT_TYPE_ID%`: the numeric type ID.
    EventTypeId,
    /// `%EVENT_ID%`: the event's id.
    EventId,
    /// `%SEVERITY%`.
    Severity,
    /// `%COMPUTER%`: the device id.
    Computer,
    /// `%DESCR%`: the event's description.
    Descr,
    /// `%RISE_TIME%`: when it happened.
    RiseTime,
    /// `%RECEIVED_TIME%`: when it was received.
    ReceivedTime,
    /// `%KL_PRODUCT%`: the application.
    Product,
    /// `%SERVER%`: this server's id.
    Server,
    /// `%PARAM:name%`: one event parameter.
    Param(String),
}

/// Every named placeholder, as written between the `%` signs.
pub const NAMES: &[(&str, Placeholder)] = &[
    ("EVENT", Placeholder::Event),
    ("EVENT_TYPE", Placeholder::EventType),
    ("EVENT_TYPE_ID", Placeholder::EventTypeId),
    ("EVENT_ID", Placeholder::EventId),
    ("SEVERITY", Placeholder::Severity),
    ("COMPUTER", Placeholder::Computer),
    ("DESCR", Placeholder::Descr),
    ("RISE_TIME", Placeholder::RiseTime),
    ("RECEIVED_TIME", Placeholder::ReceivedTime),
    ("KL_PRODUCT", Placeholder::Product),
    ("SERVER", Placeholder::Server),
];

/// Why a template was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `%NAME%` that is not a placeholder.
    #[error(
        "unknown placeholder %{name}% (known: %EVENT%, %EVENT_TYPE%, %EVENT_TYPE_ID%, %EVENT_ID%, \
         %SEVERITY%, %COMPUTER%, %DESCR%, %RISE_TIME%, %RECEIVED_TIME%, %KL_PRODUCT%, %SERVER%, \
         %PARAM:name%; %% is a literal %)"
    )]
    Unknown {
        /// What stood between the `%` signs.
        name: String,
    },
    /// A `%` that opens a placeholder never closed.
    #[error("a % at byte {at} opens a placeholder that is never closed (write %% for a literal %)")]
    Unterminated {
        /// Its byte offset.
        at: usize,
    },
    /// `%PARAM:%` with no name.
    #[error("%PARAM:% needs a parameter name, as in %PARAM:code%")]
    EmptyParam,
    /// Over [`MAX_TEMPLATE_BYTES`].
    #[error("the template is {len} bytes; at most {MAX_TEMPLATE_BYTES} are accepted")]
    TooLong {
        /// Its length.
        len: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Placeholder),
}

/// A parsed template: its text as written, and its parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

impl Template {
    /// Parses `source`, refusing unknown placeholders by name.
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(TemplateError::TooLong { len: source.len() });
        }
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = source;
        while let Some(open) = rest.find('%') {
            text.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after.find('%').ok_or(TemplateError::Unterminated {
                at: source.len() - rest.len() + open,
            })?;
            let name = &after[..close];
            if name.is_empty() {
                text.push('%');
            } else {
                if !text.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut text)));
                }
                parts.push(Part::Field(placeholder(name)?));
            }
            rest = &after[close + 1..];
        }
        text.push_str(rest);
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template {
            source: source.to_owned(),
            parts,
        })
    }

    /// The template as it was written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The text for `event`, notified by server `server_id`.
    pub fn render(&self, event: &ClassifiedEvent, server_id: &str) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(p) => out.push_str(&value(p, event, server_id)),
            }
        }
        out
    }
}

fn placeholder(name: &str) -> Result<Placeholder, TemplateError> {
    if let Some(param) = name.strip_prefix("PARAM:") {
        return if param.is_empty() {
            Err(TemplateError::EmptyParam)
        } else {
            Ok(Placeholder::Param(param.to_owned()))
        };
    }
    NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, p)| p.clone())
        .ok_or_else(|| TemplateError::Unknown {
            // Cut, so a pasted paragraph between two % signs does not fill the error.
            name: name.chars().take(64).collect(),
        })
}

/// The value of one placeholder for `event`.
pub fn value(p: &Placeholder, event: &ClassifiedEvent, server_id: &str) -> String {
    let t = &event.event_type;
    match p {
        Placeholder::Event => t.display_name.clone(),
        Placeholder::EventType => t.name.clone(),
        Placeholder::EventTypeId => t.id.map(|id| id.to_string()).unwrap_or_default(),
        Placeholder::EventId => event.event_id.clone(),
        Placeholder::Severity => t.severity.as_str().to_owned(),
        Placeholder::Computer => event.device_id.clone(),
        Placeholder::Descr => event
            .params
            .get("description")
            .cloned()
            .unwrap_or_else(|| t.description.clone()),
        Placeholder::RiseTime => event.occurred_at.to_rfc3339(),
        Placeholder::ReceivedTime => event.received_at.to_rfc3339(),
        Placeholder::Product => event.application.clone(),
        Placeholder::Server => server_id.to_owned(),
        Placeholder::Param(name) => event.params.get(name).cloned().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn event() -> ClassifiedEvent {
        crate::notify::testing::event("e-1", "laptop-42", &[("code", "503")])
    }

    #[test]
    fn renders_every_placeholder_and_literal_percent() {
        let t = Template::parse(
            "[%SEVERITY%] %EVENT% (%EVENT_TYPE% %EVENT_TYPE_ID%) on %COMPUTER% at %RISE_TIME% \
             by %KL_PRODUCT% via %SERVER%: code %PARAM:code%, missing '%PARAM:none%', 100%%",
        )
        .unwrap();
        let e = event();
        let text = t.render(&e, "primary-1");
        assert_eq!(
            text,
            format!(
                "[WARNING] {} (KLSRV_EVENT_HOSTS_CONFLICT 4102) on laptop-42 at \
                 2026-11-25T00:00:00.000000Z by agent via primary-1: code 503, missing '', 100%",
                e.event_type.display_name
            )
        );
        assert_eq!(
            Template::parse("%DESCR%").unwrap().render(&e, "s"),
            e.event_type.description
        );
        assert_eq!(Template::parse("").unwrap().render(&e, "s"), "");
        assert_eq!(Template::parse("%%%%").unwrap().render(&e, "s"), "%%");
    }

    #[test]
    fn refuses_unknown_unterminated_and_oversized_templates_by_name() {
        assert_eq!(
            Template::parse("hello %COMPUTR% there"),
            Err(TemplateError::Unknown {
                name: "COMPUTR".into()
            })
        );
        let e = Template::parse("%event%").unwrap_err();
        assert!(e.to_string().contains("%event%"), "{e}");
        assert_eq!(
            Template::parse("50% done"),
            Err(TemplateError::Unterminated { at: 2 })
        );
        assert_eq!(Template::parse("%PARAM:%"), Err(TemplateError::EmptyParam));
        assert!(matches!(
            Template::parse(&"a".repeat(MAX_TEMPLATE_BYTES + 1)),
            Err(TemplateError::TooLong { .. })
        ));
        // Multi-byte text around placeholders is kept whole.
        let t = Template::parse("端末 %COMPUTER% で警告").unwrap();
        assert_eq!(t.render(&event(), "s"), "端末 laptop-42 で警告");
        assert_eq!(t.source(), "端末 %COMPUTER% で警告");
    }
}
