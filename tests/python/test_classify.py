"""EventService.Classify: classification by type string and by numeric id, unknown types, and
rejection of bad input with exact status codes."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from fleet_helpers import RPC_TIMEOUT, event, now, query_all, rpc_error
from fleetevents.v1 import fleetevents_pb2 as pb


# Application types registered by the administrator for this module. The built-in KLSRV_* types
# are raised only by the server (a client sending one is refused), so a client's known types
# are application types.
CONFLICT_TYPE = "PYCLS_HOSTS_CONFLICT"
CONFLICT_ID = 74102
CONFLICT_JA = "デバイスの名前が競合しています"
NOT_STORED_TYPE = "PYCLS_APN_EXPIRED"
NOT_STORED_ID = 74135


@pytest.fixture(scope="module")
def app_types(server):
    """Registers (as admin) a WARNING type with a numeric id and both display names, and a type
    whose events are never stored."""
    a = server.catalog.RegisterEventType(
        pb.RegisterEventTypeRequest(
            event_type=CONFLICT_TYPE, event_type_id=CONFLICT_ID, severity=pb.SEVERITY_WARNING,
            display_name="Host names conflict", display_name_ja=CONFLICT_JA,
            application="pytest",
        ),
        timeout=RPC_TIMEOUT,
    )
    assert (a.event_type, a.event_type_id, a.severity) == (CONFLICT_TYPE, CONFLICT_ID, pb.SEVERITY_WARNING)
    assert a.raised_by == pb.RAISED_BY_CLIENTS
    b = server.catalog.RegisterEventType(
        pb.RegisterEventTypeRequest(
            event_type=NOT_STORED_TYPE, event_type_id=NOT_STORED_ID, severity=pb.SEVERITY_WARNING,
            display_name="APN certificate expired (pytest)", do_not_store=True,
            application="pytest",
        ),
        timeout=RPC_TIMEOUT,
    )
    assert (b.event_type, b.event_type_id, b.store) == (NOT_STORED_TYPE, NOT_STORED_ID, False)


def test_classify_by_type_string(server, app_types):
    """A device reports a host-name conflict by its type string. The server recognises the
    registered application type: its numeric id, WARNING, known, stored, not blocked, English
    and Japanese display names, and the identity fields echoed back."""
    occurred = now() - dt.timedelta(minutes=5)
    req = event("py-classify-1", CONFLICT_TYPE, event_id="py-cls-evt-1",
                occurred_at=occurred)
    c = server.events.Classify(req, timeout=RPC_TIMEOUT)

    assert c.event_id == "py-cls-evt-1"
    assert c.device_id == "py-classify-1"
    assert c.event_type == CONFLICT_TYPE
    assert c.event_type_id == CONFLICT_ID
    assert c.severity == pb.SEVERITY_WARNING
    assert c.known is True
    assert c.stored is True
    assert c.blocked is False
    assert c.display_name == "Host names conflict"
    assert c.display_name_ja == CONFLICT_JA
    # The identity fields are echoed, including occurred_at.
    assert c.HasField("occurred_at")
    assert c.occurred_at == req.occurred_at


def test_classify_by_numeric_id(server, app_types):
    """A device reports an expired APN certificate by the numeric id of a registered type only.
    The answer names the type string, and the event is not stored because the catalog never
    stores that type."""
    c = server.events.Classify(
        event("py-classify-2", event_type_id=NOT_STORED_ID, event_id="py-cls-evt-2"),
        timeout=RPC_TIMEOUT,
    )
    assert c.event_type == NOT_STORED_TYPE
    assert c.event_type_id == NOT_STORED_ID
    assert c.known is True
    assert c.stored is False
    assert c.blocked is False
    assert c.event_id == "py-cls-evt-2"
    assert c.device_id == "py-classify-2"


@pytest.mark.parametrize(
    "make, type_name",
    [
        (lambda: event("py-classify-4", "KLSRV_EVENT_HOSTS_CONFLICT", event_id="srv-1"),
         "KLSRV_EVENT_HOSTS_CONFLICT"),
        (lambda: event("py-classify-4", event_type_id=4135, event_id="srv-2"),
         "KLSRV_APN_CERTIFICATE_EXPIRED"),
        (lambda: event("py-classify-4", "FLEET_AUDIT_ACCESS", event_id="srv-3"),
         "FLEET_AUDIT_ACCESS"),
    ],
    ids=["klsrv_by_string", "klsrv_by_numeric_id", "audit_type"],
)
def test_classify_refuses_server_raised_types(server, make, type_name):
    """Built-in types (the KLSRV_* Administration Server events and the FLEET_AUDIT_* types) are
    raised only by the server: a client sending one, by type string or by numeric id, even as
    admin, gets PERMISSION_DENIED naming the type, and nothing is stored for the device."""
    err = rpc_error(server.events.Classify, make())
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, f"{err.code()} {err.details()!r}"
    assert type_name in (err.details() or ""), err.details()
    assert "server" in (err.details() or ""), err.details()
    assert query_all(server.events, device_id="py-classify-4") == []


def test_classify_unknown_type(server):
    """An application sends a type the catalog has never heard of. It is still accepted (OK),
    marked unknown, stored, and gets the default severity for unknown types, INFO; its display
    name falls back to the type string."""
    c = server.events.Classify(
        event("py-classify-3", "MYAPP_SOMETHING", event_id="py-cls-evt-3"), timeout=RPC_TIMEOUT
    )
    assert c.known is False
    assert c.stored is True
    assert c.blocked is False
    assert c.severity == pb.SEVERITY_INFO
    assert c.event_type == "MYAPP_SOMETHING"
    assert c.event_type_id == 0
    assert c.display_name == "MYAPP_SOMETHING"
    assert c.event_id == "py-cls-evt-3"


def _future_event():
    return event("py-bad-1", "MYAPP_BAD", event_id="bad-future",
                 occurred_at=now() + dt.timedelta(days=1))


BAD_INPUTS = {
    "empty_device_id": (
        lambda: event("", "MYAPP_BAD", event_id="bad-nodev"),
        grpc.StatusCode.INVALID_ARGUMENT, "device_id"),
    "both_type_and_id": (
        lambda: event("py-bad-1", "KLSRV_EVENT_HOSTS_CONFLICT", event_type_id=4102,
                      event_id="bad-both"),
        grpc.StatusCode.INVALID_ARGUMENT, "event_type"),
    "neither_type_nor_id": (
        lambda: event("py-bad-1", event_id="bad-neither"),
        grpc.StatusCode.INVALID_ARGUMENT, None),
    "unknown_numeric_id": (
        lambda: event("py-bad-1", event_type_id=999999, event_id="bad-id"),
        grpc.StatusCode.INVALID_ARGUMENT, "event_type_id"),
    "occurred_at_in_future": (
        _future_event, grpc.StatusCode.INVALID_ARGUMENT, "occurred_at"),
    "params_1000_entries": (
        lambda: event("py-bad-1", "MYAPP_BAD", event_id="bad-many-params",
                      params={f"k{i}": "v" for i in range(1000)}),
        grpc.StatusCode.INVALID_ARGUMENT, "params"),
    "params_100kib_value": (
        lambda: event("py-bad-1", "MYAPP_BAD", event_id="bad-big-param",
                      params={"blob": "x" * (100 * 1024)}),
        grpc.StatusCode.INVALID_ARGUMENT, "params"),
    "message_over_4mib": (
        lambda: event("py-bad-1", "MYAPP_BAD", event_id="bad-huge",
                      params={"blob": "x" * (5 * 1024 * 1024)}),
        grpc.StatusCode.RESOURCE_EXHAUSTED, None),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_classify_rejects_bad_input(server, case):
    """A client sends a malformed event (missing device, ambiguous or missing type, unknown
    numeric id, a time in the future, too many or too large params, an oversized message). The
    call fails with the exact status code, the details name the offending field, and the server
    keeps answering a good Classify right afterwards."""
    make, code, field = BAD_INPUTS[case]
    err = rpc_error(server.events.Classify, make())
    assert err.code() == code, f"{case}: got {err.code()} {err.details()!r}"
    if field is not None:
        assert field in (err.details() or ""), f"{case}: details {err.details()!r} lack {field!r}"

    good = server.events.Classify(
        event("py-bad-ok", f"PYBAD_OK_{case.upper()}", event_id=f"ok-after-{case}"),
        timeout=RPC_TIMEOUT,
    )
    assert good.event_id == f"ok-after-{case}"
    assert good.device_id == "py-bad-ok"
    assert good.blocked is False
    assert good.stored is True
