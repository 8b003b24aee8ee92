//! The module boundaries ARCHITECTURE.md promises, checked on the source: the domain modules
//! know nothing of gRPC. Only `api/` (the adapters), `server`, `client` and the CLI may use
//! `tonic`, `prost` or the generated proto types.

use std::path::{Path, PathBuf};

/// The domain: every rule of the product lives here, free of the wire.
const DOMAIN: &[&str] = &[
    "src/auth",
    "src/blocks.rs",
    "src/bus.rs",
    "src/catalog",
    "src/classify.rs",
    "src/clock.rs",
    "src/config.rs",
    "src/detectors",
    "src/engine",
    "src/engine.rs",
    "src/fields.rs",
    "src/flood.rs",
    "src/hierarchy",
    "src/maintenance.rs",
    "src/notify",
    "src/recent.rs",
    "src/siem",
    "src/store",
];

/// What only the adapters may name.
const WIRE: &[&str] = &["tonic", "prost", "crate::api", "proto::"];

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            rust_files(&entry.unwrap().path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_owned());
    }
}

/// The code of a line: what comes before a `//` comment.
fn code(line: &str) -> &str {
    line.split("//").next().unwrap_or("")
}

#[test]
fn domain_modules_do_not_touch_the_wire() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for d in DOMAIN {
        let p = root.join(d);
        assert!(
            p.exists(),
            "{d} is listed as a domain module but does not exist"
        );
        rust_files(&p, &mut files);
    }
    assert!(files.len() >= 20, "only {} files found", files.len());
    let mut breaches = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = code(line);
            if let Some(w) = WIRE.iter().find(|w| code.contains(*w)) {
                breaches.push(format!(
                    "{}:{}: names `{w}`: {}",
                    f.strip_prefix(root).unwrap().display(),
                    n + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(
        breaches.is_empty(),
        "domain modules must not use gRPC types (map them in src/api):\n{}",
        breaches.join("\n")
    );
}

#[test]
fn the_check_sees_a_breach() {
    assert_eq!(code("use tonic::Status; // x"), "use tonic::Status; ");
    assert_eq!(code("//! see crate::api"), "");
    assert!(WIRE.iter().any(|w| code("use tonic::Status;").contains(w)));
}

/// The engine is the data path only: it names none of the modules built around it (they use
/// it; it tells the device registry of events through `IngestObserver`), so there is no cycle
/// between the engine and a registry.
#[test]
fn the_engine_names_none_of_the_modules_around_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("src/engine.rs")).unwrap();
    let around = [
        "crate::detectors",
        "crate::hierarchy",
        "crate::blocks",
        "crate::maintenance",
        "crate::auth",
        "crate::server",
    ];
    let breaches: Vec<String> = text
        .lines()
        .enumerate()
        .filter_map(|(n, line)| {
            let c = code(line);
            around
                .iter()
                .find(|m| c.contains(*m))
                .map(|m| format!("src/engine.rs:{}: names {m}", n + 1))
        })
        .collect();
    assert!(breaches.is_empty(), "{}", breaches.join("\n"));
}
