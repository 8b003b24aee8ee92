"""CatalogService: listing the built-in seed, registering an application type and changing its
settings."""

from __future__ import annotations

import grpc

from fleet_helpers import RPC_TIMEOUT, event, rpc_error
from fleetevents.v1 import fleetevents_pb2 as pb

SEED_WARNING_TYPES = {
    "KLSRV_EVENT_SPAM_EVENTS_DETECTED",
    "KLSRV_EV_LICENSE_CHECK_100_110",
    "KLSRV_EVENT_HOSTS_NOT_VISIBLE",
    "KLSRV_EVENT_HOSTS_CONFLICT",
    "KLSRV_HOST_STATUS_WARNING",
    "KLSRV_CERTIFICATE_REQUESTED",
    "KLSRV_CERTIFICATE_REMOVED",
    "KLSRV_APN_CERTIFICATE_EXPIRED",
    "KLSRV_APN_CERTIFICATE_EXPIRES_SOON",
    "KLSRV_GCM_DEVICE_ERROR",
    "KLSRV_GCM_HTTP_ERROR",
    "KLSRV_GCM_GENERAL_ERROR",
    "KLSRV_NO_SPACE_ON_VOLUMES",
    "KLSRV_NO_SPACE_IN_DATABASE",
    "KLSRV_EV_SLAVE_SRV_DISCONNECTED",
    "KLSRV_EV_MASTER_SRV_DISCONNECTED",
    "KLSRV_SEAMLESS_UPDATE_REGISTERED",
    "KLSRV_EVP_DB_TRUNCATING",
    "KLSRV_EVP_DB_TRUNCATED",
}


def test_list_warning_types(server):
    """An administrator lists the catalog from WARNING up. All 19 built-in WARNING types of the
    seed are there, as built-in WARNING types, and nothing below WARNING is listed."""
    assert len(SEED_WARNING_TYPES) == 19
    resp = server.catalog.ListEventTypes(
        pb.ListEventTypesRequest(min_severity=pb.SEVERITY_WARNING), timeout=RPC_TIMEOUT
    )
    by_name = {t.event_type: t for t in resp.event_types}
    missing = SEED_WARNING_TYPES - by_name.keys()
    assert not missing, f"missing warning types: {sorted(missing)}"
    for name in SEED_WARNING_TYPES:
        assert by_name[name].severity == pb.SEVERITY_WARNING, name
        assert by_name[name].builtin is True, name
        # Built-in types are raised by the server only; clients sending them are refused.
        assert by_name[name].raised_by == pb.RAISED_BY_SERVER, name
    below = [t.event_type for t in resp.event_types if t.severity < pb.SEVERITY_WARNING]
    assert below == []
    assert by_name["KLSRV_EVENT_HOSTS_CONFLICT"].event_type_id == 4102
    assert by_name["KLSRV_EVENT_SPAM_EVENTS_DETECTED"].event_type_id == 0


def test_register_and_update_event_type(server):
    """An application registers its own CRITICAL type PYAPP_DISK_ALERT with numeric id 70001.
    Events sent by that id are then classified as the known CRITICAL type and stored;
    registering the same type again fails with ALREADY_EXISTS; after the administrator turns
    storing off for the type, new events of it are no longer stored."""
    reg = server.catalog.RegisterEventType(
        pb.RegisterEventTypeRequest(
            event_type="PYAPP_DISK_ALERT",
            event_type_id=70001,
            severity=pb.SEVERITY_CRITICAL,
            display_name="Disk alert",
            application="pytest",
        ),
        timeout=RPC_TIMEOUT,
    )
    assert reg.event_type == "PYAPP_DISK_ALERT"
    assert reg.event_type_id == 70001
    assert reg.severity == pb.SEVERITY_CRITICAL
    assert reg.store is True
    assert reg.builtin is False
    assert reg.raised_by == pb.RAISED_BY_CLIENTS
    assert reg.application == "pytest"
    assert reg.retention_days == 180  # the default for CRITICAL

    c = server.events.Classify(
        event("py-catalog-1", event_type_id=70001, event_id="disk-1"), timeout=RPC_TIMEOUT
    )
    assert c.event_type == "PYAPP_DISK_ALERT"
    assert c.event_type_id == 70001
    assert c.severity == pb.SEVERITY_CRITICAL
    assert c.known is True
    assert c.stored is True
    assert c.display_name == "Disk alert"

    err = rpc_error(
        server.catalog.RegisterEventType,
        pb.RegisterEventTypeRequest(
            event_type="PYAPP_DISK_ALERT", event_type_id=70001, severity=pb.SEVERITY_CRITICAL
        ),
    )
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS, f"{err.code()} {err.details()!r}"

    upd = server.catalog.UpdateEventTypeSettings(
        pb.UpdateEventTypeSettingsRequest(event_type="PYAPP_DISK_ALERT", store=False),
        timeout=RPC_TIMEOUT,
    )
    assert upd.event_type == "PYAPP_DISK_ALERT"
    assert upd.store is False
    assert upd.severity == pb.SEVERITY_CRITICAL

    c2 = server.events.Classify(
        event("py-catalog-1", event_type_id=70001, event_id="disk-2"), timeout=RPC_TIMEOUT
    )
    assert c2.event_type == "PYAPP_DISK_ALERT"
    assert c2.stored is False
    assert c2.blocked is False
    assert c2.known is True
