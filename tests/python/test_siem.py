"""SIEM export end to end, against a real syslog receiver: Debian's ``rsyslogd``, started by
the test (``rsyslog_harness.py``) on loopback with a plain TCP input (RFC 6587 octet
counting), a TLS input (RFC 5425, a certificate from a CA the harness makes) and a UDP
input, writing every message it receives, exactly as received, to a file per input.

A destination is put over gRPC (``SiemService``), events are raised by a grpcio client, and
what rsyslog wrote is parsed back here field by field: the RFC 5424 header and structured
data (with its escapes), CEF (header pipes and extension escapes) and LEEF 2.0 (tab
delimited). Faults: rsyslog killed in the middle of an export and brought back on the same
port (every event at least once, in order), fleet-events restarted with a destination (the
cursor survives), TLS failures (a report, not an error; the server keeps serving), and every
class of bad input.

Several destinations in one test share one rsyslog; each has a facility of its own, so the
PRI of a message tells which destination sent it. Each test marks its events with a device id
of its own. Nothing waits on a bare sleep for the server: everything polls with a deadline.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from fleet_helpers import RPC_TIMEOUT, event, rpc_error, ts
from fleetevents.v1 import fleetevents_pb2 as pb
from fleetevents.v1 import fleetevents_pb2_grpc as g
from rsyslog_harness import RsyslogHarness, free_port, make_ca, octet_counted

DEADLINE = 20.0
# [siem] timings for the tests: a connect, handshake or send gives up after SIEM_TIMEOUT; a
# destination retries fast; after a broken connection, what the receiver acknowledged in the
# last REPLAY_SECS is sent again.
SIEM_TIMEOUT = "3s"
REPLAY_SECS = 1.0
METRICS_TOKEN = "py-siem-metrics-token-5c1e"

SD_ID = "fleet@32473"
PARAMS_SD_ID = "params@32473"
APP_NAME = "fleet-events"
BOM = "\ufeff"

# Event types this module registers: (type, numeric id or 0, severity, display name).
T_APP = "PYSIEM_APP_ALERT"
T_NOID = "PYSIEM_NOID_INFO"
T_INFO = "PYSIEM_F_INFO"
T_WARN = "PYSIEM_F_WARN"
T_CRIT = "PYSIEM_F_CRIT"
T_HIST = "PYSIEM_HIST"
T_OUT = "PYSIEM_OUTAGE"
T_LIVE = "PYSIEM_LIVE_ONLY"
T_WARM = "PYSIEM_LIVE_WARMUP"
T_MET = "PYSIEM_METRICS"
T_UDP = "PYSIEM_UDP"
T_RST = "PYSIEM_RESTART"
T_TLS = "PYSIEM_TLS"
TYPES = [
    (T_APP, 71001, pb.SEVERITY_CRITICAL, "Disk alert (siem)"),
    (T_NOID, 0, pb.SEVERITY_INFO, "Info without id"),
    (T_INFO, 71011, pb.SEVERITY_INFO, "Filter info"),
    (T_WARN, 71012, pb.SEVERITY_WARNING, "Filter warning"),
    (T_CRIT, 71013, pb.SEVERITY_CRITICAL, "Filter critical"),
    (T_HIST, 71021, pb.SEVERITY_WARNING, "History"),
    (T_OUT, 71031, pb.SEVERITY_WARNING, "Outage"),
    (T_LIVE, 71041, pb.SEVERITY_WARNING, "Live only"),
    (T_WARM, 71042, pb.SEVERITY_INFO, "Live warm-up"),
    (T_MET, 71051, pb.SEVERITY_FUNCTIONAL_FAILURE, "Metrics"),
    (T_UDP, 71061, pb.SEVERITY_INFO, "Over UDP"),
    (T_RST, 71071, pb.SEVERITY_WARNING, "Restart"),
    (T_TLS, 71081, pb.SEVERITY_FUNCTIONAL_FAILURE, "Over TLS"),
]
DISPLAY = {t: name for t, _, _, name in TYPES}
TYPE_ID = {t: i for t, i, _, _ in TYPES}
SEVERITY = {t: s for t, _, s, _ in TYPES}

# RFC 5424 table 2, and the CEF/LEEF 0-10 scale (src/siem/format.rs).
SYSLOG_SEVERITY = {pb.SEVERITY_CRITICAL: 2, pb.SEVERITY_FUNCTIONAL_FAILURE: 3, pb.SEVERITY_WARNING: 4, pb.SEVERITY_INFO: 6}
SCALE_SEVERITY = {pb.SEVERITY_CRITICAL: 10, pb.SEVERITY_FUNCTIONAL_FAILURE: 7, pb.SEVERITY_WARNING: 5, pb.SEVERITY_INFO: 3}



# ------------------------------------------------------------------------------------------
# Parsers: RFC 5424, CEF, LEEF (written from the RFC and the vendors' specifications, to
# read back what the server wrote)
# ------------------------------------------------------------------------------------------


@dataclass
class Syslog:
    pri: int
    version: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    sd: dict[str, dict[str, str]] = field(default_factory=dict)
    msg: str = ""

    @property
    def facility(self) -> int:
        return self.pri // 8

    @property
    def severity(self) -> int:
        return self.pri % 8

    @property
    def text(self) -> str:
        """MSG without its BOM."""
        return self.msg[1:] if self.msg.startswith(BOM) else self.msg


_HEADER = re.compile(r"<(\d{1,3})>([1-9]\d{0,2}) (\S+) (\S+) (\S+) (\S+) (\S+) ")
_SD_NAME = re.compile(r"[!#-~]+?(?=[= \]\"])")  # PRINTUSASCII except '=', SP, ']', '"'


def parse_rfc5424(line: str) -> Syslog:
    """An RFC 5424 message: the header, every SD-ELEMENT (with `\\"`, `\\\\`, `\\]` undone in
    PARAM-VALUEs; another backslash stays), and MSG. Raises ValueError on a malformed one."""
    m = _HEADER.match(line)
    if not m:
        raise ValueError(f"not an RFC 5424 header: {line[:80]!r}")
    pri = int(m.group(1))
    if pri > 191:
        raise ValueError(f"PRI {pri} out of range")
    for i, max_len in ((4, 255), (5, 48), (6, 128), (7, 32)):
        if len(m.group(i)) > max_len:
            raise ValueError(f"header field {i} longer than {max_len}: {m.group(i)!r}")
    s = Syslog(pri, int(m.group(2)), m.group(3), m.group(4), m.group(5), m.group(6), m.group(7))
    rest, i = line, m.end()
    if rest.startswith("-", i):
        i += 1
    else:
        if not rest.startswith("[", i):
            raise ValueError(f"no STRUCTURED-DATA at {rest[i:i + 20]!r}")
        while i < len(rest) and rest[i] == "[":
            i += 1
            n = _SD_NAME.match(rest, i)
            if not n:
                raise ValueError(f"bad SD-ID at {rest[i:i + 20]!r}")
            sd_id, i = n.group(0), n.end()
            if sd_id in s.sd:
                raise ValueError(f"SD-ID {sd_id} twice")
            params: dict[str, str] = {}
            while True:
                if rest.startswith("]", i):
                    i += 1
                    break
                if not rest.startswith(" ", i):
                    raise ValueError(f"expected SP or ] at {rest[i:i + 20]!r}")
                i += 1
                n = _SD_NAME.match(rest, i)
                if not n or not rest.startswith('="', n.end()):
                    raise ValueError(f"bad SD-PARAM at {rest[i:i + 20]!r}")
                name, i = n.group(0), n.end() + 2
                value = []
                while True:
                    if i >= len(rest):
                        raise ValueError("unterminated PARAM-VALUE")
                    c = rest[i]
                    if c == "\\" and i + 1 < len(rest) and rest[i + 1] in '"\\]':
                        value.append(rest[i + 1])
                        i += 2
                    elif c == '"':
                        i += 1
                        break
                    elif c == "]":
                        raise ValueError(f"unescaped ] in PARAM-VALUE of {name}")
                    else:
                        value.append(c)
                        i += 1
                if name in params:
                    raise ValueError(f"SD-PARAM {name} twice in {sd_id}")
                params[name] = "".join(value)
            s.sd[sd_id] = params
    if i < len(rest):
        if rest[i] != " ":
            raise ValueError(f"expected SP before MSG at {rest[i:i + 20]!r}")
        s.msg = rest[i + 1:]
    return s


def parse_rfc3339(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def parse_cef(record: str) -> tuple[list[str], dict[str, str]]:
    """CEF:0|Vendor|Product|Version|SignatureID|Name|Severity|Extension: seven header fields
    (where `\\|` and `\\\\` are escapes) and the extension as key=value pairs, a key being
    the word before an unescaped '=' (`\\=`, `\\\\`, `\\n`, `\\r` escapes in values)."""
    header: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(record) and len(header) < 7:
        c = record[i]
        if c == "\\" and i + 1 < len(record) and record[i + 1] in "\\|":
            cur.append(record[i + 1])
            i += 2
            continue
        if c == "|":
            header.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    if len(header) != 7:
        raise ValueError(f"CEF header has {len(header)} fields: {record[:80]!r}")
    ext = record[i:]
    # Tokens split at unescaped '=': "<key>", "<value> <key>", ..., "<value>".
    tokens: list[str] = []
    cur = []
    j = 0
    while j < len(ext):
        c = ext[j]
        if c == "\\" and j + 1 < len(ext):
            nxt = ext[j + 1]
            cur.append({"n": "\n", "r": "\r"}.get(nxt, nxt))
            j += 2
            continue
        if c == "=":
            tokens.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        j += 1
    tokens.append("".join(cur))
    out: dict[str, str] = {}
    if len(tokens) < 2:
        return header, out
    key = tokens[0]
    for k, text in enumerate(tokens[1:], start=1):
        if k < len(tokens) - 1:
            at = text.rfind(" ")
            if at < 0:
                raise ValueError(f"CEF extension: no key before '=' in {text!r}")
            value, next_key = text[:at], text[at + 1:]
        else:
            value, next_key = text, ""
        if key in out:
            raise ValueError(f"CEF extension key {key} twice")
        out[key] = value
        key = next_key
    return header, out


def parse_leef(record: str) -> tuple[list[str], dict[str, str]]:
    """LEEF:2.0|Vendor|Product|Version|EventID|DelimiterChar|attributes: six header fields
    and the attributes, split at the delimiter (x09: a tab), each at its first '='."""
    parts = record.split("|", 6)
    if len(parts) != 7:
        raise ValueError(f"LEEF header has {len(parts) - 1} fields: {record[:80]!r}")
    header, body = parts[:6], parts[6]
    delim = header[5]
    if delim.lower().startswith(("x", "0x")):
        delim = chr(int(delim.lower().lstrip("0").lstrip("x"), 16))
    attrs: dict[str, str] = {}
    for kv in body.split(delim):
        k, sep, v = kv.partition("=")
        if not sep:
            raise ValueError(f"LEEF attribute without '=': {kv!r}")
        if k in attrs:
            raise ValueError(f"LEEF attribute {k} twice")
        attrs[k] = v
    return header, attrs


def device_of(line: str) -> str | None:
    """The device an exported message is about, in any of the three formats."""
    try:
        s = parse_rfc5424(line)
    except ValueError:
        return None
    if SD_ID in s.sd:
        return s.sd[SD_ID].get("device")
    text = s.text
    try:
        if text.startswith("CEF:"):
            return parse_cef(text)[1].get("dhost")
        if text.startswith("LEEF:"):
            return parse_leef(text)[1].get("identHostName")
    except ValueError:
        return None
    return None


def event_id_of(line: str) -> str | None:
    s = parse_rfc5424(line)
    if SD_ID in s.sd:
        return s.sd[SD_ID].get("event_id")
    text = s.text
    if text.startswith("CEF:"):
        return parse_cef(text)[1].get("externalId")
    if text.startswith("LEEF:"):
        return parse_leef(text)[1].get("externalId")
    return None


def from_devices(prefix: str, facility: int | None = None):
    """A selector of the messages about devices whose id starts with prefix (and, when given,
    of one facility: one destination)."""
    def select(line: str) -> bool:
        d = device_of(line)
        if d is None or not d.startswith(prefix):
            return False
        return facility is None or parse_rfc5424(line).facility == facility
    return select


# ------------------------------------------------------------------------------------------
# Fixtures and helpers
# ------------------------------------------------------------------------------------------


def siem_config(metrics_port: int, token_file: Path) -> str:
    # The default flood threshold (5 per device and type) would block a stream of events.
    return f"""\
[flood]
threshold = 100000
window = "3600s"
block = "3600s"

[store]
max_events = 400000

[siem]
timeout = "{SIEM_TIMEOUT}"
retry_initial = "100ms"
retry_max = "500ms"
replay = "{int(REPLAY_SECS * 1000)}ms"

[metrics]
listen = "127.0.0.1:{metrics_port}"
token_file = "{token_file}"
"""


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def metrics_token_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("siem-metrics") / "metrics.token"
    p.write_text(METRICS_TOKEN + "\n")
    return p


@pytest.fixture(scope="module")
def server_config(metrics_port, metrics_token_file) -> str:
    return siem_config(metrics_port, metrics_token_file)


def register_types(srv) -> None:
    for t, type_id, sev, name in TYPES:
        try:
            srv.catalog.RegisterEventType(pb.RegisterEventTypeRequest(
                event_type=t, event_type_id=type_id, severity=sev, display_name=name,
                application="pytest"), timeout=RPC_TIMEOUT)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise


@pytest.fixture(scope="module")
def types(server):
    register_types(server)
    return server


@pytest.fixture
def harness_factory(tmp_path):
    """Starts rsyslog receivers of the test's own; every one is killed at the end."""
    made: list[RsyslogHarness] = []

    def make(tls: bool = True, udp: bool = True, start: bool = True) -> RsyslogHarness:
        h = RsyslogHarness(tmp_path / f"rsyslog-{len(made)}", tls=tls, udp=udp)
        made.append(h)
        if start:
            h.start()
        return h

    yield make
    for h in made:
        h.close()


@pytest.fixture
def rsyslog(harness_factory) -> RsyslogHarness:
    return harness_factory()


class Siem:
    """SiemService on a server's admin channel; removes the destinations it put at the end."""

    def __init__(self, srv):
        self.srv = srv
        self.names: set[str] = set()

    @property
    def stub(self):
        # The channel is new after a restart of the server.
        return g.SiemServiceStub(self.srv.channel)

    def put(self, d: pb.SiemDestination) -> pb.SiemDestinationStatus:
        st = self.stub.PutDestination(d, timeout=RPC_TIMEOUT)
        self.names.add(d.name)
        return st

    def list(self) -> dict[str, pb.SiemDestinationStatus]:
        resp = self.stub.ListDestinations(pb.ListDestinationsRequest(), timeout=RPC_TIMEOUT)
        return {s.destination.name: s for s in resp.destinations}

    def status(self, name: str) -> pb.SiemDestinationStatus:
        got = self.list()
        assert name in got, f"{name} not listed: {sorted(got)}"
        return got[name]

    def test(self, name: str) -> pb.TestDestinationResponse:
        return self.stub.TestDestination(pb.TestDestinationRequest(name=name), timeout=30)

    def remove(self, name: str) -> pb.SiemDestination:
        gone = self.stub.RemoveDestination(pb.RemoveDestinationRequest(name=name),
                                           timeout=RPC_TIMEOUT)
        self.names.discard(name)
        return gone

    def cleanup(self) -> None:
        if self.srv.proc is None or self.srv.channel is None:
            return
        for name in sorted(self.names):
            try:
                self.remove(name)
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.NOT_FOUND,
                                    grpc.StatusCode.INVALID_ARGUMENT):
                    raise


@pytest.fixture
def siem(types):
    s = Siem(types)
    yield s
    s.cleanup()


def dest(name: str, port: int, transport=pb.SYSLOG_TRANSPORT_TCP, fmt=pb.SIEM_FORMAT_RFC5424,
         **fields) -> pb.SiemDestination:
    return pb.SiemDestination(name=name, host="127.0.0.1", port=port, transport=transport,
                              format=fmt, **fields)


def wait_for(what: str, predicate, deadline: float = DEADLINE):
    """Polls predicate until it returns something truthy (returned) or the deadline passes."""
    end = time.monotonic() + deadline
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {deadline:.0f} s waiting for {what}")
        time.sleep(0.05)


def status_when(siem: "Siem", name: str, what: str, cond,
                deadline: float = DEADLINE) -> pb.SiemDestinationStatus:
    """Polls ListDestinations until the status of `name` satisfies cond; returns it."""
    last = []

    def check():
        last[:] = [siem.status(name)]
        return last[0] if cond(last[0]) else None

    try:
        return wait_for(f"{name}: {what}", check, deadline)
    except AssertionError as e:
        raise AssertionError(f"{e}; last status: {last[0] if last else None}") from None


def base_time() -> dt.datetime:
    """A past occurred_at, whole microseconds (what the server keeps)."""
    return (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=10)).replace(microsecond=123456)


def classify(srv, e: pb.Event) -> pb.Classification:
    return srv.events.Classify(e, timeout=RPC_TIMEOUT)


def stream(srv, events: list[pb.Event], timeout: float = 60.0) -> list[pb.Classification]:
    """Sends events on one Stream call; returns the answers."""
    return list(srv.events.Stream(iter(events), timeout=timeout))


def scrape(port: int) -> tuple[dict[tuple[str, tuple], float], dict[str, str]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    req.add_header("Authorization", f"Bearer {METRICS_TOKEN}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = resp.read().decode()
    samples, kinds = {}, {}
    for family in text_string_to_metric_families(body):
        kinds[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, kinds


def ms(when: dt.datetime) -> int:
    """Milliseconds since the epoch, truncated (as the server writes them)."""
    return (when - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(milliseconds=1)


def check_rfc5424(line: str, e: pb.Event, facility: int, t0: dt.datetime,
                  event_type: str | None = None) -> Syslog:
    """One exported RFC 5424 message against the event it stands for, field by field."""
    t = event_type or e.event_type
    s = parse_rfc5424(line)
    assert s.pri == facility * 8 + SYSLOG_SEVERITY[SEVERITY[t]], line
    assert s.version == 1
    assert parse_rfc3339(s.timestamp) == e.occurred_at.ToDatetime(dt.timezone.utc), s.timestamp
    assert re.fullmatch(r"[!-~]{1,255}", s.hostname), s.hostname
    assert (s.app_name, s.procid, s.msgid) == (APP_NAME, "-", t)
    fleet = dict(s.sd[SD_ID])
    received = parse_rfc3339(fleet.pop("received_at"))
    assert t0 - dt.timedelta(seconds=1) <= received <= dt.datetime.now(dt.timezone.utc) + \
        dt.timedelta(seconds=1), received
    want = {"event_id": e.event_id, "event_type": t, "severity": pb.Severity.Name(SEVERITY[t]).removeprefix("SEVERITY_"),
            "device": e.device_id, "application": e.application}
    if TYPE_ID[t]:
        want["event_type_id"] = str(TYPE_ID[t])
    assert fleet == want, line
    if e.params:
        assert s.sd[PARAMS_SD_ID] == dict(e.params), line
        assert set(s.sd) == {SD_ID, PARAMS_SD_ID}
    else:
        assert set(s.sd) == {SD_ID}
    assert s.msg == f"{BOM}{DISPLAY[t]} on {e.device_id}", repr(s.msg)
    return s


def check_cef(line: str, e: pb.Event, facility: int, t0: dt.datetime, t1: dt.datetime) -> None:
    """One exported CEF record (in its syslog message) against its event, field by field."""
    t = e.event_type
    s = parse_rfc5424(line)
    assert s.pri == facility * 8 + SYSLOG_SEVERITY[SEVERITY[t]], line
    assert s.app_name == APP_NAME, line
    assert parse_rfc3339(s.timestamp) == e.occurred_at.ToDatetime(dt.timezone.utc), s.timestamp
    header, ext = parse_cef(s.text)
    assert header[:3] == ["CEF:0", "fleet-events", "fleet-events"], header
    assert header[3], "a version"
    assert header[4:] == [str(TYPE_ID[t]) if TYPE_ID[t] else t, DISPLAY[t],
                          str(SCALE_SEVERITY[SEVERITY[t]])], header
    rt = int(ext.pop("rt"))
    assert ms(t0) - 1000 <= rt <= ms(t1) + 1000, rt
    want = {"externalId": e.event_id, "dhost": e.device_id,
            "end": str(ms(e.occurred_at.ToDatetime(dt.timezone.utc))), "cat": t,
            "app": e.application}
    if e.params:
        assert ext.pop("cs2Label") == "params"
        assert json.loads(ext.pop("cs2")) == dict(e.params)
    assert ext == want, line


def check_leef(line: str, e: pb.Event, facility: int) -> None:
    """One exported LEEF 2.0 record (in its syslog message) against its event."""
    t = e.event_type
    s = parse_rfc5424(line)
    assert s.pri == facility * 8 + SYSLOG_SEVERITY[SEVERITY[t]], line
    assert s.app_name == APP_NAME, line
    assert parse_rfc3339(s.timestamp) == e.occurred_at.ToDatetime(dt.timezone.utc), s.timestamp
    header, attrs = parse_leef(s.text)
    assert header[:3] == ["LEEF:2.0", "fleet-events", "fleet-events"], header
    assert header[3], "a version"
    assert header[4:] == [str(TYPE_ID[t]) if TYPE_ID[t] else t, "x09"], header
    want = {"devTime": str(ms(e.occurred_at.ToDatetime(dt.timezone.utc))),
            "devTimeFormat": "epoch-ms", "sev": str(SCALE_SEVERITY[SEVERITY[t]]), "cat": t,
            "identHostName": e.device_id, "externalId": e.event_id, "app": e.application,
            "name": DISPLAY[t]}
    for k, v in e.params.items():
        key = re.sub(r"[^A-Za-z0-9]", "_", k)
        want[f"param_{key}"] = re.sub(r"[\t\r\n]", " ", v)
    assert attrs == want, line


# ------------------------------------------------------------------------------------------
# The harness alone (no fleet-events server)
# ------------------------------------------------------------------------------------------


def test_harness_receives_octet_counted_tcp_and_tls(harness_factory, tmp_path):
    h = harness_factory()
    msgs = [
        '<134>1 2026-01-02T03:04:05.123456Z host fleet-events - T [fleet@32473 k="a\\"b\\]c\\\\"]'
        f' {BOM}héllo\ttab "quoted"',
        "<13>1 - - - - - - two\nlines and 日本語 ✓",
        "<14>1 2026-01-02T03:04:05Z h a - - - " + "x" * 5000,
    ]
    with socket.create_connection((h.host, h.tcp_port), timeout=5) as s:
        for m in msgs:
            s.sendall(octet_counted(m))
    assert h.wait_for_lines(3, kind="tcp") == msgs
    # TLS, by name and by address, verified against the harness's CA.
    for name in ("localhost", "127.0.0.1"):
        with h.tls_connect(server_hostname=name) as t:
            for m in msgs:
                t.sendall(octet_counted(m))
    assert h.wait_for_lines(6, kind="tls") == msgs * 2
    # A CA the receiver's certificate is not from is refused by the client.
    other, _, _ = make_ca(tmp_path, "other")
    import ssl

    ctx = ssl.create_default_context(cafile=str(other))
    with socket.create_connection((h.host, h.tls_port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname="localhost")
    # UDP: one datagram, one message.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.sendto(msgs[0].encode(), (h.host, h.udp_port))
    assert h.wait_for_lines(1, kind="udp") == [msgs[0]]
    # The parser reads the first message back.
    p = parse_rfc5424(msgs[0])
    assert (p.pri, p.hostname, p.app_name, p.msgid) == (134, "host", "fleet-events", "T")
    assert p.sd == {"fleet@32473": {"k": 'a"b]c\\'}}
    assert p.text == 'héllo\ttab "quoted"'
    # Killed with a connection open, then back on the same ports: appends.
    held = socket.create_connection((h.host, h.tcp_port), timeout=5)
    tcp_port, tls_port = h.tcp_port, h.tls_port
    assert h.kill() == -9
    held.close()
    h.start()
    assert (h.tcp_port, h.tls_port) == (tcp_port, tls_port)
    with socket.create_connection((h.host, h.tcp_port), timeout=5) as s:
        s.sendall(octet_counted("after restart"))
    assert h.wait_for_lines(4, kind="tcp")[3] == "after restart"
    assert h.stop() == 0
    # Nothing of rsyslog's own (start messages, TLS errors) among the received messages.
    assert h.lines("tcp") == msgs + ["after restart"]


def test_parsers_read_back_cef_and_leef():
    header, ext = parse_cef(
        "CEF:0|fleet-events|fleet-events|0.1\\|b|4102|Name \\\\ x|5|externalId=e 1 "
        "dhost=laptop 42 cs2={\"a\\=b\":\"c\\\\d\\n\"}")
    assert header == ["CEF:0", "fleet-events", "fleet-events", "0.1|b", "4102", "Name \\ x", "5"]
    assert ext == {"externalId": "e 1", "dhost": "laptop 42", "cs2": '{"a=b":"c\\d\n"}'}
    header, attrs = parse_leef("LEEF:2.0|fleet-events|fleet-events|0.1|4102|x09|"
                               "sev=5\tname=a|b=c\tparam_x=y z")
    assert header[4:] == ["4102", "x09"]
    assert attrs == {"sev": "5", "name": "a|b=c", "param_x": "y z"}


# ------------------------------------------------------------------------------------------
# Against the server
# ------------------------------------------------------------------------------------------


def test_rfc5424_over_tcp_every_event_once_in_order_field_by_field(siem, rsyslog):
    srv = siem.srv
    prefix = "py-siem-5424-"
    # Stored before the destination exists: not exported (start_from absent).
    classify(srv, event(prefix + "pre", T_APP, event_id="pre-0"))
    st = siem.put(dest("tcp-5424", rsyslog.tcp_port, facility=16))
    d = st.destination
    assert (d.name, d.host, d.port, d.transport, d.format, d.facility) == (
        "tcp-5424", "127.0.0.1", rsyslog.tcp_port, pb.SYSLOG_TRANSPORT_TCP,
        pb.SIEM_FORMAT_RFC5424, 16)
    # A test message: handed over, and rsyslog got exactly the message reported.
    r = siem.test("tcp-5424")
    assert r.delivered, r
    assert r.message and r.message.startswith("<")
    rsyslog.wait_for_lines(1, select=lambda m: m == r.message)

    t0 = dt.datetime.now(dt.timezone.utc)
    base = base_time()
    sent = []
    for i in range(50):
        e = event(f"{prefix}{i % 3}", T_APP, event_id=f"s5424-{i:03}",
                  occurred_at=base + dt.timedelta(seconds=i, microseconds=i),
                  params={"quote": f'say "hi" {i}', "bracket": "a]b[c", "backslash": "C:\\temp\\",
                          "unicode": "Grüße 日本 ✓ ё", "n": str(i)})
        assert classify(srv, e).stored
        sent.append(e)
    sentinel = event(prefix + "end", T_APP, event_id="s5424-end")
    classify(srv, sentinel)
    rsyslog.wait_for_lines(1, select=lambda m: "s5424-end" in m and from_devices(prefix)(m))
    got = [m for m in rsyslog.lines() if from_devices(prefix)(m)]
    ids = [event_id_of(m) for m in got]
    assert ids == [e.event_id for e in sent] + ["s5424-end"], "each once, in order, none before"
    for line, e in zip(got, sent):
        check_rfc5424(line, e, 16, t0)
    s = status_when(siem, "tcp-5424", "caught up", lambda x: x.behind == 0 and x.lag_seconds == 0)
    assert s.connected and s.last_error == "" and s.failures == 0, s
    assert s.sent >= 51, s
    assert s.cursor > 0


def test_tls_delivers_with_the_ca_and_reports_what_fails(siem, rsyslog, tmp_path):
    srv = siem.srv
    other_ca, _, _ = make_ca(tmp_path, "unrelated")
    tls = dict(transport=pb.SYSLOG_TRANSPORT_TLS, ca_file=str(rsyslog.ca_file))
    siem.put(dest("tls-ip", rsyslog.tls_port, facility=16, **tls))
    siem.put(dest("tls-name", rsyslog.tls_port, facility=17, server_name="localhost", **tls))
    # Failures: TLS to the plain TCP port, a name the certificate does not carry, a CA that
    # did not issue it.
    siem.put(dest("tls-plain-port", rsyslog.tcp_port, facility=18, **tls))
    siem.put(dest("tls-wrong-name", rsyslog.tls_port, facility=19,
                  server_name="wrong.example.org", **tls))
    siem.put(dest("tls-wrong-ca", rsyslog.tls_port, facility=20,
                  transport=pb.SYSLOG_TRANSPORT_TLS, ca_file=str(other_ca)))
    prefix = "py-siem-tls-"
    t0 = dt.datetime.now(dt.timezone.utc)
    base = base_time()
    sent = [event(f"{prefix}{i}", T_TLS, event_id=f"tls-{i}", occurred_at=base +
                  dt.timedelta(milliseconds=i), params={"i": str(i)}) for i in range(10)]
    for e in sent:
        classify(srv, e)
    for facility in (16, 17):
        got = rsyslog.wait_for_lines(10, kind="tls", select=from_devices(prefix, facility))
        assert [event_id_of(m) for m in got] == [e.event_id for e in sent]
        for line, e in zip(got, sent):
            check_rfc5424(line, e, facility, t0)
    # Nothing of the failing ones reached the TLS input.
    assert not [m for m in rsyslog.lines("tls")
                if device_of(m) and parse_rfc5424(m).facility in (18, 19, 20)]
    for name in ("tls-plain-port", "tls-wrong-name", "tls-wrong-ca"):
        r = siem.test(name)
        assert not r.delivered, (name, r)
        assert re.search(r"tls|certificate|handshake", r.detail, re.I), (name, r.detail)
        st = status_when(siem, name, "a failure reported",
                         lambda x: x.failures > 0 and x.last_error)
        assert not st.connected, st
        assert st.sent == 0, st
    for name in ("tls-wrong-name", "tls-wrong-ca"):
        assert re.search(r"certificate|name|issuer|verif", siem.status(name).last_error, re.I)
    good = siem.test("tls-name")
    assert good.delivered, good
    # The server keeps serving.
    assert classify(srv, event(prefix + "after", T_TLS, event_id="tls-after")).stored
    rsyslog.wait_for_lines(1, kind="tls", select=lambda m: "tls-after" in m)
    for name in ("tls-ip", "tls-name"):
        st = siem.status(name)
        assert st.connected and st.last_error == "", st


def test_cef_and_leef_read_back_field_by_field(siem, rsyslog):
    srv = siem.srv
    siem.put(dest("cef", rsyslog.tcp_port, fmt=pb.SIEM_FORMAT_CEF, facility=16))
    siem.put(dest("leef", rsyslog.tcp_port, fmt=pb.SIEM_FORMAT_LEEF, facility=17))
    prefix = "py-siem-cef-"
    t0 = dt.datetime.now(dt.timezone.utc)
    base = base_time()
    sent = []
    for i in range(4):
        params = {"path": f"C:\\temp|x=1 {i}", "note": 'say "hi" ]\nnext line\ttab',
                  "name": "Grüße ✓", "eq": "a=b\\c"}
        sent.append(event(f"{prefix}{i} pc", T_APP, event_id=f"cef-{i}", application="KES 12.6",
                          occurred_at=base + dt.timedelta(seconds=i), params=params))
    # A type without a numeric id, without params.
    sent.append(event(f"{prefix}noid", T_NOID, event_id="cef-noid", occurred_at=base))
    for e in sent:
        classify(srv, e)
    t1 = dt.datetime.now(dt.timezone.utc)

    cef = rsyslog.wait_for_lines(len(sent), select=from_devices(prefix, 16))
    assert [event_id_of(m) for m in cef] == [e.event_id for e in sent]
    for line, e in zip(cef, sent):
        check_cef(line, e, 16, t0, t1)
    leef = rsyslog.wait_for_lines(len(sent), select=from_devices(prefix, 17))
    assert [event_id_of(m) for m in leef] == [e.event_id for e in sent]
    for line, e in zip(leef, sent):
        check_leef(line, e, 17)


def test_filters_by_severity_and_by_type(siem, rsyslog):
    srv = siem.srv
    siem.put(dest("f-sev", rsyslog.tcp_port, facility=16, min_severity=pb.SEVERITY_WARNING))
    siem.put(dest("f-types", rsyslog.tcp_port, facility=17, event_types=[T_INFO, T_CRIT]))
    prefix = "py-siem-filter-"
    sent = []
    for i in range(3):
        for t in (T_INFO, T_WARN, T_CRIT):
            sent.append(event(f"{prefix}{i}", t, event_id=f"f-{t}-{i}"))
    sent.append(event(f"{prefix}end", T_CRIT, event_id="f-end"))  # passes both filters
    for e in sent:
        classify(srv, e)
    for facility, keep in ((16, {T_WARN, T_CRIT}), (17, {T_INFO, T_CRIT})):
        rsyslog.wait_for_lines(1, select=lambda m: "f-end" in m and
                               from_devices(prefix, facility)(m))
        got = [event_id_of(m) for m in rsyslog.lines() if from_devices(prefix, facility)(m)]
        assert got == [e.event_id for e in sent if e.event_type in keep], (facility, got)
    d = siem.status("f-types").destination
    assert sorted(d.event_types) == sorted([T_INFO, T_CRIT]) and d.min_severity == 0  # listed sorted
    assert siem.status("f-sev").destination.min_severity == pb.SEVERITY_WARNING


def test_history_export_from_a_time_and_only_new_events_without_one(siem, rsyslog):
    srv = siem.srv
    prefix = "py-siem-hist-"
    history = []
    t_mid = None
    for i in range(20):
        if i == 10:
            t_mid = dt.datetime.now(dt.timezone.utc)
        e = event(f"{prefix}{i}", T_HIST, event_id=f"h-{i:02}")
        assert classify(srv, e).stored
        history.append(e)
    only = dict(event_types=[T_HIST])
    siem.put(dest("hist-all", rsyslog.tcp_port, start_from=Timestamp(seconds=0), **only))
    siem.put(dest("hist-mid", rsyslog.tcp_port, facility=18, start_from=ts(t_mid), **only))
    siem.put(dest("hist-new", rsyslog.tcp_port, facility=17, **only))
    later = [event(f"{prefix}later{i}", T_HIST, event_id=f"h-later-{i}") for i in range(5)]
    for e in later:
        classify(srv, e)
    ids = lambda es: [e.event_id for e in es]  # noqa: E731
    # Facility absent: 13 (log audit).
    for facility, want in ((13, history + later), (18, history[10:] + later), (17, later)):
        rsyslog.wait_for_lines(1, select=lambda m: "h-later-4" in m and
                               from_devices(prefix, facility)(m))
        got = [m for m in rsyslog.lines() if from_devices(prefix, facility)(m)]
        assert [event_id_of(m) for m in got] == ids(want), facility
    # Put again: without start_from the cursor stays (nothing again); with a time, it moves.
    siem.put(dest("hist-all", rsyslog.tcp_port, **only))
    siem.put(dest("hist-new", rsyslog.tcp_port, facility=17, start_from=Timestamp(seconds=0),
                  **only))
    classify(srv, event(f"{prefix}last", T_HIST, event_id="h-last"))
    for facility, want in ((13, history + later), (17, later + history + later)):
        rsyslog.wait_for_lines(1, select=lambda m: "h-last" in m and
                               from_devices(prefix, facility)(m))
        got = [event_id_of(m) for m in rsyslog.lines() if from_devices(prefix, facility)(m)]
        assert got == ids(want) + ["h-last"], facility


def test_a_receiver_outage_loses_nothing_and_does_not_slow_ingest(siem, harness_factory):
    srv = siem.srv
    h = harness_factory(tls=False, udp=False)
    siem.put(dest("outage", h.tcp_port, event_types=[T_OUT]))
    prefix = "py-siem-out-"
    mine = from_devices(prefix)
    first = [event(f"{prefix}{i % 4}", T_OUT, event_id=f"out-{i:05}") for i in range(2000)]
    answers: list = []
    errors: list = []

    def run():
        try:
            answers.extend(stream(srv, first))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    h.wait_for_lines(100, select=mine)
    assert h.kill() == -9
    th.join(60)
    assert not th.is_alive() and not errors, errors
    assert len(answers) == 2000 and all(a.stored for a in answers)
    # The receiver is down: the server accepts events as fast as ever, and says it is behind.
    more = [event(f"{prefix}m", T_OUT, event_id=f"out-{i:05}") for i in range(2000, 2200)]
    latencies = []
    for e in more[:100]:
        t = time.monotonic()
        assert classify(srv, e).stored
        latencies.append(time.monotonic() - t)
    # (behind is sampled about once a second: polled.)
    s1 = status_when(siem, "outage", "the outage shown", lambda x: not x.connected and
                     x.failures and x.last_error and x.behind >= 50 and x.lag_seconds > 0)
    for e in more[100:]:
        t = time.monotonic()
        assert classify(srv, e).stored
        latencies.append(time.monotonic() - t)
    latencies.sort()
    assert latencies[len(latencies) // 2] < 0.25 and latencies[-1] < 2.0, latencies[-5:]
    s2 = status_when(siem, "outage", "behind and lag growing", lambda x: x.behind >= s1.behind
                     + 100 and x.lag_seconds > s1.lag_seconds)
    assert not s2.connected and s2.failures >= s1.failures and s2.sent >= s1.sent, (s1, s2)
    # Back on the same port: everything arrives, in order of first appearance.
    h.start()
    all_ids = [e.event_id for e in first + more]
    want = set(all_ids)
    wait_for("every event after the outage", lambda: want <= {
        event_id_of(m) for m in h.lines() if mine(m)}, deadline=45)
    got = [event_id_of(m) for m in h.lines() if mine(m)]
    seen: dict[str, int] = {}
    for x in got:
        seen[x] = seen.get(x, 0) + 1
    assert list(seen) == all_ids, "in order of first appearance"
    duplicates = len(got) - len(seen)
    print(f"\noutage: {len(all_ids)} events, {len(got)} messages, {duplicates} duplicates")
    assert max(seen.values()) <= 2, "one replay at most"
    assert duplicates <= len(all_ids)
    st = status_when(siem, "outage", "caught up", lambda x: x.behind == 0 and x.connected,
                     deadline=30)
    assert st.lag_seconds == 0.0 and st.last_error == "", st


def test_the_cursor_survives_a_restart_of_the_server(server_factory, harness_factory, tmp_path):
    token = tmp_path / "metrics.token"
    token.write_text(METRICS_TOKEN + "\n")
    srv = server_factory(siem_config(free_port(), token), name="siem-restart")
    srv.start()
    register_types(srv)
    s = Siem(srv)
    h = harness_factory(tls=False, udp=False)
    prefix = "py-siem-rst-"
    mine = from_devices(prefix)
    s.put(dest("restart", h.tcp_port, facility=21, event_types=[T_RST]))
    batch = lambda tag, n: [event(f"{prefix}{tag}", T_RST, event_id=f"{tag}-{i:03}")  # noqa: E731
                            for i in range(n)]
    old, a, b, c = batch("old", 100), batch("a", 20), batch("b", 50), batch("c", 20)
    stream(srv, old)
    h.wait_for_lines(100, select=mine)
    # Not a wait for the server: after a broken connection the export replays what the
    # receiver acknowledged in the last REPLAY_SECS; the old batch is made older than that.
    time.sleep(REPLAY_SECS + 1.5)
    stream(srv, a)
    h.wait_for_lines(120, select=mine)
    h.stop()
    stream(srv, b)  # exported to nobody (what went into the closed connection is replayed)
    status_when(s, "restart", "the receiver seen gone",
                lambda x: not x.connected and x.failures)
    srv.stop_and_check()  # with the receiver still down
    srv.start()
    listed = s.list()
    assert set(listed) == {"restart"}
    d = listed["restart"].destination
    assert (d.port, d.facility, list(d.event_types)) == (h.tcp_port, 21, [T_RST])
    stream(srv, c)
    h.start()
    want = [e.event_id for e in old + a + b + c]
    wait_for("b and c after the restarts", lambda: set(want) <= {
        event_id_of(m) for m in h.lines() if mine(m)}, deadline=30)
    got = [event_id_of(m) for m in h.lines() if mine(m)]
    seen: dict[str, int] = {}
    for x in got:
        seen[x] = seen.get(x, 0) + 1
    assert list(seen) == want, "in order of first appearance"
    assert all(seen[e.event_id] == 1 for e in old), "no re-export of what was sent long ago"
    replayed = len(got) - len(seen)
    print(f"\nrestart: {replayed} re-sent of {len(a) + len(b)} recent")
    assert replayed <= len(a) + len(b)
    assert all(seen[e.event_id] == 1 for e in c)


def test_live_only_events_are_exported(siem, rsyslog):
    srv = siem.srv
    upd = srv.catalog.UpdateEventTypeSettings(
        pb.UpdateEventTypeSettingsRequest(event_type=T_LIVE, store=False), timeout=RPC_TIMEOUT)
    assert upd.store is False
    siem.put(dest("live", rsyslog.tcp_port, event_types=[T_LIVE, T_WARM]))
    prefix = "py-siem-live-"
    t0 = dt.datetime.now(dt.timezone.utc)
    # A stored event first: the destination is connected once it arrived.
    classify(srv, event(f"{prefix}w", T_WARM, event_id="warm-0"))
    h = rsyslog
    h.wait_for_lines(1, select=lambda m: "warm-0" in m and from_devices(prefix)(m))
    base = base_time()
    live = [event(f"{prefix}{i}", T_LIVE, event_id=f"live-{i}", params={"i": str(i)},
                  occurred_at=base + dt.timedelta(seconds=i)) for i in range(10)]
    for e in live:
        c = classify(srv, e)
        assert c.stored is False and c.blocked is False
    live_ids = {e.event_id for e in live}
    wait_for("the live events", lambda: live_ids <= {
        event_id_of(m) for m in h.lines() if from_devices(prefix)(m)})
    classify(srv, event(f"{prefix}w", T_WARM, event_id="warm-1"))
    h.wait_for_lines(1, select=lambda m: "warm-1" in m and from_devices(prefix)(m))
    got = [m for m in h.lines() if from_devices(prefix)(m)]
    by_id = {}
    for m in got:
        by_id.setdefault(event_id_of(m), []).append(m)
    for e in live:
        assert len(by_id[e.event_id]) == 1, f"{e.event_id} at most once"
        check_rfc5424(by_id[e.event_id][0], e, 13, t0)
    assert siem.status("live").live_dropped == 0


def test_udp_one_datagram_per_event_cut_to_fit(siem, rsyslog):
    srv = siem.srv
    siem.put(dest("udp", rsyslog.udp_port, transport=pb.SYSLOG_TRANSPORT_UDP,
                  event_types=[T_UDP]))
    prefix = "py-siem-udp-"
    t0 = dt.datetime.now(dt.timezone.utc)
    small = [event(f"{prefix}{i}", T_UDP, event_id=f"udp-{i}", params={"i": str(i)})
             for i in range(3)]
    big = event(f"{prefix}big", T_UDP, event_id="udp-big", params={"text": "é" * 3000})
    for e in small + [big]:
        classify(srv, e)
    got = rsyslog.wait_for_lines(4, kind="udp", select=lambda m: prefix in m)
    assert [event_id_of(m) for m in got[:3]] == ["udp-0", "udp-1", "udp-2"]
    assert 'event_id="udp-big"' in got[3]
    for line, e in zip(got, small):
        s = parse_rfc5424(line)
        assert s.sd[SD_ID]["event_id"] == e.event_id and s.sd[PARAMS_SD_ID] == dict(e.params)
        assert s.msg == f"{BOM}{DISPLAY[T_UDP]} on {e.device_id}"
        assert parse_rfc3339(s.sd[SD_ID]["received_at"]) >= t0 - dt.timedelta(seconds=1)
    cut = got[3]
    assert len(cut.encode()) <= 1472 and "\ufffd" not in cut, len(cut.encode())
    assert cut.endswith("é"), "cut on a character boundary"
    st = siem.status("udp")
    assert st.truncated >= 1 and st.sent >= 4, st


BASE = dict(name="bad-dest", host="127.0.0.1", port=6514, transport=pb.SYSLOG_TRANSPORT_TCP,
            format=pb.SIEM_FORMAT_RFC5424)


def _bad(**changes):
    fields = dict(BASE)
    fields.update(changes)
    return lambda files: pb.SiemDestination(**{
        k: (v(files) if callable(v) else v) for k, v in fields.items()})


BAD_CASES = [
    ("empty name", _bad(name=""), "name"),
    ("name with a space", _bad(name="bad name"), "name"),
    ("name with a slash", _bad(name="bad/name"), "name"),
    ("name too long", _bad(name="n" * 129), "name"),
    ("empty host", _bad(host=""), "host"),
    ("port 0", _bad(port=0), "port"),
    ("port 65536", _bad(port=65536), "port"),
    ("transport unspecified", _bad(transport=pb.SYSLOG_TRANSPORT_UNSPECIFIED), "transport"),
    ("transport unknown", _bad(transport=99), "transport"),
    ("format unspecified", _bad(format=pb.SIEM_FORMAT_UNSPECIFIED), "format"),
    ("format unknown", _bad(format=42), "format"),
    ("min_severity unknown", _bad(min_severity=17), "min_severity"),
    ("facility 24", _bad(facility=24), "facility"),
    ("257 event types", _bad(event_types=[f"PYSIEM_T{i}" for i in range(257)]), "event_types"),
    ("ca_file missing", _bad(transport=pb.SYSLOG_TRANSPORT_TLS,
                             ca_file=lambda f: str(f["dir"] / "missing.pem")), "ca_file"),
    ("ca_file a directory", _bad(transport=pb.SYSLOG_TRANSPORT_TLS,
                                 ca_file=lambda f: str(f["dir"])), "ca_file"),
    ("ca_file on TCP", _bad(ca_file=lambda f: str(f["ca"])), "ca_file"),
    ("ca_file on UDP", _bad(transport=pb.SYSLOG_TRANSPORT_UDP,
                            ca_file=lambda f: str(f["ca"])), "ca_file"),
    ("server_name on TCP", _bad(server_name="localhost"), "server_name"),
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("siem-bad")
    ca, _, _ = make_ca(d, "ca")
    return {"dir": d, "ca": ca}


@pytest.mark.parametrize("build, field", [(b, f) for _, b, f in BAD_CASES],
                         ids=[c for c, _, _ in BAD_CASES])
def test_a_bad_destination_is_refused_naming_its_field(siem, bad_files, build, field):
    d = build(bad_files)
    siem.names.add(d.name)  # removed at the end should it be accepted after all
    e = rpc_error(siem.stub.PutDestination, d)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
    assert re.search(rf"(?<!\w){re.escape(field)}(?!\w)", e.details()), e.details()
    assert d.name not in siem.list() or d.name == ""


def test_good_tls_and_udp_destinations_are_accepted(siem, bad_files):
    # The counterparts of the bad cases: what makes them bad is the one field.
    st = siem.put(pb.SiemDestination(
        name="good-tls", host="127.0.0.1", port=65535, transport=pb.SYSLOG_TRANSPORT_TLS,
        format=pb.SIEM_FORMAT_LEEF, ca_file=str(bad_files["ca"]), server_name="localhost",
        event_types=[f"PYSIEM_T{i}" for i in range(256)], facility=23, min_severity=pb.SEVERITY_CRITICAL))
    assert st.destination.ca_file == str(bad_files["ca"])
    assert len(st.destination.event_types) == 256
    siem.put(pb.SiemDestination(name="A." + "n" * 126, host="localhost", port=1,
                                transport=pb.SYSLOG_TRANSPORT_UDP, format=pb.SIEM_FORMAT_CEF,
                                facility=0, event_types=["PYSIEM_NEVER_RAISED"]))
    assert {"good-tls", "A." + "n" * 126} <= set(siem.list())


def test_unknown_names_and_the_limit_of_sixteen(siem):
    for call, req in ((siem.stub.RemoveDestination, pb.RemoveDestinationRequest(name="nope")),
                      (siem.stub.TestDestination, pb.TestDestinationRequest(name="nope"))):
        e = rpc_error(call, req)
        assert e.code() == grpc.StatusCode.NOT_FOUND, e.details()
    existing = len(siem.list())
    assert existing < 16
    idle = dict(host="127.0.0.1", port=9, transport=pb.SYSLOG_TRANSPORT_TCP,
                format=pb.SIEM_FORMAT_RFC5424, event_types=["PYSIEM_NEVER_RAISED"])
    for i in range(16 - existing):
        siem.put(pb.SiemDestination(name=f"lim-{i}", **idle))
    assert len(siem.list()) == 16
    e = rpc_error(siem.stub.PutDestination, pb.SiemDestination(name="lim-over", **idle))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
    # Replacing one is not adding one.
    siem.put(pb.SiemDestination(name="lim-0", **{**idle, "port": 10}))
    assert siem.status("lim-0").destination.port == 10
    gone = siem.remove("lim-0")
    assert gone.name == "lim-0" and gone.port == 10
    siem.put(pb.SiemDestination(name="lim-over", **idle))
    assert "lim-0" not in siem.list() and len(siem.list()) == 16


def test_only_an_administrator_may_manage_destinations(siem):
    srv = siem.srv
    siem.put(dest("admin-only", 9, event_types=["PYSIEM_NEVER_RAISED"]))
    calls = [
        ("PutDestination", dest("sneaky", 9)),
        ("ListDestinations", pb.ListDestinationsRequest()),
        ("RemoveDestination", pb.RemoveDestinationRequest(name="admin-only")),
        ("TestDestination", pb.TestDestinationRequest(name="admin-only")),
    ]
    for role in (pb.ROLE_VIEWER, pb.ROLE_OPERATOR, pb.ROLE_INGEST):
        token = srv.access.CreateToken(pb.CreateTokenRequest(
            name=f"py-siem-{pb.Role.Name(role).lower()}", role=role), timeout=RPC_TIMEOUT).token
        stub = g.SiemServiceStub(srv.secure_channel(token=token))
        for method, req in calls:
            e = rpc_error(getattr(stub, method), req)
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED, (role, method, e.details())
    anonymous = g.SiemServiceStub(srv.secure_channel(token=None))
    for method, req in calls:
        e = rpc_error(getattr(anonymous, method), req)
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, (method, e.details())
    assert "sneaky" not in siem.list() and "admin-only" in siem.list()


def test_metrics_per_destination(siem, rsyslog, metrics_port):
    srv = siem.srv
    siem.put(dest("metrics-x", rsyslog.tcp_port, event_types=[T_MET]))
    siem.put(dest("metrics-down", free_port(), event_types=[T_MET]))  # nobody listens
    prefix = "py-siem-met-"
    for i in range(7):
        classify(srv, event(f"{prefix}{i}", T_MET, event_id=f"met-{i}"))
    rsyslog.wait_for_lines(7, select=from_devices(prefix))
    st = status_when(siem, "metrics-x", "caught up", lambda x: x.behind == 0 and x.sent == 7)
    assert st.failures == 0 and st.live_dropped == 0

    def sample(samples, name, dest_name):
        return samples.get((name, (("destination", dest_name),)))

    def settled():
        # Gauges may be sampled now and then: wait until every one has moved.
        samples, kinds = scrape(metrics_port)
        ok = ((sample(samples, "fleet_siem_failures_total", "metrics-down") or 0) > 0
              and sample(samples, "fleet_siem_sent_total", "metrics-x") == 7
              and sample(samples, "fleet_siem_behind_events", "metrics-x") == 0
              and sample(samples, "fleet_siem_lag_seconds", "metrics-x") == 0
              and (sample(samples, "fleet_siem_behind_events", "metrics-down") or 0) >= 7
              and (sample(samples, "fleet_siem_lag_seconds", "metrics-down") or 0) > 0)
        return (samples, kinds) if ok else None

    try:
        samples, kinds = wait_for("the metrics of both destinations", settled)
    except AssertionError:
        samples, _ = scrape(metrics_port)
        raise AssertionError("fleet_siem_* samples: " + repr(
            {k: v for k, v in samples.items() if k[0].startswith("fleet_siem_")}))
    for family, kind in (("fleet_siem_sent", "counter"), ("fleet_siem_failures", "counter"),
                         ("fleet_siem_live_dropped", "counter"),
                         ("fleet_siem_lag_seconds", "gauge"),
                         ("fleet_siem_behind_events", "gauge")):
        assert kinds.get(family) == kind, (family, kinds.get(family))
    assert sample(samples, "fleet_siem_sent_total", "metrics-x") == 7
    assert sample(samples, "fleet_siem_failures_total", "metrics-x") == 0
    assert sample(samples, "fleet_siem_live_dropped_total", "metrics-x") == 0
    assert sample(samples, "fleet_siem_lag_seconds", "metrics-x") == 0
    assert sample(samples, "fleet_siem_behind_events", "metrics-x") == 0
    assert sample(samples, "fleet_siem_sent_total", "metrics-down") == 0
    assert sample(samples, "fleet_siem_behind_events", "metrics-down") >= 7
    assert sample(samples, "fleet_siem_lag_seconds", "metrics-down") > 0
    down = siem.status("metrics-down")
    assert not down.connected and down.last_error and down.behind >= 7
