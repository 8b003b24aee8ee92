"""Notifications end to end, against real receivers started by the test: email to an SMTP
server (``aiosmtpd``), a webhook to a local HTTP server, and a real executable. A type's rule
is set over gRPC, an event raised by a grpcio client, and what each receiver got is checked
field by field. Faults: the SMTP server down then up (nothing lost), the server restarted with
notifications queued (delivered after it), blocked events (never notified; the flood report
once), and every class of bad input (precise INVALID_ARGUMENT / NOT_FOUND, or a delivery
report naming the failure)."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from aiosmtpd.controller import Controller

from conftest import DEFAULT_CONFIG
from fleet_helpers import RPC_TIMEOUT, event, rpc_error
from fleetevents.v1 import fleetevents_pb2 as pb
from fleetevents.v1 import fleetevents_pb2_grpc as g

DEADLINE = 20.0
APP_TYPE = "PY_NOTIFY_DISK_ALERT"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, predicate, deadline: float = DEADLINE):
    """Polls predicate until it returns a truthy value or the deadline passes."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Mailbox:
    """An SMTP server (aiosmtpd) on a fixed port that keeps every message; stop and start it
    again to make an outage."""

    def __init__(self, port: int):
        self.port = port
        self.messages: list[tuple[list[str], object]] = []
        self._lock = threading.Lock()
        self._controller = None

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd handler hook
        with self._lock:
            self.messages.append((list(envelope.rcpt_tos), message_from_bytes(envelope.content)))
        return "250 Message accepted for delivery"

    def start(self):
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self):
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def received(self):
        with self._lock:
            return list(self.messages)


class Hook:
    """A local HTTP server that keeps every POST (headers and JSON) and answers `status`."""

    def __init__(self):
        self.calls: list[tuple[dict, dict]] = []
        self.status = 200
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                hook.calls.append(({k.lower(): v for k, v in self.headers.items()}, json.loads(body)))
                self.send_response(hook.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def mailbox():
    box = Mailbox(_free_port())
    box.start()
    yield box
    box.stop()


@pytest.fixture(scope="module")
def hook():
    h = Hook()
    yield h
    h.close()


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    """An executable that appends what it was given (arguments and FLEET_* variables) to a
    JSON-lines file."""
    d = tmp_path_factory.mktemp("program")
    out = d / "runs.jsonl"
    script = d / "notify.py"
    script.write_text(
        "#!/usr/bin/env python3\n"
        "import json, os, sys\n"
        f"with open({str(out)!r}, 'a') as f:\n"
        "    env = {k: v for k, v in os.environ.items() if k.startswith('FLEET_')}\n"
        "    f.write(json.dumps({'args': sys.argv[1:], 'env': env, 'keys': sorted(os.environ)}) + '\\n')\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script, out


def runs(out) -> list[dict]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def server_config() -> str:
    return DEFAULT_CONFIG + '\n[notify]\nretry_initial = "100ms"\nretry_max = "300ms"\ntimeout = "5s"\n'


def notifications(server):
    return g.NotificationServiceStub(server.channel)


def put_channels(server, mailbox, hook, program):
    n = notifications(server)
    script, _ = program
    n.PutChannel(pb.NotificationChannel(name="ops-mail", email=pb.EmailChannel(
        host="127.0.0.1", port=mailbox.port, security=pb.SMTP_SECURITY_PLAIN,
        to=["oncall@example.org", "lead@example.org"], **{"from": "fleet@example.org"})),
        timeout=RPC_TIMEOUT)
    n.PutChannel(pb.NotificationChannel(name="ops-hook", webhook=pb.WebhookChannel(url=hook.url)),
                 timeout=RPC_TIMEOUT)
    n.PutChannel(pb.NotificationChannel(name="ops-prog", program=pb.ProgramChannel(
        path=str(script), args=["%EVENT_TYPE%", "%PARAM:disk%", "$(touch /tmp/pwned); %%"],
        timeout_secs=10)), timeout=RPC_TIMEOUT)


def set_rule(server, event_type: str, channels: list[str], **fields):
    return server.catalog.UpdateEventTypeSettings(pb.UpdateEventTypeSettingsRequest(
        event_type=event_type, notify=True,
        notification=pb.NotificationRule(channels=channels, **fields)), timeout=RPC_TIMEOUT)


@pytest.fixture(scope="module")
def wired(server, mailbox, hook, program):
    server.catalog.RegisterEventType(pb.RegisterEventTypeRequest(
        event_type=APP_TYPE, severity=pb.SEVERITY_CRITICAL, display_name="Disk alert",
        description="A disk is failing", application="pytest"), timeout=RPC_TIMEOUT)
    put_channels(server, mailbox, hook, program)
    t = set_rule(server, APP_TYPE, ["ops-mail", "ops-hook", "ops-prog"],
                 subject="[%SEVERITY%] %EVENT% on %COMPUTER% (100%%)",
                 body="%DESCR%: disk %PARAM:disk% at %RISE_TIME% id %EVENT_ID%",
                 max_messages=100, period_secs=600)
    assert list(t.notification.channels) == ["ops-mail", "ops-hook", "ops-prog"]
    assert t.notification.max_messages == 100
    return server


def test_an_event_delivers_an_email_per_recipient_a_webhook_call_and_a_program_run(
        wired, mailbox, hook, program):
    _, out = program
    before_mail, before_hook, before_runs = len(mailbox.received()), len(hook.calls), len(runs(out))
    answer = wired.events.Classify(event("py-notify-1", APP_TYPE, event_id="n-1",
                                         params={"disk": "sda"}), timeout=RPC_TIMEOUT)
    assert answer.stored
    mails = wait_for("two emails", lambda: mailbox.received()[before_mail:]
                     if len(mailbox.received()) >= before_mail + 2 else None)
    assert sorted(r for rcpt, _ in mails for r in rcpt) == ["lead@example.org", "oncall@example.org"]
    for _, m in mails:
        assert m["Subject"] == "[CRITICAL] Disk alert on py-notify-1 (100%)"
        assert m["X-Fleet-Event-Id"] == "n-1"
        assert m["From"] == "fleet@example.org"
        body = m.get_payload(decode=True).decode().rstrip("\r\n")
        assert body.startswith("A disk is failing: disk sda at "), body
        assert body.endswith("id n-1"), body
    headers, call = wait_for("a webhook call", lambda: hook.calls[before_hook]
                             if len(hook.calls) > before_hook else None)
    assert headers["content-type"].startswith("application/json")
    assert call["event_id"] == "n-1"
    assert call["device_id"] == "py-notify-1"
    assert call["event_type"] == APP_TYPE
    assert call["severity"] == "CRITICAL"
    assert call["params"] == {"disk": "sda"}
    assert call["subject"] == "[CRITICAL] Disk alert on py-notify-1 (100%)"
    run = wait_for("a program run", lambda: runs(out)[before_runs]
                   if len(runs(out)) > before_runs else None)
    # Arguments rendered, never through a shell: the hostile one arrives verbatim.
    assert run["args"] == [APP_TYPE, "sda", "$(touch /tmp/pwned); %"]
    assert run["env"]["FLEET_EVENT_ID"] == "n-1"
    assert run["env"]["FLEET_COMPUTER"] == "py-notify-1"
    assert run["env"]["FLEET_PARAM_DISK"] == "sda"
    assert run["env"]["FLEET_SEVERITY"] == "CRITICAL"
    assert set(run["keys"]) - {k for k in run["keys"] if k.startswith("FLEET_")} <= {
        "PATH", "LANG", "PWD", "SHLVL", "_", "LC_CTYPE"}, run["keys"]
    # Exactly once each: nothing more arrives.
    time.sleep(0.5)
    assert len(mailbox.received()) == before_mail + 2
    assert len(hook.calls) == before_hook + 1
    assert len(runs(out)) == before_runs + 1


def test_a_resend_is_not_notified_again_and_a_type_without_rule_never_is(wired, hook):
    before = len(hook.calls)
    e = event("py-notify-2", APP_TYPE, event_id="n-2")
    wired.events.Classify(e, timeout=RPC_TIMEOUT)
    wired.events.Classify(e, timeout=RPC_TIMEOUT)
    wired.events.Classify(event("py-notify-2", "PY_NOTIFY_NO_RULE", event_id="n-3"),
                          timeout=RPC_TIMEOUT)
    wait_for("a webhook call", lambda: len(hook.calls) > before)
    time.sleep(0.5)
    assert [c["event_id"] for _, c in hook.calls[before:]] == ["n-2"]


def test_smtp_down_then_up_loses_nothing(wired, mailbox, hook):
    mailbox.stop()
    try:
        before_hook = len(hook.calls)
        for i in range(3):
            wired.events.Classify(event("py-notify-out", APP_TYPE, event_id=f"out-{i}"),
                                  timeout=RPC_TIMEOUT)
        # The webhook does not wait for the mail server.
        wait_for("three webhook calls", lambda: len(hook.calls) >= before_hook + 3)
        time.sleep(0.5)
    finally:
        before_mail = len(mailbox.received())
        mailbox.start()
    wait_for("six emails after the outage",
             lambda: len(mailbox.received()) >= before_mail + 6)
    time.sleep(0.5)
    ids = sorted(m["X-Fleet-Event-Id"] for _, m in mailbox.received()[before_mail:])
    assert ids == sorted([f"out-{i}" for i in range(3)] * 2), "each once per recipient"


def test_test_notification_reports_what_each_receiver_answered(wired, hook, program):
    n = notifications(wired)
    r = n.TestNotification(pb.TestNotificationRequest(event_type=APP_TYPE, device_id="pc-7"),
                           timeout=RPC_TIMEOUT)
    by = {(d.channel, d.recipient): d for d in r.deliveries}
    assert set(by) == {("ops-mail", "oncall@example.org"), ("ops-mail", "lead@example.org"),
                       ("ops-hook", "ops-hook"), ("ops-prog", "ops-prog")}
    assert all(d.delivered for d in r.deliveries), r
    assert by[("ops-mail", "lead@example.org")].smtp_code == 250
    assert by[("ops-hook", "ops-hook")].http_status == 200
    assert by[("ops-prog", "ops-prog")].HasField("exit_code")
    assert by[("ops-prog", "ops-prog")].exit_code == 0
    # A receiver that refuses: its status, not an error.
    hook.status = 503
    try:
        r = n.TestNotification(pb.TestNotificationRequest(event_type=APP_TYPE, channel="ops-hook"),
                               timeout=RPC_TIMEOUT)
    finally:
        hook.status = 200
    [d] = r.deliveries
    assert (d.delivered, d.http_status) == (False, 503)
    # A mail server that does not resolve, a failing program: clear delivery errors.
    n.PutChannel(pb.NotificationChannel(name="nowhere-mail", email=pb.EmailChannel(
        host="mail.invalid", port=25, to=["a@example.org"], **{"from": "f@example.org"})),
        timeout=RPC_TIMEOUT)
    n.PutChannel(pb.NotificationChannel(name="failing-prog", program=pb.ProgramChannel(
        path="/bin/false")), timeout=RPC_TIMEOUT)
    [d] = n.TestNotification(pb.TestNotificationRequest(event_type=APP_TYPE, channel="nowhere-mail"),
                             timeout=RPC_TIMEOUT).deliveries
    assert not d.delivered and "mail.invalid" in d.detail, d
    [d] = n.TestNotification(pb.TestNotificationRequest(event_type=APP_TYPE, channel="failing-prog"),
                             timeout=RPC_TIMEOUT).deliveries
    assert (d.delivered, d.exit_code) == (False, 1), d
    for name in ("nowhere-mail", "failing-prog"):
        n.RemoveChannel(pb.RemoveChannelRequest(name=name), timeout=RPC_TIMEOUT)


def test_channels_are_listed_with_secrets_redacted_and_kept_when_put_back(wired):
    n = notifications(wired)
    n.PutChannel(pb.NotificationChannel(name="secret-hook", webhook=pb.WebhookChannel(
        url="https://hooks.example.org/x", secret_header="X-Fleet-Secret", secret="s3cr3t")),
        timeout=RPC_TIMEOUT)
    listed = {c.name: c for c in n.ListChannels(pb.ListChannelsRequest(), timeout=RPC_TIMEOUT).channels}
    assert {"ops-mail", "ops-hook", "ops-prog", "secret-hook"} <= set(listed)
    assert listed["secret-hook"].webhook.secret == "***"
    again = n.PutChannel(listed["secret-hook"], timeout=RPC_TIMEOUT)
    assert again.webhook.secret == "***"
    gone = n.RemoveChannel(pb.RemoveChannelRequest(name="secret-hook"), timeout=RPC_TIMEOUT)
    assert gone.name == "secret-hook"
    e = rpc_error(n.RemoveChannel, pb.RemoveChannelRequest(name="secret-hook"))
    assert e.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("channel, field", [
    (pb.NotificationChannel(name="x"), "kind"),
    (pb.NotificationChannel(name="", webhook=pb.WebhookChannel(url="https://h/")), "name"),
    (pb.NotificationChannel(name="x", webhook=pb.WebhookChannel(
        url="http://h/", secret_header="X-S", secret="s")), "webhook.url"),
    (pb.NotificationChannel(name="x", webhook=pb.WebhookChannel(url="ftp://h/")), "webhook.url"),
    (pb.NotificationChannel(name="x", program=pb.ProgramChannel(path="/etc/passwd")), "program.path"),
    (pb.NotificationChannel(name="x", program=pb.ProgramChannel(path="relative/bin")), "program.path"),
    (pb.NotificationChannel(name="x", program=pb.ProgramChannel(path="/bin/true", timeout_secs=100000)),
     "program.timeout_secs"),
    (pb.NotificationChannel(name="x", program=pb.ProgramChannel(path="/bin/true", args=["%NOPE%"])),
     "program.args[0]"),
    (pb.NotificationChannel(name="x", email=pb.EmailChannel(host="h", port=25, to=["a@b"])), "email.from"),
    (pb.NotificationChannel(name="x", email=pb.EmailChannel(
        host="h", port=70000, to=["a@b"], **{"from": "f@b"})), "email.port"),
    (pb.NotificationChannel(name="x", email=pb.EmailChannel(
        host="h", port=25, to=["a@b\r\nBcc: c@d"], **{"from": "f@b"})), "email.to[0]"),
    (pb.NotificationChannel(name="x", email=pb.EmailChannel(
        host="h", port=25, security=pb.SMTP_SECURITY_PLAIN, username="u", password="p",
        to=["a@b"], **{"from": "f@b"})), "email.security"),
    (pb.NotificationChannel(name="x", email=pb.EmailChannel(
        host="h", port=25, security=99, to=["a@b"], **{"from": "f@b"})), "email.security"),
])
def test_a_bad_channel_is_refused_naming_its_field(wired, channel, field):
    e = rpc_error(notifications(wired).PutChannel, channel)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
    assert e.details().startswith(field), e.details()


@pytest.mark.parametrize("rule, words", [
    (pb.NotificationRule(channels=["ops-mail"], body="%EVENT% %NOPE%"), "%NOPE%"),
    (pb.NotificationRule(channels=["ops-mail"], subject="50% off"), "subject"),
    (pb.NotificationRule(channels=["ops-mail"], max_messages=10001), "max_messages"),
    (pb.NotificationRule(channels=["ops-mail"], period_secs=59), "period_secs"),
    (pb.NotificationRule(channels=["ops-mail", "ops-mail"]), "channels[1]"),
    (pb.NotificationRule(channels=["x" * 300]), "notification.channels[0]"),
])
def test_a_bad_rule_is_refused_naming_what_is_wrong(wired, rule, words):
    e = rpc_error(wired.catalog.UpdateEventTypeSettings,
                  pb.UpdateEventTypeSettingsRequest(event_type=APP_TYPE, notification=rule))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
    assert words in e.details(), e.details()
    # Nothing changed.
    t = wired.catalog.GetEventType(pb.GetEventTypeRequest(event_type=APP_TYPE), timeout=RPC_TIMEOUT)
    assert list(t.notification.channels) == ["ops-mail", "ops-hook", "ops-prog"]


def test_test_notification_refuses_unknown_names_and_a_type_without_rule(wired):
    n = notifications(wired)
    for req, code in [
        (pb.TestNotificationRequest(event_type="NO_SUCH_TYPE_X"), grpc.StatusCode.NOT_FOUND),
        (pb.TestNotificationRequest(event_type=APP_TYPE, channel="no-such-channel"),
         grpc.StatusCode.NOT_FOUND),
        (pb.TestNotificationRequest(event_type="KLSRV_EVENT_HOSTS_CONFLICT"),
         grpc.StatusCode.FAILED_PRECONDITION),
        (pb.TestNotificationRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.TestNotificationRequest(event_type=APP_TYPE, device_id="d" * 300),
         grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        e = rpc_error(n.TestNotification, req)
        assert e.code() == code, (req, e.details())
    # The server still serves.
    assert n.ListChannels(pb.ListChannelsRequest(), timeout=RPC_TIMEOUT).channels


def test_only_an_administrator_may_manage_channels(wired):
    token = wired.access.CreateToken(pb.CreateTokenRequest(name="py-notify-viewer", role=pb.ROLE_VIEWER),
                                     timeout=RPC_TIMEOUT).token
    viewer = g.NotificationServiceStub(wired.secure_channel(token=token))
    e = rpc_error(viewer.ListChannels, pb.ListChannelsRequest())
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    anonymous = g.NotificationServiceStub(wired.secure_channel(token=None))
    e = rpc_error(anonymous.TestNotification, pb.TestNotificationRequest(event_type=APP_TYPE))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED


def test_blocked_events_never_notify_and_the_flood_report_does_once(wired, hook):
    set_rule(wired, "KLSRV_EVENT_SPAM_EVENTS_DETECTED", ["ops-hook"])
    t = "PY_NOTIFY_FLOOD"
    wired.catalog.RegisterEventType(pb.RegisterEventTypeRequest(
        event_type=t, severity=pb.SEVERITY_WARNING, application="pytest"), timeout=RPC_TIMEOUT)
    set_rule(wired, t, ["ops-hook"], max_messages=100)
    before = len(hook.calls)
    for i in range(9):  # threshold 5: the 6th is the flood, blocked with the rest
        wired.events.Classify(event("py-flooder", t, event_id=f"f-{i}"), timeout=RPC_TIMEOUT)
    wait_for("six webhook calls", lambda: len(hook.calls) >= before + 6)
    time.sleep(1.0)
    got = [(c["event_type"], c["event_id"]) for _, c in hook.calls[before:]]
    assert sorted(e for tt, e in got if tt == t) == [f"f-{i}" for i in range(5)], got
    assert [tt for tt, _ in got].count("KLSRV_EVENT_SPAM_EVENTS_DETECTED") == 1, got
    assert len(got) == 6, got


def test_queued_notifications_survive_a_restart(server_factory, mailbox, hook, program):
    mailbox.stop()
    srv = server_factory(DEFAULT_CONFIG + '\n[notify]\nretry_initial = "100ms"\nretry_max = "200ms"\n',
                         name="restart")
    srv.start()
    try:
        put_channels(srv, mailbox, hook, program)
        srv.catalog.RegisterEventType(pb.RegisterEventTypeRequest(
            event_type=APP_TYPE, severity=pb.SEVERITY_CRITICAL, application="pytest"), timeout=RPC_TIMEOUT)
        set_rule(srv, APP_TYPE, ["ops-mail"])
        srv.events.Classify(event("py-restart", APP_TYPE, event_id="r-1"), timeout=RPC_TIMEOUT)
        time.sleep(0.5)
        srv.stop_and_check()
    finally:
        before = len(mailbox.received())
        mailbox.start()
    srv.start()
    wait_for("the queued email after the restart", lambda: len(mailbox.received()) >= before + 2)
    assert {m["X-Fleet-Event-Id"] for _, m in mailbox.received()[before:]} == {"r-1"}
