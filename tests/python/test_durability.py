"""Restart durability: what the server said it stored survives a crash."""

from __future__ import annotations

import signal

from fleet_helpers import RPC_TIMEOUT, event, query_all

DURABLE_CONFIG = """\
[flood]
threshold = 1000
window = "60s"
block = "3600s"

[store]
max_events = 400000
"""


def test_stored_events_survive_sigkill(server_factory):
    """A device stores 50 events and the server is killed with SIGKILL, with no chance to shut
    down cleanly. Started again on the same data directory, it still returns all 50 events."""
    srv = server_factory(DURABLE_CONFIG, name="durable")
    srv.start()
    device = "py-durable-1"
    ids = [f"durable-{i:02d}" for i in range(50)]
    for eid in ids:
        c = srv.events.Classify(event(device, "PYDURABLE_EVT", event_id=eid), timeout=RPC_TIMEOUT)
        assert c.stored is True, eid
        assert c.blocked is False, eid

    rc = srv.kill()
    assert rc == -signal.SIGKILL

    srv.start()  # same data dir, fresh ready file
    stored = query_all(srv.events, device_id=device, page_size=100)
    assert sorted(c.event_id for c in stored) == ids
    assert len(stored) == 50
