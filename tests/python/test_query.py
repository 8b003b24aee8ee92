"""EventService.QueryEvents: paging in occurred_at order, and (device_id, event_id)
idempotency."""

from __future__ import annotations

import datetime as dt

from fleet_helpers import RPC_TIMEOUT, event, now, query_all
from fleetevents.v1 import fleetevents_pb2 as pb


def test_query_paging(server):
    """A device stores 25 events with increasing occurred_at. Reading them 10 at a time gives
    pages of 10, 10 and 5, the last one without a next_page_token, and together the pages hold
    all 25 events exactly once, in occurred_at order."""
    device = "py-page"
    base = now() - dt.timedelta(hours=1)
    ids = [f"page-evt-{i:02d}" for i in range(25)]
    # Sent in a shuffled order so that occurred_at order is not just arrival order. Each event
    # has its own type so that the shared config's flood threshold (5) never applies.
    order = [(i * 7) % 25 for i in range(25)]
    assert sorted(order) == list(range(25))
    for i in order:
        c = server.events.Classify(
            event(device, f"PYPAGE_EVT_{i:02d}", event_id=ids[i],
                  occurred_at=base + dt.timedelta(seconds=i)),
            timeout=RPC_TIMEOUT,
        )
        assert c.stored is True and c.blocked is False

    pages = []
    token = ""
    for _ in range(10):
        resp = server.events.QueryEvents(
            pb.QueryEventsRequest(device_id=device, page_size=10, page_token=token),
            timeout=RPC_TIMEOUT,
        )
        pages.append(resp)
        token = resp.next_page_token
        if not token:
            break

    assert [len(p.events) for p in pages] == [10, 10, 5]
    assert pages[0].next_page_token != ""
    assert pages[1].next_page_token != ""
    assert pages[2].next_page_token == ""
    got = [c.event_id for p in pages for c in p.events]
    assert got == ids
    times = [c.occurred_at.ToDatetime() for p in pages for c in p.events]
    assert times == sorted(times)
    # QueryEvents fills every field.
    first = pages[0].events[0]
    assert first.device_id == device
    assert first.event_type == "PYPAGE_EVT_00"
    assert first.application == "pytest"
    assert first.stored is True
    assert first.origin == pb.ORIGIN_CLIENT
    assert first.HasField("received_at")


def test_idempotent_event_id(server):
    """A device re-sends an event it is not sure was delivered, with the same event_id. The
    store keeps it once: querying the device returns a single event."""
    device = "py-idem-1"
    for _ in range(2):
        c = server.events.Classify(
            event(device, "PYIDEM_EVT", event_id="idem-evt-1"), timeout=RPC_TIMEOUT
        )
        assert c.event_id == "idem-evt-1"
        assert c.blocked is False
    stored = query_all(server.events, device_id=device)
    assert [c.event_id for c in stored] == ["idem-evt-1"]
