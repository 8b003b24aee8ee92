//! Delivery through a program channel: the executable runs without a shell, in its own
//! process group, with a clean environment holding the event's fields, its arguments rendered
//! from their templates, no standard input, and a deadline: past it the whole group is killed.
//! Only the tail of its standard error is kept, so a chatty program cannot grow the server.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::channels::ProgramChannel;
use super::template::{Placeholder, Template, value};
use crate::classify::ClassifiedEvent;

/// How much of a program's standard error is kept (its last bytes).
pub const STDERR_TAIL_BYTES: usize = 4 * 1024;

/// How long the rest of a program's standard error is read after it ended.
const READ_GRACE: Duration = Duration::from_secs(1);

/// What became of one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramOutcome {
    /// Its exit code; `None` when it was killed (by the deadline or a signal).
    pub exit_code: Option<i32>,
    /// Killed at its deadline.
    pub timed_out: bool,
    /// The end of what it wrote to standard error.
    pub stderr_tail: String,
}

impl ProgramOutcome {
    /// Whether the notification counts as delivered (exit code 0).
    pub fn delivered(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// The environment a program gets: `PATH`, `LANG`, and `FLEET_*` variables with the event's
/// fields (`FLEET_PARAM_<NAME>` for each parameter, its name upper-cased, other characters
/// than letters and digits as `_`), and the rendered subject and body.
pub fn environment(
    event: &ClassifiedEvent,
    server_id: &str,
    subject: &str,
    body: &str,
) -> Vec<(String, String)> {
    let field = |p: Placeholder| value(&p, event, server_id);
    let mut env = vec![
        ("PATH".to_owned(), "/usr/local/bin:/usr/bin:/bin".to_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ("FLEET_EVENT".to_owned(), field(Placeholder::Event)),
        ("FLEET_EVENT_TYPE".to_owned(), field(Placeholder::EventType)),
        (
            "FLEET_EVENT_TYPE_ID".to_owned(),
            field(Placeholder::EventTypeId),
        ),
        ("FLEET_EVENT_ID".to_owned(), field(Placeholder::EventId)),
        ("FLEET_SEVERITY".to_owned(), field(Placeholder::Severity)),
        ("FLEET_COMPUTER".to_owned(), field(Placeholder::Computer)),
        ("FLEET_DESCR".to_owned(), field(Placeholder::Descr)),
        ("FLEET_RISE_TIME".to_owned(), field(Placeholder::RiseTime)),
        (
            "FLEET_RECEIVED_TIME".to_owned(),
            field(Placeholder::ReceivedTime),
        ),
        ("FLEET_PRODUCT".to_owned(), field(Placeholder::Product)),
        ("FLEET_SERVER".to_owned(), field(Placeholder::Server)),
        ("FLEET_SUBJECT".to_owned(), subject.to_owned()),
        ("FLEET_BODY".to_owned(), body.to_owned()),
    ];
    let mut params: Vec<_> = event.params.iter().collect();
    params.sort();
    for (name, v) in params {
        let name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        env.push((format!("FLEET_PARAM_{name}"), v.clone()));
    }
    // A NUL cannot cross into a process's environment or arguments.
    for (_, v) in &mut env {
        v.retain(|c| c != '\0');
    }
    env
}

/// Runs `program` for `event`; an error only when it could not be started at all.
pub async fn run(
    program: &ProgramChannel,
    event: &ClassifiedEvent,
    server_id: &str,
    subject: &str,
    body: &str,
) -> std::io::Result<ProgramOutcome> {
    let args: Vec<String> = program
        .args
        .iter()
        .map(|a| {
            // Checked when the channel was saved; a template that no longer parses is passed
            // as written.
            Template::parse(a)
                .map(|t| t.render(event, server_id))
                .unwrap_or_else(|_| a.clone())
                .replace('\0', "")
        })
        .collect();
    let mut child = tokio::process::Command::new(&program.path)
        .args(&args)
        .env_clear()
        .envs(environment(event, server_id, subject, body))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let group = child.id();
    // The tail is read by a task of its own, so a grandchild that keeps the pipe open after
    // the program ended cannot hold the delivery.
    let tail = Arc::new(Mutex::new(Vec::new()));
    let reader = child.stderr.take().map(|mut err| {
        let tail = tail.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = err.read(&mut buf).await {
                let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                t.extend_from_slice(&buf[..n]);
                if t.len() > STDERR_TAIL_BYTES {
                    let excess = t.len() - STDERR_TAIL_BYTES;
                    t.drain(..excess);
                }
            }
        })
    });
    let (exit_code, timed_out) = match tokio::time::timeout(program.timeout, child.wait()).await {
        Ok(status) => (status?.code(), false),
        Err(_) => {
            kill_group(group);
            let _ = child.wait().await;
            (None, true)
        }
    };
    if let Some(mut reader) = reader
        && tokio::time::timeout(READ_GRACE, &mut reader).await.is_err()
    {
        reader.abort();
    }
    let tail = tail.lock().unwrap_or_else(|e| e.into_inner());
    Ok(ProgramOutcome {
        exit_code,
        timed_out,
        stderr_tail: String::from_utf8_lossy(&tail).into_owned(),
    })
}

/// Kills the process group the program leads (its own children included).
fn kill_group(group: Option<u32>) {
    if let Some(pid) = group.and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill only sends a signal; a negative pid names the group the child leads.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn event() -> ClassifiedEvent {
        crate::notify::testing::event("e-7", "laptop; rm -rf /", &[("error-code", "$(reboot)")])
    }

    fn script(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("notify.sh");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// Arguments and environment arrive as values, never interpreted by a shell, and the
    /// server's own environment does not leak in.
    #[tokio::test]
    async fn fields_arrive_as_values_not_as_shell_text() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let program = ProgramChannel {
            path: script(
                dir.path(),
                &format!(
                    "printf '%s|%s|%s|%s|%s|%s\\n' \"$1\" \"$2\" \"$FLEET_COMPUTER\" \
                     \"$FLEET_PARAM_ERROR_CODE\" \"$FLEET_SUBJECT\" \"${{HOME:-unset}}\" > {}",
                    out.display()
                ),
            ),
            args: vec!["%COMPUTER%".into(), "%EVENT_TYPE_ID%".into()],
            timeout: Duration::from_secs(10),
        };
        let r = run(&program, &event(), "srv", "the subject", "the body")
            .await
            .unwrap();
        assert!(r.delivered(), "{r:?}");
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "laptop; rm -rf /|4102|laptop; rm -rf /|$(reboot)|the subject|unset\n"
        );
    }

    #[tokio::test]
    async fn a_failing_program_reports_its_code_and_stderr_tail() {
        let dir = tempfile::tempdir().unwrap();
        let program = ProgramChannel {
            path: script(
                dir.path(),
                "i=0; while [ $i -lt 2000 ]; do echo \"line $i\" >&2; i=$((i+1)); done; exit 3",
            ),
            args: vec![],
            timeout: Duration::from_secs(10),
        };
        let r = run(&program, &event(), "srv", "s", "b").await.unwrap();
        assert_eq!(r.exit_code, Some(3));
        assert!(!r.delivered());
        assert!(r.stderr_tail.len() <= STDERR_TAIL_BYTES);
        assert!(r.stderr_tail.ends_with("line 1999\n"), "{}", r.stderr_tail);
    }

    /// A program that hangs (and leaves a child holding its stderr) is killed at its deadline,
    /// with its group.
    #[tokio::test]
    async fn a_hanging_program_is_killed_at_its_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let program = ProgramChannel {
            path: script(dir.path(), "sleep 60 & sleep 60"),
            args: vec![],
            timeout: Duration::from_millis(300),
        };
        let started = Instant::now();
        let r = run(&program, &event(), "srv", "s", "b").await.unwrap();
        assert!(r.timed_out);
        assert_eq!(r.exit_code, None);
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[tokio::test]
    async fn a_program_that_cannot_start_is_an_error() {
        let program = ProgramChannel {
            path: "/nonexistent/notify".into(),
            args: vec![],
            timeout: Duration::from_secs(1),
        };
        assert!(run(&program, &event(), "srv", "s", "b").await.is_err());
    }
}
