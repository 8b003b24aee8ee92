"""EventService.Classify: classification by type string and by numeric id, unknown types, and
rejection of bad input with exact status codes."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from fleet_helpers import RPC_TIMEOUT, event, now, rpc_error
from fleetevents.v1 import fleetevents_pb2 as pb


def test_classify_by_type_string(server):
    """A device reports a host-name conflict by its type string. The server recognises the
    built-in Administration Server type: numeric id 4102, WARNING, known, stored, not blocked,
    English and Japanese display names, and the identity fields echoed back."""
    occurred = now() - dt.timedelta(minutes=5)
    req = event("py-classify-1", "KLSRV_EVENT_HOSTS_CONFLICT", event_id="py-cls-evt-1",
                occurred_at=occurred)
    c = server.events.Classify(req, timeout=RPC_TIMEOUT)

    assert c.event_id == "py-cls-evt-1"
    assert c.device_id == "py-classify-1"
    assert c.event_type == "KLSRV_EVENT_HOSTS_CONFLICT"
    assert c.event_type_id == 4102
    assert c.severity == pb.WARNING
    assert c.known is True
    assert c.stored is True
    assert c.blocked is False
    assert c.display_name != ""
    assert c.display_name_ja == "デバイスの名前が競合しています"
    # The identity fields are echoed, including occurred_at.
    assert c.HasField("occurred_at")
    assert c.occurred_at == req.occurred_at


def test_classify_by_numeric_id(server):
    """A device reports an expired APN certificate by its numeric id 4135 only. The answer names
    the type string KLSRV_APN_CERTIFICATE_EXPIRED, and the event is not stored because the
    catalog never stores that type."""
    c = server.events.Classify(
        event("py-classify-2", event_type_id=4135, event_id="py-cls-evt-2"), timeout=RPC_TIMEOUT
    )
    assert c.event_type == "KLSRV_APN_CERTIFICATE_EXPIRED"
    assert c.event_type_id == 4135
    assert c.known is True
    assert c.stored is False
    assert c.blocked is False
    assert c.event_id == "py-cls-evt-2"
    assert c.device_id == "py-classify-2"


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
    assert c.severity == pb.INFO
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
