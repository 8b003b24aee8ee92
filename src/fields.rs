//! Limits on the fields of every request that is not an event (events have
//! [`crate::classify::Limits`]): identifiers, names, free text, certificates and lists. One
//! place, so every service refuses an over-size field the same way, before it reaches a
//! registry or the store, and so no stored record can grow without bound.

/// Longest identifier (device ids named outside events, fingerprints, host names, licence
/// keys, update, certificate, batch and token ids), bytes.
pub const ID_BYTES: usize = 256;
/// Longest short text (display names, versions, labels, applications), bytes.
pub const NAME_BYTES: usize = 256;
/// Longest free text (descriptions, recommended responses, reasons, errors), bytes.
pub const TEXT_BYTES: usize = 8 * 1024;
/// Longest PEM document (certificates, CSRs), bytes.
pub const PEM_BYTES: usize = 64 * 1024;
/// Longest page token, bytes.
pub const PAGE_TOKEN_BYTES: usize = 1024;
/// Most items in a list field (visible devices, subscription filters, failed devices).
pub const LIST_ITEMS: usize = 1000;

/// A field over its limit (or malformed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// The field, as named in the proto (`visible_devices[3]` for an element).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl FieldError {
    /// `field` is wrong because of `reason`.
    pub fn new(field: &str, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }
}

fn too_long(field: &str, len: usize, max: usize) -> FieldError {
    FieldError {
        field: field.to_owned(),
        reason: format!("{len} bytes, longer than the limit of {max} bytes"),
    }
}

/// `value` is at most `max` bytes and has no NUL character (which PostgreSQL cannot store in
/// text, so refusing it everywhere keeps both backends answering alike).
pub fn text(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.len() > max {
        return Err(too_long(field, value.len(), max));
    }
    if value.contains('\0') {
        return Err(FieldError {
            field: field.to_owned(),
            reason: "contains a NUL character".to_owned(),
        });
    }
    Ok(())
}

/// Characters of a client's value that an error message repeats; the rest is cut.
pub const SHOWN_CHARS: usize = 64;

/// `value` as an error message quotes it: whole (debug-quoted) when at most [`SHOWN_CHARS`]
/// characters, else its first [`SHOWN_CHARS`] and its length, so an answer never grows with
/// what the client sent.
pub fn shown(value: &str) -> String {
    match value.char_indices().nth(SHOWN_CHARS) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &value[..cut], value.len()),
    }
}

/// `value` is an identifier: at most [`ID_BYTES`] and free of control characters (which
/// would corrupt logs and tables).
pub fn id(field: &str, value: &str) -> Result<(), FieldError> {
    if value.len() > ID_BYTES {
        return Err(too_long(field, value.len(), ID_BYTES));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(FieldError {
            field: field.to_owned(),
            reason: format!("contains the control character {c:?}"),
        });
    }
    Ok(())
}

/// A list of identifiers: at most [`LIST_ITEMS`] elements, each an [`id`].
pub fn ids(field: &str, values: &[String]) -> Result<(), FieldError> {
    list(field, values.len())?;
    for (i, v) in values.iter().enumerate() {
        id(&format!("{field}[{i}]"), v)?;
    }
    Ok(())
}

/// A list field holds at most [`LIST_ITEMS`] elements.
pub fn list(field: &str, len: usize) -> Result<(), FieldError> {
    if len > LIST_ITEMS {
        return Err(FieldError {
            field: field.to_owned(),
            reason: format!("{len} elements, more than the limit of {LIST_ITEMS}"),
        });
    }
    Ok(())
}

/// A page token as sent.
pub fn page_token(value: &str) -> Result<(), FieldError> {
    text("page_token", value, PAGE_TOKEN_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_hold_at_the_edge() {
        assert!(id("x", &"a".repeat(ID_BYTES)).is_ok());
        let e = id("x", &"a".repeat(ID_BYTES + 1)).unwrap_err();
        assert_eq!(e.field, "x");
        assert!(id("x", "a\nb").is_err());
        assert!(id("x", "a\u{0}b").is_err());
        assert!(id("x", "端末-1").is_ok());
        assert!(text("d", &"é".repeat(TEXT_BYTES / 2), TEXT_BYTES).is_ok());
        assert!(text("d", &"é".repeat(TEXT_BYTES / 2 + 1), TEXT_BYTES).is_err());
        assert_eq!(text("d", "a\0b", TEXT_BYTES).unwrap_err().field, "d");
        assert!(text("d", "line\nline\t", TEXT_BYTES).is_ok());
        let many = vec!["d".to_owned(); LIST_ITEMS + 1];
        assert!(ids("v", &many).is_err());
        let e = ids("v", &["ok".into(), "b\tad".into()]).unwrap_err();
        assert_eq!(e.field, "v[1]");
    }

    #[test]
    fn shown_values_are_cut_at_a_character() {
        assert_eq!(shown("ab"), "\"ab\"");
        let exact = "é".repeat(SHOWN_CHARS);
        assert_eq!(shown(&exact), format!("{exact:?}"));
        let long = "é".repeat(4096);
        let s = shown(&long);
        assert!(
            s.starts_with(&format!("{:?}", "é".repeat(SHOWN_CHARS))),
            "{s}"
        );
        assert!(s.ends_with("… (8192 bytes)"), "{s}");
    }
}
