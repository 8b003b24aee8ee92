//! The formats events leave for a SIEM in: syslog per RFC 5424 with structured data, CEF
//! (ArcSight, Splunk) and LEEF 2.0 (QRadar), and the framings of RFC 6587 (octet counting
//! over TCP and TLS) and RFC 5426 (one datagram per message over UDP). Pure functions: what
//! each writes is tested field by field and parsed back.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::catalog::Severity;
use crate::classify::ClassifiedEvent;
use crate::clock::Timestamp;
use crate::store::StoredEvent;

/// The private enterprise number in our structured-data id (`fleet@32473`): 32473 is the
/// number RFC 5612 reserves for documentation and examples; an operator who has a number of
/// their own sets `sd_id`.
pub const DEFAULT_SD_ID: &str = "fleet@32473";
/// The APP-NAME of every message.
pub const APP_NAME: &str = "fleet-events";
/// The longest datagram sent over UDP: what fits in one Ethernet frame without fragments
/// (RFC 5426 recommends receivers accept at least 2048 bytes; fragments get lost).
pub const MAX_DATAGRAM: usize = 1472;

/// One event as exported: the fields every format uses, borrowed from a stored event or a
/// live one.
#[derive(Clone, Debug)]
pub struct ExportedEvent<'a> {
    /// Its id.
    pub event_id: &'a str,
    /// The device.
    pub device_id: &'a str,
    /// The type string.
    pub event_type: &'a str,
    /// The numeric type ID.
    pub event_type_id: Option<u32>,
    /// The type's display name.
    pub display_name: &'a str,
    /// Its severity.
    pub severity: Severity,
    /// When it happened.
    pub occurred_at: Timestamp,
    /// When the server received it.
    pub received_at: Timestamp,
    /// The application that sent it.
    pub application: &'a str,
    /// Its parameters.
    pub params: &'a HashMap<String, String>,
    /// Where it entered the hierarchy (empty: this server).
    pub origin_server: &'a str,
}

impl<'a> ExportedEvent<'a> {
    /// A stored event, with its type's display name from the catalog.
    pub fn stored(e: &'a StoredEvent, display_name: &'a str) -> Self {
        ExportedEvent {
            event_id: &e.event_id,
            device_id: &e.device_id,
            event_type: &e.event_type,
            event_type_id: e.event_type_id,
            display_name,
            severity: e.severity,
            occurred_at: e.occurred_at,
            received_at: e.received_at,
            application: &e.application,
            params: &e.params,
            origin_server: &e.origin_server,
        }
    }

    /// A live event (a type that is not stored).
    pub fn live(e: &'a ClassifiedEvent) -> Self {
        ExportedEvent {
            event_id: &e.event_id,
            device_id: &e.device_id,
            event_type: &e.event_type.name,
            event_type_id: e.event_type.id,
            display_name: &e.event_type.display_name,
            severity: e.event_type.severity,
            occurred_at: e.occurred_at,
            received_at: e.received_at,
            application: &e.application,
            params: &e.params,
            origin_server: e
                .relay
                .as_ref()
                .map(|r| r.origin_server.as_str())
                .unwrap_or(""),
        }
    }

    fn sorted_params(&self) -> Vec<(&'a String, &'a String)> {
        let mut p: Vec<_> = self.params.iter().collect();
        p.sort();
        p
    }
}

/// The syslog severity (RFC 5424 table 2) of a catalog severity.
pub fn syslog_severity(s: Severity) -> u8 {
    match s {
        Severity::Critical => 2,
        Severity::FunctionalFailure => 3,
        Severity::Warning => 4,
        Severity::Info => 6,
    }
}

/// The CEF and LEEF severity (0–10) of a catalog severity.
pub fn scale_severity(s: Severity) -> u8 {
    match s {
        Severity::Critical => 10,
        Severity::FunctionalFailure => 7,
        Severity::Warning => 5,
        Severity::Info => 3,
    }
}

/// Printable US-ASCII without spaces (RFC 5424 `PRINTUSASCII`), at most `max` characters;
/// `-` (the nil value) when nothing is left.
fn header_field(value: &str, max: usize) -> String {
    let v: String = value
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if v.is_empty() { "-".into() } else { v }
}

/// An SD-PARAM value: `"`, `\` and `]` escaped with a backslash (RFC 5424 6.3.3).
fn sd_value(out: &mut String, value: &str) {
    for c in value.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// An SD-NAME (a param name): printable ASCII except `=`, space, `]` and `"`, at most 32.
fn sd_name(name: &str) -> String {
    let n: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && !matches!(c, '=' | ']' | '"') {
                c
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    if n.is_empty() { "_".into() } else { n }
}

/// One RFC 5424 message: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME - MSGID [SD] MSG`, with the
/// event's fields as structured data under `sd_id` and its parameters under `params@...`,
/// and the message text as UTF-8 after a BOM.
pub fn rfc5424(e: &ExportedEvent<'_>, facility: u8, hostname: &str, sd_id: &str) -> String {
    let pri = u16::from(facility.min(23)) * 8 + u16::from(syslog_severity(e.severity));
    let mut out = format!(
        "<{pri}>1 {} {} {APP_NAME} - {} [{sd_id}",
        e.occurred_at.to_rfc3339(),
        header_field(hostname, 255),
        header_field(e.event_type, 32),
    );
    let mut param = |name: &str, value: &str| {
        let _ = write!(out, " {name}=\"");
        sd_value(&mut out, value);
        out.push('"');
    };
    param("event_id", e.event_id);
    param("event_type", e.event_type);
    if let Some(id) = e.event_type_id {
        param("event_type_id", &id.to_string());
    }
    param("severity", e.severity.as_str());
    param("device", e.device_id);
    param("application", e.application);
    param("received_at", &e.received_at.to_rfc3339());
    if !e.origin_server.is_empty() {
        param("origin_server", e.origin_server);
    }
    out.push(']');
    if !e.params.is_empty() {
        let _ = write!(
            out,
            "[params@{}",
            sd_id.split('@').nth(1).unwrap_or("32473")
        );
        for (k, v) in e.sorted_params() {
            let _ = write!(out, " {}=\"", sd_name(k));
            sd_value(&mut out, v);
            out.push('"');
        }
        out.push(']');
    }
    out.push_str(" \u{feff}");
    let _ = write!(out, "{} on {}", e.display_name, e.device_id);
    out
}

/// A CEF or LEEF `record` as the message of an RFC 5424 syslog message (no structured data),
/// as receivers (ArcSight, QRadar, rsyslog) expect them over syslog.
pub fn in_syslog(e: &ExportedEvent<'_>, facility: u8, hostname: &str, record: &str) -> String {
    let pri = u16::from(facility.min(23)) * 8 + u16::from(syslog_severity(e.severity));
    format!(
        "<{pri}>1 {} {} {APP_NAME} - {} - {record}",
        e.occurred_at.to_rfc3339(),
        header_field(hostname, 255),
        header_field(e.event_type, 32),
    )
}

/// A CEF header field: `\` and `|` escaped, line breaks as spaces.
fn cef_header(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' | '|' => {
                out.push('\\');
                out.push(c);
            }
            '\r' | '\n' => out.push(' '),
            c => out.push(c),
        }
    }
}

/// A CEF extension value: `\` and `=` escaped, line breaks as `\n` and `\r`.
fn cef_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' | '=' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// One CEF:0 record: `CEF:0|Vendor|Product|Version|SignatureID|Name|Severity|Extension`. The
/// signature is the numeric type ID (else the type string); the extension holds the event's
/// id (`externalId`), device (`dhost`), times (`rt`, `end` in ms), type (`cat`), application
/// (`app`), origin server (`cs1`) and parameters as JSON (`cs2`).
pub fn cef(e: &ExportedEvent<'_>, version: &str) -> String {
    let mut out = String::from("CEF:0|fleet-events|fleet-events|");
    cef_header(&mut out, version);
    out.push('|');
    match e.event_type_id {
        Some(id) => {
            let _ = write!(out, "{id}");
        }
        None => cef_header(&mut out, e.event_type),
    }
    out.push('|');
    cef_header(&mut out, e.display_name);
    let _ = write!(out, "|{}|", scale_severity(e.severity));
    let mut first = true;
    let mut ext = |key: &str, value: &str| {
        if !first {
            out.push(' ');
        }
        first = false;
        out.push_str(key);
        out.push('=');
        cef_value(&mut out, value);
    };
    ext("externalId", e.event_id);
    ext("dhost", e.device_id);
    ext("rt", &(e.received_at.0 / 1000).to_string());
    ext("end", &(e.occurred_at.0 / 1000).to_string());
    ext("cat", e.event_type);
    ext("app", e.application);
    if !e.origin_server.is_empty() {
        ext("cs1Label", "originServer");
        ext("cs1", e.origin_server);
    }
    if !e.params.is_empty() {
        let params: serde_json::Map<String, serde_json::Value> = e
            .sorted_params()
            .into_iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        ext("cs2Label", "params");
        ext("cs2", &serde_json::Value::Object(params).to_string());
    }
    out
}

/// A LEEF value: no tab (the delimiter) and no line break, each replaced by a space.
fn leef_value(out: &mut String, value: &str) {
    out.extend(value.chars().map(|c| {
        if matches!(c, '\t' | '\r' | '\n') {
            ' '
        } else {
            c
        }
    }));
}

/// One LEEF:2.0 record, tab-delimited: `LEEF:2.0|Vendor|Product|Version|EventID|` then
/// `key=value` attributes: `devTime` (ms), `sev`, `cat`, `identHostName` (the device),
/// `externalId`, `app`, `originServer`, and each parameter as `param_<name>`.
pub fn leef(e: &ExportedEvent<'_>, version: &str) -> String {
    let mut out = String::from("LEEF:2.0|fleet-events|fleet-events|");
    leef_value(&mut out, &version.replace('|', " "));
    out.push('|');
    match e.event_type_id {
        Some(id) => {
            let _ = write!(out, "{id}");
        }
        None => leef_value(&mut out, &e.event_type.replace('|', " ")),
    }
    // The delimiter field: a tab, written as the LEEF 2.0 hex form.
    out.push_str("|x09|");
    let mut first = true;
    let mut attr = |key: &str, value: &str| {
        if !first {
            out.push('\t');
        }
        first = false;
        out.push_str(key);
        out.push('=');
        leef_value(&mut out, value);
    };
    attr("devTime", &(e.occurred_at.0 / 1000).to_string());
    attr("devTimeFormat", "epoch-ms");
    attr("sev", &scale_severity(e.severity).to_string());
    attr("cat", e.event_type);
    attr("identHostName", e.device_id);
    attr("externalId", e.event_id);
    attr("app", e.application);
    attr("name", e.display_name);
    if !e.origin_server.is_empty() {
        attr("originServer", e.origin_server);
    }
    for (k, v) in e.sorted_params() {
        let key: String = k
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        attr(&format!("param_{key}"), v);
    }
    out
}

/// RFC 6587 octet counting: the message's length in bytes, a space, the message.
pub fn octet_counted(message: &str) -> Vec<u8> {
    let mut framed = format!("{} ", message.len()).into_bytes();
    framed.extend_from_slice(message.as_bytes());
    framed
}

/// A message cut to fit one UDP datagram of at most `max` bytes (on a character boundary);
/// whether it was cut.
pub fn datagram(message: &str, max: usize) -> (&str, bool) {
    if message.len() <= max {
        return (message, false);
    }
    let mut end = max;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    (&message[..end], true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> HashMap<String, String> {
        HashMap::from([
            ("code".to_owned(), "50\"3]".to_owned()),
            ("path".to_owned(), "C:\\temp|x=1\nnext\ttab".to_owned()),
        ])
    }

    fn event(params: &HashMap<String, String>) -> ExportedEvent<'_> {
        ExportedEvent {
            event_id: "e-1",
            device_id: "laptop 42",
            event_type: "KLSRV_EVENT_HOSTS_CONFLICT",
            event_type_id: Some(4102),
            display_name: "Conflict of device names",
            severity: Severity::Warning,
            occurred_at: Timestamp::from_secs(1_795_564_800),
            received_at: Timestamp::from_secs(1_795_564_801),
            application: "agent",
            params,
            origin_server: "branch-1",
        }
    }

    #[test]
    fn rfc5424_header_structured_data_and_escapes() {
        let p = params();
        let m = rfc5424(&event(&p), 16, "primary 1", DEFAULT_SD_ID);
        assert_eq!(
            m,
            "<132>1 2026-11-25T00:00:00.000000Z primary1 fleet-events - KLSRV_EVENT_HOSTS_CONFLICT \
             [fleet@32473 event_id=\"e-1\" event_type=\"KLSRV_EVENT_HOSTS_CONFLICT\" \
             event_type_id=\"4102\" severity=\"WARNING\" device=\"laptop 42\" \
             application=\"agent\" received_at=\"2026-11-25T00:00:01.000000Z\" \
             origin_server=\"branch-1\"][params@32473 code=\"50\\\"3\\]\" \
             path=\"C:\\\\temp|x=1\nnext\ttab\"] \u{feff}Conflict of device names on laptop 42"
        );
        // Critical under facility local7 (23): 23 * 8 + 2.
        let mut critical = event(&p);
        critical.severity = Severity::Critical;
        assert!(rfc5424(&critical, 23, "h", DEFAULT_SD_ID).starts_with("<186>1 "));
        let empty = HashMap::new();
        assert!(!rfc5424(&event(&empty), 16, "", DEFAULT_SD_ID).contains("[params@"));
        assert!(rfc5424(&event(&empty), 16, "", DEFAULT_SD_ID).contains(" - fleet-events "));
    }

    /// CEF is parsed back: seven unescaped `|` before the extension, every key present with
    /// its value once the escapes are undone.
    #[test]
    fn cef_parses_back() {
        let p = params();
        let line = cef(&event(&p), "0.1|beta");
        let mut fields = Vec::new();
        let (mut cur, mut chars) = (String::new(), line.chars());
        while let Some(c) = chars.next() {
            match c {
                '\\' if fields.len() < 7 => cur.push(chars.next().unwrap()),
                '|' if fields.len() < 7 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        assert_eq!(
            &fields[..7],
            &[
                "CEF:0",
                "fleet-events",
                "fleet-events",
                "0.1|beta",
                "4102",
                "Conflict of device names",
                "5"
            ]
        );
        let ext = parse_cef_extension(&fields[7]);
        assert_eq!(ext["externalId"], "e-1");
        assert_eq!(ext["dhost"], "laptop 42");
        assert_eq!(ext["rt"], "1795564801000");
        assert_eq!(ext["end"], "1795564800000");
        assert_eq!(ext["cat"], "KLSRV_EVENT_HOSTS_CONFLICT");
        assert_eq!(ext["cs1"], "branch-1");
        let back: HashMap<String, String> = serde_json::from_str(&ext["cs2"]).unwrap();
        assert_eq!(back, p);
    }

    /// CEF extension: `key=value` pairs separated by spaces, where a key is the word before
    /// an unescaped `=`.
    fn parse_cef_extension(ext: &str) -> HashMap<String, String> {
        let mut out = HashMap::new();
        let mut tokens: Vec<(String, bool)> = Vec::new(); // (text, ends at an unescaped '=')
        let (mut cur, mut chars) = (String::new(), ext.chars());
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next().unwrap() {
                    'n' => cur.push('\n'),
                    'r' => cur.push('\r'),
                    c => cur.push(c),
                },
                '=' => tokens.push((std::mem::take(&mut cur), true)),
                c => cur.push(c),
            }
        }
        tokens.push((cur, false));
        // Each '=' splits "<previous value> <key>" | "<value...>".
        let mut key = tokens[0].0.clone();
        for (text, ends_at_equals) in &tokens[1..] {
            let (value, next_key) = if *ends_at_equals {
                let at = text.rfind(' ').unwrap();
                (text[..at].to_owned(), text[at + 1..].to_owned())
            } else {
                (text.clone(), String::new())
            };
            out.insert(std::mem::replace(&mut key, next_key), value);
        }
        out
    }

    #[test]
    fn leef_parses_back() {
        let p = params();
        let line = leef(&event(&p), "0.1");
        let header: Vec<&str> = line.splitn(7, '|').collect();
        assert_eq!(
            &header[..6],
            &[
                "LEEF:2.0",
                "fleet-events",
                "fleet-events",
                "0.1",
                "4102",
                "x09"
            ]
        );
        let attrs: HashMap<&str, &str> = header[6]
            .split('\t')
            .map(|kv| kv.split_once('=').unwrap())
            .collect();
        assert_eq!(attrs["devTime"], "1795564800000");
        assert_eq!(attrs["sev"], "5");
        assert_eq!(attrs["identHostName"], "laptop 42");
        assert_eq!(attrs["externalId"], "e-1");
        assert_eq!(attrs["originServer"], "branch-1");
        assert_eq!(attrs["param_code"], "50\"3]");
        assert_eq!(attrs["param_path"], "C:\\temp|x=1 next tab");
    }

    #[test]
    fn framing_counts_octets_and_cuts_datagrams_on_character_boundaries() {
        assert_eq!(octet_counted("héllo"), b"6 h\xc3\xa9llo".to_vec());
        assert_eq!(datagram("short", 10), ("short", false));
        assert_eq!(datagram("ééé", 5), ("éé", true));
    }
}
