//! The real `fleet-events` binary: crash safety under SIGKILL, a clean exit on SIGTERM, the CLI
//! flows of the README, and the standard tools (grpcurl through reflection, grpc-health-probe).
//! The tools are installed by the README's test command (`scripts/test.sh`).

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Command, Output};

use common::{ServerProcess, connect, event, query_all};
use fleet_events::api::proto::{self, event_service_client::EventServiceClient};

const BIN: &str = env!("CARGO_BIN_EXE_fleet-events");

fn cli(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

/// A Go tool installed by `go install` (in PATH or in `$(go env GOPATH)/bin`).
fn go_tool(name: &str) -> PathBuf {
    let in_path = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(p) = in_path {
        return p;
    }
    let gopath = Command::new("go")
        .args(["env", "GOPATH"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let p = PathBuf::from(gopath).join("bin").join(name);
    assert!(
        p.exists(),
        "{name} is not installed; the README's test command (scripts/test.sh) installs it"
    );
    p
}

/// SIGKILL in the middle of a stream: after a restart every acknowledged event is there. The
/// server runs with its default durability (fsync per commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), "");
    let mut client = EventServiceClient::new(connect(&server.addr).await);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut answers = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tokio::spawn(async move {
        for i in 0..1_000_000u64 {
            let ev = event(
                &format!("k{}", i % 100),
                "KLSRV_GCM_HTTP_ERROR",
                &format!("k{i}"),
            );
            if tx.send(ev).await.is_err() {
                break;
            }
        }
    });
    let mut acked = Vec::new();
    while acked.len() < 3000 {
        let a = answers.message().await.unwrap().unwrap();
        assert!(a.stored, "{a:?}");
        acked.push(a.event_id);
    }
    server.kill();
    // Whatever else was answered as stored before the kill counts too.
    while let Ok(Some(a)) = answers.message().await {
        if a.stored {
            acked.push(a.event_id);
        }
    }

    let server = ServerProcess::start(dir.path(), "");
    let mut client = EventServiceClient::new(connect(&server.addr).await);
    let stored: HashSet<String> = query_all(
        &mut client,
        proto::QueryEventsRequest {
            event_type: "KLSRV_GCM_HTTP_ERROR".into(),
            page_size: 1000,
            ..Default::default()
        },
    )
    .await
    .into_iter()
    .map(|e| e.event_id)
    .collect();
    let lost: Vec<_> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged events lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert_eq!(server.terminate().code(), Some(0), "SIGTERM exits cleanly");
}

/// The README's walk-through: `types` lists the 19 warnings, a flood sent with `send` shows one
/// KLSRV_EVENT_SPAM_EVENTS_DETECTED in `query`, grpcurl classifies through reflection,
/// grpc-health-probe says SERVING, and bad JSON input is refused with the line number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_and_standard_tools_work_against_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), "[flood]\nthreshold = 10\n");
    let url = server.addr.clone();
    let addr = url.trim_start_matches("http://").to_owned();

    let out = cli(
        &["types", "--server", &url, "--min-severity", "warning"],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    let warnings = table.lines().filter(|l| l.contains(" WARNING ")).count();
    assert_eq!(warnings, 19, "{table}");
    assert!(table.contains("KLSRV_EVENT_HOSTS_CONFLICT"));

    let lines: String = (0..50)
        .map(|i| {
            format!(
                "{{\"event_id\":\"f{i}\",\"device_id\":\"flooder\",\"event_type\":\"APP_CHATTY\",\"params\":{{\"n\":\"{i}\"}}}}\n"
            )
        })
        .collect();
    let out = cli(&["send", "--server", &url], Some(&lines));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("50 acknowledged: 10 stored, 40 blocked"),
        "{err}"
    );

    let out = cli(
        &[
            "query",
            "--server",
            &url,
            "--type",
            "KLSRV_EVENT_SPAM_EVENTS_DETECTED",
            "--json",
        ],
        None,
    );
    assert!(out.status.success());
    let reports: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0]["device_id"], "flooder");
    assert_eq!(reports[0]["params"]["event_type"], "APP_CHATTY");
    assert_eq!(reports[0]["params"]["count"], "11");

    let out = cli(
        &["send", "--server", &url],
        Some("{\"device_id\":\"x\",\"event_type\":\"T\"}\nnot json\n"),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));

    let out = Command::new(go_tool("grpcurl"))
        .args([
            "-plaintext",
            "-d",
            r#"{"device_id":"pc-7","event_type_id":4102}"#,
            &addr,
            "fleetevents.v1.EventService/Classify",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["eventType"], "KLSRV_EVENT_HOSTS_CONFLICT");
    assert_eq!(v["severity"], "WARNING");
    assert_eq!(v["stored"], true);

    let out = Command::new(go_tool("grpcurl"))
        .args([
            "-plaintext",
            "-d",
            r#"{"device_id":""}"#,
            &addr,
            "fleetevents.v1.EventService/Classify",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidArgument"));

    let out = Command::new(go_tool("grpc-health-probe"))
        .args(["-addr", &addr])
        .output()
        .unwrap();
    assert!(out.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("status: SERVING"), "{said}");
    assert_eq!(server.terminate().code(), Some(0));
}

/// Configuration from the environment: `FLEET_EVENTS_FLOOD__THRESHOLD` sets `[flood] threshold`
/// over the file, while variables that are not `SECTION__KEY` (the clients' FLEET_EVENTS_SERVER,
/// anything else) do not stop the server from starting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_overrides_the_file_and_other_variables_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_with_env(
        dir.path(),
        "[flood]\nthreshold = 100\n",
        &[
            ("FLEET_EVENTS_FLOOD__THRESHOLD", "3"),
            ("FLEET_EVENTS_SERVER", "http://127.0.0.1:1"),
            ("FLEET_EVENTS_SOMETHING_ELSE", "x"),
        ],
    );
    let mut client = EventServiceClient::new(connect(&server.addr).await);
    let mut blocked = Vec::new();
    for i in 0..4 {
        let a = client
            .classify(event("env", "APP_T", &format!("{i}")))
            .await
            .unwrap()
            .into_inner();
        blocked.push(a.blocked);
    }
    assert_eq!(blocked, vec![false, false, false, true]);
    assert_eq!(server.terminate().code(), Some(0));
}
