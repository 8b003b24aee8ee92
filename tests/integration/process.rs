//! The real `fleet-events` binary: crash safety under SIGKILL, a clean exit on SIGTERM, the CLI
//! flows of the README (events, tokens, enrolment of a device), and the standard tools (grpcurl
//! through reflection, grpc-health-probe), all over TLS pinned to the server's CA, with a token
//! or a device certificate; one server per data directory; the server's logs (no colour codes
//! off a terminal, JSON lines, a bad `--log` filter refused). The tools are installed by the
//! README's test command (`scripts/test.sh`).

use crate::common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{APP_WARN, ServerProcess, connect, event, query_all, register_test_types_at};
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
    register_test_types_at(&server.addr).await;
    let mut client = EventServiceClient::new(connect(&server.addr).await);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut answers = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tokio::spawn(async move {
        for i in 0..1_000_000u64 {
            let ev = event(&format!("k{}", i % 100), APP_WARN, &format!("k{i}"));
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
            event_type: APP_WARN.into(),
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

/// Text of a command's stdout.
fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Text of a command's stderr.
fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that a command succeeded, showing its output when it did not.
#[track_caller]
fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        stdout_of(out),
        stderr_of(out)
    );
}

/// Asserts that a command failed with `text` in what it printed.
#[track_caller]
fn assert_failure(out: &Output, what: &str, text: &str) {
    let said = format!("{}{}", stdout_of(out), stderr_of(out));
    assert!(!out.status.success(), "{what} succeeded: {said}");
    assert!(said.contains(text), "{what}: {text:?} not in {said}");
}

/// The server's data directory, holding its CA (`ca.pem`) and admin token (`admin.token`).
fn data_dir(server: &ServerProcess) -> PathBuf {
    server.dir.join("data")
}

/// A path as a command-line argument.
fn arg(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// The CLI's flags for the administrator on the server's own machine: `--server URL
/// --data-dir DIR` (the CA and the admin token are found there).
fn admin(server: &ServerProcess) -> Vec<String> {
    vec![
        "--server".into(),
        server.addr.clone(),
        "--data-dir".into(),
        arg(&data_dir(server)).into(),
    ]
}

/// `fleet-events COMMAND... <flags>` with the flags after the subcommand words.
fn cli_with(words: &[&str], flags: &[String], rest: &[&str], stdin: Option<&str>) -> Output {
    let mut args: Vec<&str> = words.to_vec();
    args.extend(flags.iter().map(String::as_str));
    args.extend_from_slice(rest);
    cli(&args, stdin)
}

/// The `HOST:PORT` grpcurl and grpc-health-probe take.
fn host_port(server: &ServerProcess) -> String {
    server.addr.trim_start_matches("https://").to_owned()
}

/// grpcurl over TLS pinned to `ca`, with `args` (credentials, data, address, method).
fn grpcurl(ca: &Path, args: &[&str]) -> Output {
    Command::new(go_tool("grpcurl"))
        .arg("-cacert")
        .arg(ca)
        .args(args)
        .output()
        .unwrap()
}

/// The README's walk-through: `types` lists the 19 warnings, a flood sent with `send` shows one
/// KLSRV_EVENT_SPAM_EVENTS_DETECTED in `query`, grpcurl registers an application type and
/// classifies through reflection (and is refused a built-in type, or any call without the
/// token), grpc-health-probe says SERVING over TLS, and bad JSON input is refused with the line
/// number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_and_standard_tools_work_against_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), "[flood]\nthreshold = 10\n");
    let admin = admin(&server);
    let addr = host_port(&server);
    let data = data_dir(&server);
    let ca = data.join("ca.pem");
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let bearer = format!("authorization: Bearer {}", token.trim());

    let out = cli_with(&["types"], &admin, &["--min-severity", "warning"], None);
    assert_success(&out, "types");
    let table = stdout_of(&out);
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
    let out = cli_with(&["send"], &admin, &[], Some(&lines));
    let err = stderr_of(&out);
    assert_success(&out, "send");
    assert!(
        err.contains("50 acknowledged: 10 stored, 40 blocked"),
        "{err}"
    );

    let out = cli_with(
        &["query"],
        &admin,
        &["--type", "KLSRV_EVENT_SPAM_EVENTS_DETECTED", "--json"],
        None,
    );
    assert_success(&out, "query");
    let reports: Vec<serde_json::Value> = stdout_of(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0]["device_id"], "flooder");
    assert_eq!(reports[0]["params"]["event_type"], "APP_CHATTY");
    assert_eq!(reports[0]["params"]["count"], "11");

    let out = cli_with(
        &["send"],
        &admin,
        &[],
        Some("{\"device_id\":\"x\",\"event_type\":\"T\"}\nnot json\n"),
    );
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("line 2"));

    // Reflection needs no token.
    let out = grpcurl(&ca, &[&addr, "list"]);
    assert_success(&out, "grpcurl list");
    assert!(
        stdout_of(&out).contains("fleetevents.v1.EventService"),
        "{}",
        stdout_of(&out)
    );

    // The administrator registers an application warning, then a client classifies it by ID.
    let out = grpcurl(
        &ca,
        &[
            "-H",
            &bearer,
            "-d",
            r#"{"event_type":"APP_DISK_FULL","event_type_id":72102,"severity":"SEVERITY_WARNING","display_name":"Disk full"}"#,
            &addr,
            "fleetevents.v1.CatalogService/RegisterEventType",
        ],
    );
    assert_success(&out, "grpcurl RegisterEventType");
    let out = grpcurl(
        &ca,
        &[
            "-H",
            &bearer,
            "-d",
            r#"{"device_id":"pc-7","event_type_id":72102}"#,
            &addr,
            "fleetevents.v1.EventService/Classify",
        ],
    );
    assert_success(&out, "grpcurl Classify");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["eventType"], "APP_DISK_FULL");
    assert_eq!(v["severity"], "SEVERITY_WARNING");
    assert_eq!(v["outcome"], "OUTCOME_STORED");
    assert_eq!(v["stored"], true);

    // A built-in type is the server's own: refused, by ID as by name.
    let out = grpcurl(
        &ca,
        &[
            "-H",
            &bearer,
            "-d",
            r#"{"device_id":"pc-7","event_type_id":4102}"#,
            &addr,
            "fleetevents.v1.EventService/Classify",
        ],
    );
    assert_failure(&out, "Classify of 4102", "Code: PermissionDenied");

    let out = grpcurl(
        &ca,
        &[
            "-H",
            &bearer,
            "-d",
            r#"{"device_id":""}"#,
            &addr,
            "fleetevents.v1.EventService/Classify",
        ],
    );
    assert_failure(&out, "Classify without a device", "InvalidArgument");

    // Without the token: refused before the request is looked at.
    let out = grpcurl(
        &ca,
        &[
            "-d",
            r#"{"device_id":"pc-7","event_type":"APP_DISK_FULL"}"#,
            &addr,
            "fleetevents.v1.EventService/Classify",
        ],
    );
    assert_failure(&out, "Classify without a token", "Code: Unauthenticated");

    let out = Command::new(go_tool("grpc-health-probe"))
        .args(["-addr", &addr, "-tls", "-tls-ca-cert", arg(&ca)])
        .output()
        .unwrap();
    assert_success(&out, "grpc-health-probe");
    let said = format!("{}{}", stdout_of(&out), stderr_of(&out));
    assert!(said.contains("status: SERVING"), "{said}");
    assert_eq!(server.terminate().code(), Some(0));
}

/// Tokens and enrolment with the real binary: `token create` prints a `fet_` token that works
/// with `--token` for its role and no further (an ingest token sends but does not read, a
/// viewer token reads but does not send), `token list` shows them, a revoked token stops
/// working; `enroll-token create` prints a secret that `enroll` trades for a device certificate,
/// with which `send --cert --key --ca` sends for that device, and grpcurl with the same
/// certificate may classify for its own device but gets PermissionDenied for another; after
/// `device revoke` the certificate is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_device_enrolment_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), "");
    let admin = admin(&server);
    let url = server.addr.clone();
    let addr = host_port(&server);
    let ca = data_dir(&server).join("ca.pem");

    // Bearer tokens.
    let out = cli_with(
        &["token", "create"],
        &admin,
        &["--name", "ci-ingest", "--role", "ingest"],
        None,
    );
    assert_success(&out, "token create ingest");
    let ingest = stdout_of(&out).trim().to_owned();
    assert!(ingest.starts_with("fet_"), "{ingest}");
    let out = cli_with(
        &["token", "create"],
        &admin,
        &["--name", "ci-viewer", "--role", "viewer"],
        None,
    );
    assert_success(&out, "token create viewer");
    let viewer = stdout_of(&out).trim().to_owned();
    assert!(viewer.starts_with("fet_"), "{viewer}");
    assert_ne!(ingest, viewer);
    let with_token = |t: &str| -> Vec<String> {
        vec![
            "--server".into(),
            url.clone(),
            "--ca".into(),
            arg(&ca).into(),
            "--token".into(),
            t.into(),
        ]
    };

    let out = cli_with(
        &["send"],
        &with_token(&ingest),
        &[],
        Some("{\"event_id\":\"t1\",\"device_id\":\"pc-t\",\"event_type\":\"APP_FROM_TOKEN\"}\n"),
    );
    assert_success(&out, "send --token (ingest)");
    assert!(
        stderr_of(&out).contains("1 acknowledged"),
        "{}",
        stderr_of(&out)
    );
    let out = cli_with(
        &["query"],
        &with_token(&ingest),
        &["--type", "APP_FROM_TOKEN", "--json"],
        None,
    );
    assert_failure(&out, "query with an ingest token", "permission");

    let out = cli_with(
        &["query"],
        &with_token(&viewer),
        &["--type", "APP_FROM_TOKEN", "--json"],
        None,
    );
    assert_success(&out, "query --token (viewer)");
    let got: Vec<serde_json::Value> = stdout_of(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["device_id"], "pc-t");
    let out = cli_with(
        &["send"],
        &with_token(&viewer),
        &[],
        Some("{\"device_id\":\"pc-t\",\"event_type\":\"APP_FROM_TOKEN\"}\n"),
    );
    assert_failure(&out, "send with a viewer token", "permission");

    let out = cli_with(&["token", "list"], &admin, &[], None);
    assert_success(&out, "token list");
    let list = stdout_of(&out);
    assert!(
        list.contains("ci-ingest") && list.contains("ci-viewer"),
        "{list}"
    );
    assert!(!list.contains(&viewer), "secrets are never listed: {list}");

    let out = cli_with(&["token", "revoke"], &admin, &["ci-viewer"], None);
    assert_success(&out, "token revoke");
    let out = cli_with(
        &["query"],
        &with_token(&viewer),
        &["--type", "APP_FROM_TOKEN"],
        None,
    );
    assert!(!out.status.success(), "a revoked token still reads");

    // A device enrols with a one-time enrolment token.
    let out = cli_with(
        &["enroll-token", "create"],
        &admin,
        &["--uses", "1", "--valid-for", "1h", "--label", "ci"],
        None,
    );
    assert_success(&out, "enroll-token create");
    let secret = stdout_of(&out).trim().to_owned();
    assert!(!secret.is_empty() && !secret.contains('\n'), "{secret:?}");
    let agent = dir.path().join("agent");
    let out = cli(
        &[
            "enroll",
            "--server",
            &url,
            "--ca",
            arg(&ca),
            "--enroll-token",
            &secret,
            "--device-id",
            "agent-1",
            "--out",
            arg(&agent),
        ],
        None,
    );
    assert_success(&out, "enroll");
    let (cert, key, agent_ca) = (
        agent.join("device.pem"),
        agent.join("device.key"),
        agent.join("ca.pem"),
    );
    for f in [&cert, &key, &agent_ca] {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(text.contains("-----BEGIN "), "{}: {text}", f.display());
    }
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key is private: {mode:o}");
    }
    // The enrolment token was for one use.
    let out = cli(
        &[
            "enroll",
            "--server",
            &url,
            "--ca",
            arg(&ca),
            "--enroll-token",
            &secret,
            "--device-id",
            "agent-2",
            "--out",
            arg(&dir.path().join("agent-2")),
        ],
        None,
    );
    assert!(
        !out.status.success(),
        "a used-up enrolment token enrolled again"
    );

    // HOST:PORT, as grpcurl takes it, means TLS.
    let host_port = url.strip_prefix("https://").expect("a TLS url").to_owned();
    let device_flags: Vec<String> = vec![
        "--server".into(),
        host_port,
        "--cert".into(),
        arg(&cert).into(),
        "--key".into(),
        arg(&key).into(),
        "--ca".into(),
        arg(&agent_ca).into(),
    ];
    let out = cli_with(
        &["send"],
        &device_flags,
        &[],
        Some(
            "{\"event_id\":\"a1\",\"device_id\":\"agent-1\",\"event_type\":\"APP_AGENT_STARTED\"}\n",
        ),
    );
    assert_success(&out, "send --cert");
    assert!(
        stderr_of(&out).contains("1 acknowledged: 1 stored"),
        "{}",
        stderr_of(&out)
    );
    let mut client = EventServiceClient::new(connect(&server.addr).await);
    let stored = query_all(
        &mut client,
        proto::QueryEventsRequest {
            device_id: "agent-1".into(),
            event_type: "APP_AGENT_STARTED".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].event_id, "a1");

    // grpcurl with the device's certificate: its own device yes, another device no.
    let mtls = |body: &str| {
        grpcurl(
            &agent_ca,
            &[
                "-cert",
                arg(&cert),
                "-key",
                arg(&key),
                "-d",
                body,
                &addr,
                "fleetevents.v1.EventService/Classify",
            ],
        )
    };
    let out = mtls(r#"{"device_id":"agent-1","event_type":"APP_AGENT_STARTED","event_id":"a2"}"#);
    assert_success(&out, "grpcurl Classify for its own device");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["deviceId"], "agent-1");
    assert_eq!(v["stored"], true);
    let out = mtls(r#"{"device_id":"agent-9","event_type":"APP_AGENT_STARTED","event_id":"a3"}"#);
    assert_failure(
        &out,
        "grpcurl Classify for another device",
        "Code: PermissionDenied",
    );

    // Revoked: the certificate no longer works.
    let out = cli_with(&["device", "revoke"], &admin, &["agent-1"], None);
    assert_success(&out, "device revoke");
    let out = mtls(r#"{"device_id":"agent-1","event_type":"APP_AGENT_STARTED","event_id":"a4"}"#);
    assert!(
        !out.status.success(),
        "a revoked device's certificate still works: {}",
        stdout_of(&out)
    );
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

/// A `serve` process started here rather than by [`ServerProcess`]: its stderr goes to a file
/// (not a terminal) that the test reads, and it may be expected to refuse to start.
struct Serve {
    child: std::process::Child,
    ready: PathBuf,
    stderr: PathBuf,
}

impl Serve {
    /// Starts `serve` on `<dir>/data` on a free port, with the config TOML in `<dir>/config.toml`
    /// when there is one (as [`ServerProcess`] writes it), `flags` after the usual ones, and
    /// `env`; `name` names its ready and stderr files. NO_COLOR is removed from its environment.
    fn spawn(dir: &Path, name: &str, flags: &[&str], env: &[(&str, &str)]) -> Serve {
        let data = dir.join("data");
        let ready = dir.join(format!("{name}.ready"));
        let stderr = dir.join(format!("{name}.stderr"));
        let _ = std::fs::remove_file(&ready);
        let cfg = dir.join("config.toml");
        if !cfg.exists() {
            std::fs::write(&cfg, "").unwrap();
        }
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .arg("--ready-file")
            .arg(&ready)
            .arg("--config")
            .arg(&cfg)
            .args(flags)
            .env_remove("NO_COLOR")
            .env_remove("RUST_LOG")
            .env_remove("FLEET_EVENTS_LOG_FORMAT");
        if let Some(url) = common::store_url_for(&data) {
            cmd.env("FLEET_EVENTS_STORE__URL", url);
        }
        let child = cmd
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start fleet-events");
        Serve {
            child,
            ready,
            stderr,
        }
    }

    /// Waits (deadline 30 s) for the ready file or for the process to exit: the address it
    /// serves on, or how it exited.
    fn ready_or_exit(&mut self) -> Result<String, std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Ok(a) = std::fs::read_to_string(&self.ready) {
                return Ok(format!("https://{a}"));
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(status);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "neither ready nor exited within 30 s: {}",
                self.stderr_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Waits for it to serve, registering its credentials for [`connect`].
    fn ready(&mut self) -> String {
        match self.ready_or_exit() {
            Ok(addr) => {
                common::register_server(&addr, &self.ready.with_file_name("data"));
                addr
            }
            Err(status) => panic!("serve exited ({status}): {}", self.stderr_text()),
        }
    }

    /// Waits for it to exit without serving.
    #[track_caller]
    fn refused(&mut self) -> std::process::ExitStatus {
        match self.ready_or_exit() {
            Ok(addr) => panic!("serve started on {addr}: {}", self.stderr_text()),
            Err(status) => status,
        }
    }

    /// SIGTERM, then the exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }

    /// What it wrote to stderr so far.
    fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stderr).unwrap()).into_owned()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every non-empty line of `text` as a JSON object that has a `level`.
#[track_caller]
fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}\nall of it:\n{text}"));
            assert!(v.is_object(), "not an object: {l}");
            assert!(v["level"].is_string(), "no level: {l}");
            v
        })
        .collect()
}

/// One data directory, one server: a second server on a directory in use exits at once with
/// a message naming the directory and the first server's pid (as a JSON event with
/// `--log-format json`), while the first keeps serving; once the first is killed with SIGKILL
/// (no shutdown code runs) the kernel has released the lock and a new server starts there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_in_use_refuses_a_second_server() {
    let dir = tempfile::tempdir().unwrap();
    let first = ServerProcess::start(dir.path(), "");
    let data = data_dir(&first);
    let in_use = format!(
        "data directory {} is in use by another fleet-events server (pid {})",
        data.display(),
        first.child.id()
    );

    let mut second = Serve::spawn(dir.path(), "second", &[], &[]);
    let status = second.refused();
    let said = second.stderr_text();
    assert!(!status.success(), "{status}: {said}");
    assert!(said.contains(&in_use), "{in_use:?} not in {said}");
    assert!(
        said.contains("one data directory serves one server"),
        "{said}"
    );

    // The same refusal in JSON mode (chosen through the environment) is a JSON event.
    let mut third = Serve::spawn(
        dir.path(),
        "third",
        &[],
        &[("FLEET_EVENTS_LOG_FORMAT", "json")],
    );
    let status = third.refused();
    let said = third.stderr_text();
    assert!(!status.success(), "{status}: {said}");
    let lines = json_lines(&said);
    assert!(
        lines.iter().any(|l| l["level"] == "ERROR"
            && l["fields"]["error"]
                .as_str()
                .is_some_and(|e| e.contains(&in_use))),
        "{said}"
    );

    // The first server is untouched.
    let mut client = EventServiceClient::new(connect(&first.addr).await);
    let answer = client
        .classify(event("pc-lock", "APP_LOCK_CHECK", "lock-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.stored, "{answer:?}");

    first.kill();
    let after = ServerProcess::start(dir.path(), "");
    let mut client = EventServiceClient::new(connect(&after.addr).await);
    let stored = query_all(
        &mut client,
        proto::QueryEventsRequest {
            device_id: "pc-lock".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(after.terminate().code(), Some(0));
}

/// Text logs written to a file (not a terminal) carry no ANSI colour codes, even with NO_COLOR
/// unset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_off_a_terminal_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Serve::spawn(dir.path(), "text", &["--log", "debug"], &[]);
    let addr = server.ready();
    let mut client = EventServiceClient::new(connect(&addr).await);
    client
        .classify(event("pc-text", "APP_TEXT_LOG", "t-1"))
        .await
        .unwrap();
    assert_eq!(server.terminate().code(), Some(0));
    let said = server.stderr_text();
    assert!(said.contains("fleet-events listening on"), "{said}");
    assert!(said.contains(" INFO "), "{said}");
    assert!(said.contains(" DEBUG "), "{said}");
    assert!(
        !said.contains("\x1b["),
        "ANSI escape codes in logs off a terminal:\n{said}"
    );
}

/// `--log-format json`: every line on stderr is one JSON object with a timestamp, a level, a
/// target and the fields, including the address it listens on and its shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Serve::spawn(
        dir.path(),
        "json",
        &["--log-format", "json", "--log", "info,fleet_events=debug"],
        &[],
    );
    let addr = server.ready();
    let mut client = EventServiceClient::new(connect(&addr).await);
    client
        .classify(event("pc-json", "APP_JSON_LOG", "j-1"))
        .await
        .unwrap();
    assert_eq!(server.terminate().code(), Some(0));
    let said = server.stderr_text();
    let lines = json_lines(&said);
    assert!(lines.len() >= 3, "{said}");
    for l in &lines {
        assert!(l["timestamp"].is_string(), "{l}");
        assert!(l["target"].is_string(), "{l}");
        assert!(l["fields"].is_object(), "{l}");
    }
    let host_port = addr.trim_start_matches("https://");
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "fleet-events listening"
                && l["fields"]["addr"] == host_port),
        "{said}"
    );
    assert!(
        lines.iter().any(|l| l["fields"]["message"] == "stopped"),
        "{said}"
    );
}

/// A `--log` (or RUST_LOG) value that is not a valid filter is a usage error (exit code 2)
/// naming the bad directive; the server does not start (not even its data directory is made).
#[test]
fn an_invalid_log_filter_is_refused_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    /// Flags, environment, and what the refusal must say.
    type Case = (
        &'static [&'static str],
        Option<(&'static str, &'static str)>,
        &'static str,
    );
    let cases: [Case; 6] = [
        (&["--log", "bogus=nonsense=x"], None, "\"bogus=nonsense=x\""),
        (&["--log=nonsense="], None, "\"nonsense=\""),
        (
            &["--log", "info,,==x"],
            None,
            "empty directive after \"info\"",
        ),
        (
            &["--log", "info,fleet_events=verbose"],
            None,
            "\"fleet_events=verbose\"",
        ),
        (&["--log", "inof"], None, "\"inof\" is not a level"),
        (&[], Some(("RUST_LOG", "warn,h2=loud")), "\"h2=loud\""),
    ];
    for (i, (flags, env, naming)) in cases.into_iter().enumerate() {
        let env: Vec<(&str, &str)> = env.into_iter().collect();
        let env = env.as_slice();
        let mut server = Serve::spawn(dir.path(), &format!("bad-{i}"), flags, env);
        let status = server.refused();
        let said = server.stderr_text();
        assert_eq!(status.code(), Some(2), "{flags:?} {env:?}: {said}");
        assert!(
            said.contains(naming),
            "{flags:?} {env:?}: {naming:?} not in {said}"
        );
        assert!(!said.contains("listening"), "{said}");
        assert!(
            !dir.path().join("data").exists(),
            "{flags:?} {env:?} started far enough to make the data directory: {said}"
        );
    }
}

/// Notifications with the real binary: `notify put-channel` saves a program channel given as
/// JSON, `notify set-rule` sets a type's rule, `notify rule` shows it, `notify test` runs the
/// program and prints the answer, an event of the type runs it again (the program writes what
/// it was given to a file), `notify channels` lists it; a bad template is refused naming the
/// placeholder, a failing delivery makes `notify test` exit non-zero, and `clear-rule` and
/// `remove-channel` undo it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_through_the_cli() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), "");
    let admin = admin(&server);
    let out_file = dir.path().join("notified.txt");
    let script = dir.path().join("notify.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$FLEET_EVENT_ID $FLEET_COMPUTER $1\" >> {}\n",
            out_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let channel = serde_json::json!({
        "name": "cli-prog",
        "kind": {"program": {"path": script, "args": ["%EVENT_TYPE%"], "timeout": "10s"}}
    })
    .to_string();
    let out = cli_with(&["notify", "put-channel"], &admin, &[&channel], None);
    assert_success(&out, "notify put-channel");
    let out = cli_with(&["notify", "channels"], &admin, &[], None);
    assert_success(&out, "notify channels");
    assert!(stdout_of(&out).contains("cli-prog"), "{}", stdout_of(&out));
    assert!(stdout_of(&out).contains("program"), "{}", stdout_of(&out));

    let out = cli_with(
        &["notify", "set-rule"],
        &admin,
        &[
            "KLSRV_EVENT_HOSTS_CONFLICT",
            "--channel",
            "cli-prog",
            "--body",
            "%BOGUS%",
        ],
        None,
    );
    assert_failure(&out, "a rule with an unknown placeholder", "%BOGUS%");
    // Rules are set on catalog types: the administrator registers the type (grpcurl).
    let bearer = format!(
        "authorization: Bearer {}",
        std::fs::read_to_string(data_dir(&server).join("admin.token"))
            .unwrap()
            .trim()
    );
    let out = grpcurl(
        &data_dir(&server).join("ca.pem"),
        &[
            "-H",
            &bearer,
            "-d",
            r#"{"event_type":"APP_CLI_NOTE","severity":"SEVERITY_WARNING"}"#,
            &host_port(&server),
            "fleetevents.v1.CatalogService/RegisterEventType",
        ],
    );
    assert_success(&out, "grpcurl RegisterEventType");
    let out = cli_with(
        &["notify", "set-rule"],
        &admin,
        &[
            "APP_CLI_NOTE",
            "--channel",
            "cli-prog",
            "--max-messages",
            "5",
            "--period",
            "1h",
        ],
        None,
    );
    assert_success(&out, "notify set-rule");
    let out = cli_with(&["notify", "rule"], &admin, &["APP_CLI_NOTE"], None);
    assert_success(&out, "notify rule");
    assert!(
        stdout_of(&out).contains("5 per 3600s"),
        "{}",
        stdout_of(&out)
    );

    let out = cli_with(
        &["notify", "test"],
        &admin,
        &["APP_CLI_NOTE", "--device", "pc-test"],
        None,
    );
    assert_success(&out, "notify test");
    assert!(
        stdout_of(&out).contains("exit code 0"),
        "{}",
        stdout_of(&out)
    );
    let out = cli_with(
        &["send"],
        &admin,
        &[],
        Some("{\"event_id\":\"c1\",\"device_id\":\"pc-cli\",\"event_type\":\"APP_CLI_NOTE\"}\n"),
    );
    assert_success(&out, "send");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&out_file).unwrap_or_default();
        if text.lines().any(|l| l == "c1 pc-cli APP_CLI_NOTE") {
            assert!(
                text.lines().any(|l| l.ends_with(" pc-test APP_CLI_NOTE")),
                "{text}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not notified: {text}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let failing = serde_json::json!({
        "name": "cli-false",
        "kind": {"program": {"path": "/bin/false", "timeout": "5s"}}
    })
    .to_string();
    assert_success(
        &cli_with(&["notify", "put-channel"], &admin, &[&failing], None),
        "put-channel /bin/false",
    );
    let out = cli_with(
        &["notify", "test"],
        &admin,
        &["APP_CLI_NOTE", "--channel", "cli-false"],
        None,
    );
    assert_failure(&out, "a failing test delivery", "exit code 1");
    let out = cli_with(&["notify", "put-channel"], &admin, &["{not json"], None);
    assert_failure(&out, "put-channel with bad JSON", "not valid JSON");

    assert_success(
        &cli_with(&["notify", "clear-rule"], &admin, &["APP_CLI_NOTE"], None),
        "clear-rule",
    );
    let out = cli_with(&["notify", "rule"], &admin, &["APP_CLI_NOTE"], None);
    assert!(
        stdout_of(&out).contains("no notification rule"),
        "{}",
        stdout_of(&out)
    );
    for name in ["cli-prog", "cli-false"] {
        assert_success(
            &cli_with(&["notify", "remove-channel"], &admin, &[name], None),
            "remove-channel",
        );
    }
    let out = cli_with(&["notify", "remove-channel"], &admin, &["cli-prog"], None);
    assert_failure(&out, "removing it twice", "no notification channel");
    assert_eq!(server.terminate().code(), Some(0));
}

/// The SIEM commands end to end against a real receiver (a TCP listener in the test reading
/// octet-counted frames): `siem put` with `--from beginning` exports what is stored, `siem
/// destinations` shows the cursor and the state, `siem test` sends a sample, a bad field is
/// refused naming it, `siem remove` forgets the destination.
#[tokio::test]
async fn siem_export_through_the_cli() {
    use std::io::{BufRead, BufReader, Read};
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), "");
    let admin = admin(&server);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = received.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let sink = sink.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn);
                loop {
                    let mut len = Vec::new();
                    if r.read_until(b' ', &mut len).unwrap_or(0) == 0 {
                        return;
                    }
                    let n: usize = String::from_utf8_lossy(&len).trim().parse().unwrap();
                    let mut msg = vec![0; n];
                    r.read_exact(&mut msg).unwrap();
                    sink.lock().unwrap().push(String::from_utf8(msg).unwrap());
                }
            });
        }
    });
    let out = cli_with(
        &["send"],
        &admin,
        &[],
        Some("{\"event_id\":\"s1\",\"device_id\":\"pc-siem\",\"event_type\":\"APP_CLI_SIEM\"}\n"),
    );
    assert_success(&out, "send");
    let out = cli_with(
        &["siem", "put"],
        &admin,
        &["soc", "--host", "127.0.0.1", "--port", "0"],
        None,
    );
    assert_failure(&out, "port 0", "port");
    let out = cli_with(
        &["siem", "put"],
        &admin,
        &[
            "soc",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--format",
            "cef",
            "--from",
            "beginning",
        ],
        None,
    );
    assert_success(&out, "siem put");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let got = received.lock().unwrap().clone();
        if let Some(m) = got.iter().find(|m| m.contains("externalId=s1")) {
            assert!(m.contains("CEF:0|fleet-events|fleet-events|"), "{m}");
            assert!(m.contains("dhost=pc-siem"), "{m}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not exported: {got:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let out = cli_with(&["siem", "destinations"], &admin, &[], None);
    assert_success(&out, "siem destinations");
    let table = stdout_of(&out);
    assert!(table.contains("soc"), "{table}");
    assert!(
        table.contains(&format!("tcp://127.0.0.1:{port}")),
        "{table}"
    );
    let out = cli_with(&["siem", "test"], &admin, &["soc"], None);
    assert_success(&out, "siem test");
    assert!(stdout_of(&out).contains("delivered"), "{}", stdout_of(&out));
    let out = cli_with(&["siem", "remove"], &admin, &["soc"], None);
    assert_success(&out, "siem remove");
    let out = cli_with(&["siem", "test"], &admin, &["soc"], None);
    assert_failure(&out, "a removed destination", "no SIEM destination");
    assert_eq!(server.terminate().code(), Some(0));
}
