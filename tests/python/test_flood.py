"""Frequent-event blocking (flood detection) with the shared config's threshold of 5 events per
(device, type) per hour, and the DeviceService calls that manage blocks."""

from __future__ import annotations

import time

from fleet_helpers import RPC_TIMEOUT, event, query_all
from fleetevents.v1 import fleetevents_pb2 as pb

DEVICE = "py-flood-1"
NOISY = "MYAPP_NOISY"


def _blocks_for(server, device):
    resp = server.devices.ListFrequentEventBlocks(
        pb.ListFrequentEventBlocksRequest(device_id=device), timeout=RPC_TIMEOUT
    )
    return [b for b in resp.blocks if b.device_id == device and b.event_type == NOISY]


def _spam_events(server, device, deadline_secs=10.0):
    """The stored KLSRV_EVENT_SPAM_EVENTS_DETECTED events for the device. The server raises that
    event itself, so it is polled for with a deadline instead of assumed to be there at once."""
    deadline = time.monotonic() + deadline_secs
    while True:
        found = query_all(
            server.events, event_type="KLSRV_EVENT_SPAM_EVENTS_DETECTED", device_id=device
        )
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def test_flood_block_unblock_remove(server):
    """A misbehaving application on py-flood-1 fires MYAPP_NOISY 20 times. With a threshold of 5
    the first 5 pass and the other 15 are held back (blocked, not stored). The server raises one
    KLSRV_EVENT_SPAM_EVENTS_DETECTED event naming the device, the type and the count, and lists
    the block with 15 events held back. An administrator unblocks the pair, after which its
    events pass whatever their rate, and finally removes the block, which then disappears."""
    answers = [
        server.events.Classify(event(DEVICE, NOISY, event_id=f"noisy-{i:02d}"),
                               timeout=RPC_TIMEOUT)
        for i in range(20)
    ]
    assert [a.blocked for a in answers[:5]] == [False] * 5
    assert [a.stored for a in answers[:5]] == [True] * 5
    assert [a.blocked for a in answers[5:]] == [True] * 15
    assert [a.stored for a in answers[5:]] == [False] * 15

    # Only the 5 events that passed are stored.
    stored = query_all(server.events, device_id=DEVICE, event_type=NOISY)
    assert sorted(c.event_id for c in stored) == [f"noisy-{i:02d}" for i in range(5)]

    # Exactly one flood-detected event, raised by the server, about this device and type.
    spam = _spam_events(server, DEVICE)
    assert len(spam) == 1, [(c.event_id, dict(c.params)) for c in spam]
    s = spam[0]
    assert s.params.get("device_id") == DEVICE
    assert s.params.get("event_type") == NOISY
    assert "count" in s.params, dict(s.params)
    assert int(s.params["count"]) > 5
    assert s.severity == pb.SEVERITY_WARNING
    assert s.origin == pb.ORIGIN_SERVER

    blocks = _blocks_for(server, DEVICE)
    assert len(blocks) == 1, blocks
    b = blocks[0]
    assert b.state == pb.BLOCK_STATE_BLOCKED
    assert b.held_back == 15
    assert b.detected_count > 5
    assert b.HasField("blocked_since")
    assert b.HasField("blocked_until")
    assert b.blocked_until.ToDatetime() > b.blocked_since.ToDatetime()

    # The administrator unblocks the pair: from now on its events pass.
    unblocked = server.devices.UnblockFrequentEvent(
        pb.FrequentEventBlockKey(device_id=DEVICE, event_type=NOISY), timeout=RPC_TIMEOUT
    )
    assert unblocked.state == pb.BLOCK_STATE_UNBLOCKED
    assert unblocked.device_id == DEVICE
    assert unblocked.event_type == NOISY
    assert not unblocked.HasField("blocked_until")

    later = [
        server.events.Classify(event(DEVICE, NOISY, event_id=f"noisy-after-{i:02d}"),
                               timeout=RPC_TIMEOUT)
        for i in range(10)
    ]
    assert [a.blocked for a in later] == [False] * 10
    assert [a.stored for a in later] == [True] * 10

    listed = _blocks_for(server, DEVICE)
    assert [x.state for x in listed] == [pb.BLOCK_STATE_UNBLOCKED]

    # Removing the block forgets it.
    server.devices.RemoveFrequentEventBlock(
        pb.FrequentEventBlockKey(device_id=DEVICE, event_type=NOISY), timeout=RPC_TIMEOUT
    )
    assert _blocks_for(server, DEVICE) == []
