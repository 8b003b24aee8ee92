//! The channels that carry notifications, as an administrator configures them: email over
//! SMTP, a webhook (HTTP POST of the event as JSON), or a local program run without a shell.
//! Checked whole when saved; what can only fail at delivery (a host that does not resolve, a
//! server that refuses TLS) is a delivery error, reported by `TestNotification` and counted.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fields::{self, FieldError};

/// Most recipients of one email channel.
pub const MAX_RECIPIENTS: usize = 100;
/// Most arguments of a program channel.
pub const MAX_ARGS: usize = 64;
/// The longest a program may run.
pub const MAX_PROGRAM_TIMEOUT: Duration = Duration::from_secs(600);

/// How an SMTP connection is secured.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmtpSecurity {
    /// Plain, then upgraded with STARTTLS (refused if the server does not offer it).
    #[default]
    StartTls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Tls,
    /// No TLS at all: only for a relay on the same machine or network.
    Plain,
}

/// Email over SMTP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailChannel {
    /// The SMTP server's host name or address.
    pub host: String,
    /// Its port (25, 465, 587).
    pub port: u16,
    /// How the connection is secured.
    #[serde(default)]
    pub security: SmtpSecurity,
    /// The user to authenticate as (none: no authentication).
    #[serde(default)]
    pub username: String,
    /// Its password.
    #[serde(default)]
    pub password: String,
    /// The sender address.
    pub from: String,
    /// The recipients: each is limited on its own.
    pub to: Vec<String>,
}

/// An HTTP POST of the event as JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookChannel {
    /// Where to POST (`https://`; `http://` only without a secret).
    pub url: String,
    /// A header sent with every call, e.g. `X-Fleet-Secret` (empty: none).
    #[serde(default)]
    pub secret_header: String,
    /// Its value.
    #[serde(default)]
    pub secret: String,
    /// A PEM file of the CA(s) to trust for this URL instead of the system's roots (a receiver
    /// with a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// A local program, run without a shell, with the event's fields in its environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgramChannel {
    /// The executable (an absolute path).
    pub path: PathBuf,
    /// Its arguments, each a template.
    #[serde(default)]
    pub args: Vec<String>,
    /// Killed if it runs longer.
    #[serde(with = "crate::config::human")]
    pub timeout: Duration,
}

/// What carries a channel's messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    /// Email over SMTP.
    Email(EmailChannel),
    /// A webhook.
    Webhook(WebhookChannel),
    /// A local program.
    Program(ProgramChannel),
}

/// A named channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Channel {
    /// Its name, as rules refer to it.
    pub name: String,
    /// What carries its messages.
    pub kind: ChannelKind,
}

impl Channel {
    /// Checks every field; a refusal names the field.
    pub fn check(&self) -> Result<(), FieldError> {
        fields::id("name", &self.name)?;
        if self.name.is_empty() {
            return Err(FieldError::new("name", "empty"));
        }
        match &self.kind {
            ChannelKind::Email(e) => check_email(e),
            ChannelKind::Webhook(w) => check_webhook(w),
            ChannelKind::Program(p) => check_program(p),
        }
    }

    /// The addresses its messages go to, each limited on its own.
    pub fn recipients(&self) -> Vec<String> {
        match &self.kind {
            ChannelKind::Email(e) => e.to.clone(),
            ChannelKind::Webhook(_) | ChannelKind::Program(_) => vec![self.name.clone()],
        }
    }

    /// The channel as listed: secrets replaced by `"***"` when set.
    pub fn redacted(&self) -> Channel {
        let mut c = self.clone();
        match &mut c.kind {
            ChannelKind::Email(e) if !e.password.is_empty() => e.password = "***".into(),
            ChannelKind::Webhook(w) if !w.secret.is_empty() => w.secret = "***".into(),
            _ => {}
        }
        c
    }
}

fn check_email(e: &EmailChannel) -> Result<(), FieldError> {
    fields::text("email.host", &e.host, fields::NAME_BYTES)?;
    if e.host.is_empty() || e.host.contains(char::is_whitespace) {
        return Err(FieldError::new("email.host", "a host name or address"));
    }
    if e.port == 0 {
        return Err(FieldError::new(
            "email.port",
            "a port number (25, 465, 587)",
        ));
    }
    fields::text("email.username", &e.username, fields::NAME_BYTES)?;
    fields::text("email.password", &e.password, fields::NAME_BYTES)?;
    if !e.password.is_empty() && e.username.is_empty() {
        return Err(FieldError::new(
            "email.username",
            "a password needs a user name",
        ));
    }
    if !e.username.is_empty() && e.security == SmtpSecurity::Plain {
        return Err(FieldError::new(
            "email.security",
            "credentials are never sent without TLS: use start_tls or tls",
        ));
    }
    mailbox("email.from", &e.from)?;
    if e.to.is_empty() || e.to.len() > MAX_RECIPIENTS {
        return Err(FieldError::new(
            "email.to",
            format!("1 to {MAX_RECIPIENTS} recipients"),
        ));
    }
    for (i, to) in e.to.iter().enumerate() {
        mailbox(&format!("email.to[{i}]"), to)?;
    }
    Ok(())
}

/// A bare address `local@domain`, no display name, no spaces or line breaks (which would
/// let a value add headers).
fn mailbox(field: &str, address: &str) -> Result<(), FieldError> {
    fields::text(field, address, fields::NAME_BYTES)?;
    let ok = match address.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && !address.contains(|c: char| c.is_whitespace() || c.is_control())
                && !address.contains(['<', '>', ',', ';'])
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!(
                "{} is not an address of the form user@domain",
                fields::shown(address)
            ),
        ))
    }
}

fn check_webhook(w: &WebhookChannel) -> Result<(), FieldError> {
    fields::text("webhook.url", &w.url, fields::TEXT_BYTES)?;
    let url: http::Uri = w
        .url
        .parse()
        .map_err(|e| FieldError::new("webhook.url", format!("not a URL: {e}")))?;
    let https = match url.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(FieldError::new(
                "webhook.url",
                "must be https:// or http://",
            ));
        }
    };
    if url.host().is_none_or(str::is_empty) {
        return Err(FieldError::new("webhook.url", "has no host"));
    }
    if w.secret_header.is_empty() != w.secret.is_empty() {
        return Err(FieldError::new(
            "webhook.secret",
            "secret_header and secret go together: set both or neither",
        ));
    }
    if !w.secret.is_empty() {
        if !https {
            return Err(FieldError::new(
                "webhook.url",
                "a secret is only sent over https://",
            ));
        }
        http::HeaderName::from_bytes(w.secret_header.as_bytes()).map_err(|_| {
            FieldError::new("webhook.secret_header", "not a valid HTTP header name")
        })?;
        http::HeaderValue::from_str(&w.secret)
            .map_err(|_| FieldError::new("webhook.secret", "not a valid HTTP header value"))?;
    }
    if let Some(ca) = &w.ca_file {
        if !https {
            return Err(FieldError::new(
                "webhook.ca_file",
                "a CA file is for https:// URLs",
            ));
        }
        let pem = read_ca_file(ca).map_err(|e| FieldError::new("webhook.ca_file", e))?;
        let roots = super::webhook::roots(Some(&pem))
            .map_err(|e| FieldError::new("webhook.ca_file", e.to_string()))?;
        if roots.is_empty() {
            return Err(FieldError::new(
                "webhook.ca_file",
                format!("{} holds no PEM certificate", ca.display()),
            ));
        }
    }
    Ok(())
}

/// Reads a CA file: a regular file of at most [`fields::PEM_BYTES`] (never a device, a FIFO
/// or a huge file), so neither a save nor a delivery can hang or run out of memory on it.
pub fn read_ca_file(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read;
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    if !meta.is_file() || meta.len() > fields::PEM_BYTES as u64 {
        return Err(format!(
            "{shown}: must be a regular file of at most {} bytes",
            fields::PEM_BYTES
        ));
    }
    let mut pem = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(fields::PEM_BYTES as u64).read_to_string(&mut pem))
        .map_err(|e| format!("{shown}: {e}"))?;
    Ok(pem)
}

fn check_program(p: &ProgramChannel) -> Result<(), FieldError> {
    let shown = p.path.display().to_string();
    fields::text("program.path", &shown, fields::TEXT_BYTES)?;
    if !p.path.is_absolute() {
        return Err(FieldError::new("program.path", "must be an absolute path"));
    }
    let meta = std::fs::metadata(&p.path)
        .map_err(|e| FieldError::new("program.path", format!("{shown}: {e}")))?;
    use std::os::unix::fs::PermissionsExt;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(FieldError::new(
            "program.path",
            format!("{shown} is not an executable file"),
        ));
    }
    if p.args.len() > MAX_ARGS {
        return Err(FieldError::new(
            "program.args",
            format!("at most {MAX_ARGS} arguments"),
        ));
    }
    for (i, a) in p.args.iter().enumerate() {
        super::template::Template::parse(a)
            .map_err(|e| FieldError::new(&format!("program.args[{i}]"), e.to_string()))?;
    }
    if p.timeout.is_zero() || p.timeout > MAX_PROGRAM_TIMEOUT {
        return Err(FieldError::new(
            "program.timeout_secs",
            format!(
                "must be within 1ms and {}",
                humantime::format_duration(MAX_PROGRAM_TIMEOUT)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn email() -> EmailChannel {
        EmailChannel {
            host: "smtp.example".into(),
            port: 587,
            security: SmtpSecurity::StartTls,
            username: "fleet".into(),
            password: "pw".into(),
            from: "fleet@example.com".into(),
            to: vec!["ops@example.com".into()],
        }
    }

    fn field(c: ChannelKind) -> String {
        Channel {
            name: "c".into(),
            kind: c,
        }
        .check()
        .unwrap_err()
        .field
    }

    #[test]
    fn email_fields_are_checked_by_name() {
        let ok = Channel {
            name: "ops-mail".into(),
            kind: ChannelKind::Email(email()),
        };
        ok.check().unwrap();
        assert_eq!(ok.recipients(), vec!["ops@example.com".to_owned()]);
        let ChannelKind::Email(redacted) = ok.redacted().kind else {
            unreachable!()
        };
        assert_eq!(redacted.password, "***");
        let with = |f: fn(&mut EmailChannel)| {
            let mut e = email();
            f(&mut e);
            field(ChannelKind::Email(e))
        };
        assert_eq!(with(|e| e.host = "bad host".into()), "email.host");
        assert_eq!(with(|e| e.port = 0), "email.port");
        assert_eq!(with(|e| e.security = SmtpSecurity::Plain), "email.security");
        assert_eq!(with(|e| e.username.clear()), "email.username");
        assert_eq!(with(|e| e.from = "Fleet <f@x>".into()), "email.from");
        assert_eq!(with(|e| e.to.clear()), "email.to");
        assert_eq!(
            with(|e| e.to = vec!["a@x\r\nBcc: evil@x".into()]),
            "email.to[0]"
        );
        assert_eq!(with(|e| e.to.push("nobody".into())), "email.to[1]");
    }

    #[test]
    fn a_webhook_secret_goes_only_over_https() {
        let hook = |url: &str, header: &str, secret: &str| {
            ChannelKind::Webhook(WebhookChannel {
                url: url.into(),
                secret_header: header.into(),
                secret: secret.into(),
                ca_file: None,
            })
        };
        Channel {
            name: "hook".into(),
            kind: hook("https://hooks.example/fleet", "X-Fleet-Secret", "s3cret"),
        }
        .check()
        .unwrap();
        Channel {
            name: "hook".into(),
            kind: hook("http://127.0.0.1:8080/in", "", ""),
        }
        .check()
        .unwrap();
        assert_eq!(
            field(hook("http://hooks.example/", "X-Fleet-Secret", "s")),
            "webhook.url"
        );
        assert_eq!(field(hook("ftp://hooks.example/", "", "")), "webhook.url");
        assert_eq!(field(hook("not a url", "", "")), "webhook.url");
        assert_eq!(
            field(hook("https://h.example/", "X-Secret", "")),
            "webhook.secret"
        );
        assert_eq!(
            field(hook("https://h.example/", "Bad Header", "s")),
            "webhook.secret_header"
        );
        let with_ca = |url: &str, ca: &std::path::Path| {
            ChannelKind::Webhook(WebhookChannel {
                url: url.into(),
                secret_header: String::new(),
                secret: String::new(),
                ca_file: Some(ca.to_owned()),
            })
        };
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        let pem = dir.path().join("good.pem");
        let ca = rcgen::generate_simple_self_signed(vec!["h.example".into()]).unwrap();
        std::fs::write(&pem, ca.cert.pem()).unwrap();
        Channel {
            name: "hook".into(),
            kind: with_ca("https://h.example/", &pem),
        }
        .check()
        .unwrap();
        assert_eq!(field(with_ca("http://h.example/", &pem)), "webhook.ca_file");
        assert_eq!(
            field(with_ca("https://h.example/", &dir.path().join("none.pem"))),
            "webhook.ca_file"
        );
        assert_eq!(
            field(with_ca("https://h.example/", &not_pem)),
            "webhook.ca_file"
        );
    }

    #[test]
    fn a_program_must_be_an_absolute_executable() {
        let program = |path: &str, args: Vec<String>, secs: u64| {
            ChannelKind::Program(ProgramChannel {
                path: path.into(),
                args,
                timeout: Duration::from_secs(secs),
            })
        };
        Channel {
            name: "p".into(),
            kind: program("/bin/sh", vec!["%COMPUTER%".into()], 5),
        }
        .check()
        .unwrap();
        assert_eq!(field(program("sh", vec![], 5)), "program.path");
        assert_eq!(field(program("/nonexistent/x", vec![], 5)), "program.path");
        let plain = tempfile::NamedTempFile::new().unwrap();
        let plain = plain.path().to_str().unwrap().to_owned();
        assert_eq!(field(program(&plain, vec![], 5)), "program.path");
        assert_eq!(field(program("/bin", vec![], 5)), "program.path");
        assert_eq!(
            field(program("/bin/sh", vec!["%NOPE%".into()], 5)),
            "program.args[0]"
        );
        assert_eq!(field(program("/bin/sh", vec![], 0)), "program.timeout_secs");
        assert_eq!(
            field(program("/bin/sh", vec![], 601)),
            "program.timeout_secs"
        );
    }
}
