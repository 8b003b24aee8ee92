//! The server's logs: `serve --log FILTER --log-format text|json`, always on stderr.
//!
//! - The filter is checked strictly before anything starts: every comma-separated directive
//!   must be `LEVEL`, `TARGET=LEVEL` or `TARGET[SPAN{FIELD=VALUE}]=LEVEL`. A bad one is a usage
//!   error (exit code 2) that names it. `tracing_subscriber::EnvFilter` on its own takes many
//!   mistakes silently (`nonsense=` means "everything of target `nonsense`", a misspelt level is
//!   taken for a target), which leaves the server logging nothing at all.
//! - `text` is colourless unless stderr is a terminal, and never coloured when `NO_COLOR` is set
//!   to anything but the empty string.
//! - `json` writes one JSON object per line (`timestamp`, `level`, `target`, `fields`, and the
//!   spans). The two lines `serve` writes outside the filter in text mode (the address it
//!   listens on, the error it stopped on) are JSON events of target [`ANNOUNCE`] then, which
//!   every filter lets through.

use std::ffi::OsStr;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::Directive;

/// The target of the events that pass any filter in JSON mode (the listening address and the
/// error `serve` stopped on), which text mode prints as plain lines.
pub const ANNOUNCE: &str = "fleet_events::announce";

/// The levels a directive may name.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines; coloured only on a terminal and without NO_COLOR.
    Text,
    /// One JSON object per line.
    Json,
}

/// A log filter that passed [`parse_filter`], with the spaces around its directives removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogFilter(String);

impl LogFilter {
    /// The filter as `EnvFilter` reads it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Error returned by `serve` after it logged the error itself (JSON mode): `main` exits with
/// a failure without printing it again as a plain line.
#[derive(Debug, thiserror::Error)]
#[error("the error was logged")]
pub struct Reported;

/// Checks a `--log` value (or `RUST_LOG`): clap's value parser, so a bad filter is a usage
/// error naming the bad directive.
pub fn parse_filter(value: &str) -> Result<LogFilter, String> {
    if value.trim().is_empty() {
        return Err("the filter is empty; `off` turns logging off".to_owned());
    }
    let mut directives = Vec::new();
    for raw in value.split(',') {
        let d = raw.trim();
        if d.is_empty() {
            return Err(match directives.last() {
                Some(prev) => format!(
                    "empty directive after {prev:?} (two commas in a row, or one at the end)"
                ),
                None => "empty directive at the start (a comma first)".to_owned(),
            });
        }
        check_directive(d).map_err(|why| format!("bad directive {d:?}: {why}"))?;
        directives.push(d);
    }
    let filter = directives.join(",");
    // What passed above is what EnvFilter reads; this only guards against disagreement.
    EnvFilter::builder()
        .parse(&filter)
        .map_err(|e| format!("{filter:?}: {e}"))?;
    Ok(LogFilter(filter))
}

/// Checks one directive: `LEVEL`, `TARGET=LEVEL` or `[TARGET][SPAN{FIELDS}]=LEVEL`.
fn check_directive(d: &str) -> Result<(), String> {
    let level = if let Some(open) = d.find('[') {
        let close = d
            .rfind(']')
            .filter(|&c| c > open)
            .ok_or("'[' without a closing ']'")?;
        let target = &d[..open];
        if !target.is_empty() {
            check_target(target)?;
        }
        check_span(&d[open + 1..close])?;
        d[close + 1..]
            .strip_prefix('=')
            .ok_or("a span filter needs `=LEVEL` after its ']'")?
    } else {
        match d.split_once('=') {
            None if is_level(d) => return Ok(()),
            None => {
                check_target(d)?;
                return Err(format!(
                    "{d:?} is not a level ({}); for everything of target {d} write {d}=trace",
                    LEVELS.join(", ")
                ));
            }
            Some((_, level)) if level.contains('=') => {
                return Err("more than one '=' (a directive is LEVEL or TARGET=LEVEL)".to_owned());
            }
            Some((target, level)) => {
                check_target(target)?;
                level
            }
        }
    };
    if level.is_empty() {
        return Err(format!("no level after '=' ({})", LEVELS.join(", ")));
    }
    if !is_level(level) {
        return Err(format!("{level:?} is not a level ({})", LEVELS.join(", ")));
    }
    d.parse::<Directive>().map(drop).map_err(|e| e.to_string())
}

/// Whether `s` names a level (any case).
fn is_level(s: &str) -> bool {
    LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s))
}

/// A target is a module path: `::`-separated words of letters, digits, `_` and `-`.
fn check_target(t: &str) -> Result<(), String> {
    let word = |w: &str| {
        !w.is_empty()
            && w.chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
    };
    if t.split("::").all(word) {
        Ok(())
    } else {
        Err(format!(
            "{t:?} is not a target (a module path such as fleet_events::store)"
        ))
    }
}

/// The inside of `[...]`: a span name, `{FIELDS}`, or both.
fn check_span(inner: &str) -> Result<(), String> {
    let (name, fields) = match inner.find('{') {
        Some(open) => {
            let fields = inner[open + 1..]
                .strip_suffix('}')
                .ok_or("'{' in a span filter without a closing '}' before ']'")?;
            if fields.is_empty() {
                return Err("empty '{}' in a span filter".to_owned());
            }
            (&inner[..open], Some(fields))
        }
        None => (inner, None),
    };
    if name.is_empty() && fields.is_none() {
        return Err("empty span filter '[]'".to_owned());
    }
    Ok(())
}

/// Whether text logs are coloured: only on a terminal, and not when `NO_COLOR` is set to
/// something (<https://no-color.org>).
pub fn colour(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber: `filter` and `format`, on stderr.
pub fn init(filter: &LogFilter, format: LogFormat) -> anyhow::Result<()> {
    let env_filter = EnvFilter::builder()
        .parse(filter.as_str())
        .map_err(|e| anyhow::anyhow!("log filter {:?}: {e}", filter.as_str()))?;
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => {
            let ansi = colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
            );
            builder
                .with_env_filter(env_filter)
                .with_ansi(ansi)
                .try_init()
        }
        LogFormat::Json => {
            let announce: Directive = format!("{ANNOUNCE}=info")
                .parse()
                .map_err(|e| anyhow::anyhow!("{ANNOUNCE}: {e}"))?;
            builder
                .json()
                .with_ansi(false)
                .with_env_filter(env_filter.add_directive(announce))
                .try_init()
        }
    };
    installed.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn refused(value: &str, naming: &str) {
        match parse_filter(value) {
            Ok(f) => panic!("{value:?} accepted as {f:?}"),
            Err(e) => assert!(e.contains(naming), "{value:?}: {naming:?} not in {e:?}"),
        }
    }

    #[test]
    fn valid_filters_pass_with_spaces_removed() {
        for (value, read) in [
            ("info", "info"),
            ("WARN", "WARN"),
            ("off", "off"),
            ("fleet_events=debug", "fleet_events=debug"),
            (
                "info, fleet_events::store=trace ,h2=warn",
                "info,fleet_events::store=trace,h2=warn",
            ),
            ("tonic-health=error", "tonic-health=error"),
            ("fleet_events[relay]=debug", "fleet_events[relay]=debug"),
            ("[relay{peer=b}]=trace", "[relay{peer=b}]=trace"),
        ] {
            assert_eq!(
                parse_filter(value).map(|f| f.as_str().to_owned()),
                Ok(read.to_owned()),
                "{value:?}"
            );
        }
    }

    #[test]
    fn bad_filters_are_refused_naming_the_directive() {
        refused(
            "bogus=nonsense=x",
            "\"bogus=nonsense=x\": more than one '='",
        );
        refused("nonsense=", "\"nonsense=\": no level");
        refused("info,,==x", "empty directive after \"info\"");
        refused("==x", "\"==x\"");
        refused("info,fleet_events=verbose", "\"fleet_events=verbose\"");
        refused("info,fleet_events=verbose", "\"verbose\" is not a level");
        refused("inof", "\"inof\" is not a level");
        refused("inof", "inof=trace");
        refused("info,", "empty directive after \"info\"");
        refused(",info", "empty directive at the start");
        refused("", "empty");
        refused("   ", "empty");
        refused("fleet events=info", "\"fleet events\" is not a target");
        refused("a:::b=info", "\"a:::b\" is not a target");
        refused("x[span=info", "\"x[span=info\": '[' without a closing ']'");
        refused("x[span]", "needs `=LEVEL`");
        refused("x[]=info", "empty span filter");
        refused("x[{}]=info", "empty '{}'");
        refused("x[{a]=info", "without a closing '}'");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
        assert!(!colour(false, Some(OsStr::new(""))));
    }
}
