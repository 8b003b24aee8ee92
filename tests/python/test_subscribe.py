"""EventService.Subscribe: live classified events, filtered by severity and device."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest

from fleet_helpers import RPC_TIMEOUT, event
from fleetevents.v1 import fleetevents_pb2 as pb

DEVICE = "py-sub-1"
OTHER = "py-sub-2"

# WARNING application types (registered by the `warning_types` fixture: the built-in KLSRV_*
# types are raised only by the server, never by clients). The probe types are cycled so that no
# (device, type) pair reaches the shared config's flood threshold of 5 (a blocked probe would
# never be forwarded).
PROBE_TYPES = [f"PYSUB_PROBE_{i}" for i in range(8)]
PROBE_WAIT = 0.5
SENTINEL_TYPE = "PYSUB_SENTINEL"
CONFLICT_TYPE = "PYSUB_HOSTS_CONFLICT"
CONFLICT_ID = 75102
READ_DEADLINE = 10.0


@pytest.fixture(scope="module")
def warning_types(server):
    """Registers the WARNING application types the test sends (as admin)."""
    for name, type_id in [(n, 0) for n in PROBE_TYPES + [SENTINEL_TYPE]] + [
        (CONFLICT_TYPE, CONFLICT_ID)
    ]:
        t = server.catalog.RegisterEventType(
            pb.RegisterEventTypeRequest(
                event_type=name, event_type_id=type_id, severity=pb.SEVERITY_WARNING,
                application="pytest",
            ),
            timeout=RPC_TIMEOUT,
        )
        assert (t.event_type, t.event_type_id, t.severity) == (name, type_id, pb.SEVERITY_WARNING)


class Subscriber:
    """Reads a Subscribe call in a thread into a queue."""

    def __init__(self, server, request):
        self.call = server.events.Subscribe(request)
        self.queue: queue.Queue = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for c in self.call:
                self.queue.put(c)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.error = e
        finally:
            self.queue.put(None)

    def get(self, timeout):
        item = self.queue.get(timeout=timeout)
        if item is None:
            raise AssertionError(f"subscription ended: {self.error}")
        return item

    def close(self):
        self.call.cancel()
        self.thread.join(timeout=10)


def test_subscribe_filters_severity_and_device(server, warning_types):
    """An operator console subscribes to WARNING-and-above events of device py-sub-1. Once the
    subscription is live, py-sub-1 sends an INFO event and a WARNING event and another device
    sends a WARNING event: the console receives exactly the WARNING event of py-sub-1, with every
    field filled (application and params included)."""
    sub = Subscriber(
        server, pb.SubscribeRequest(min_severity=pb.SEVERITY_WARNING, device_ids=[DEVICE])
    )
    try:
        # Probe until the subscription is demonstrably registered.
        probe_ids = set()
        seen_probe = False
        deadline = time.monotonic() + 30
        n = 0
        while not seen_probe:
            assert time.monotonic() < deadline, "no probe event reached the subscriber in 30 s"
            assert n < 5 * len(PROBE_TYPES), "ran out of probe types before the subscriber saw one"
            pid = f"probe-{n}"
            probe_ids.add(pid)
            server.events.Classify(
                event(DEVICE, PROBE_TYPES[n % len(PROBE_TYPES)], event_id=pid),
                timeout=RPC_TIMEOUT,
            )
            n += 1
            try:
                got = sub.get(timeout=PROBE_WAIT)
            except queue.Empty:
                continue
            assert got.event_id in probe_ids, f"unexpected event before the test: {got}"
            seen_probe = True

        # The real events.
        info = server.events.Classify(
            event(DEVICE, "MYAPP_SUB_INFO", event_id="sub-info"), timeout=RPC_TIMEOUT)
        assert info.severity == pb.SEVERITY_INFO
        warn = server.events.Classify(
            event(DEVICE, CONFLICT_TYPE, event_id="sub-warn",
                  application="KES 12.6", params={"host": "ws-17"}),
            timeout=RPC_TIMEOUT)
        assert warn.severity == pb.SEVERITY_WARNING
        other = server.events.Classify(
            event(OTHER, CONFLICT_TYPE, event_id="sub-other"),
            timeout=RPC_TIMEOUT)
        assert other.severity == pb.SEVERITY_WARNING
        # A last WARNING event of py-sub-1 marks the end: everything published before it has
        # been delivered by the time it arrives.
        server.events.Classify(
            event(DEVICE, SENTINEL_TYPE, event_id="sub-sentinel"), timeout=RPC_TIMEOUT)

        received = []
        while True:
            try:
                got = sub.get(timeout=READ_DEADLINE)
            except queue.Empty:
                raise AssertionError(
                    f"the sentinel did not arrive within {READ_DEADLINE} s; got "
                    f"{[c.event_id for c in received]}")
            if got.event_id == "sub-sentinel":
                break
            if got.event_id in probe_ids:
                continue  # a late probe
            received.append(got)

        assert [c.event_id for c in received] == ["sub-warn"]
        c = received[0]
        assert c.device_id == DEVICE
        assert c.event_type == CONFLICT_TYPE
        assert c.event_type_id == CONFLICT_ID
        assert c.severity == pb.SEVERITY_WARNING
        assert c.known is True
        assert c.blocked is False
        assert c.application == "KES 12.6"
        assert dict(c.params) == {"host": "ws-17"}
        assert c.origin == pb.ORIGIN_CLIENT
        assert c.missed_before == 0
        assert c.HasField("received_at")
        assert c.HasField("occurred_at")
    finally:
        sub.close()
