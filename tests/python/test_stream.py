"""EventService.Stream: the agents' bidi path, one Classification per Event, in order."""

from __future__ import annotations

import grpc

from fleet_helpers import RPC_TIMEOUT, event, query_all

STREAM_TIMEOUT = 60.0


def test_stream_500_events_in_order(server):
    """An agent pushes 500 events over one Stream call. It gets exactly 500 Classifications
    back, in the order it sent them, each echoing its event and device ids; being answered means
    the event is committed, so a query right afterwards finds it."""
    # One device per event, so the low flood threshold of the shared config never applies.
    sent = [
        event(f"py-stream-{i:03d}", "PYSTREAM_EVT", event_id=f"py-stream-evt-{i:03d}")
        for i in range(500)
    ]
    answers = list(server.events.Stream(iter(sent), timeout=STREAM_TIMEOUT))

    assert len(answers) == 500
    assert [a.event_id for a in answers] == [e.event_id for e in sent]
    assert [a.device_id for a in answers] == [e.device_id for e in sent]
    assert all(a.event_type == "PYSTREAM_EVT" for a in answers)
    assert all(a.stored and not a.blocked for a in answers)

    # Receiving the answer means committed: the last event is queryable at once.
    stored = query_all(server.events, device_id="py-stream-499")
    assert [c.event_id for c in stored] == ["py-stream-evt-499"]


def test_stream_bad_event_in_the_middle(server):
    """An agent's third of five events has no device id. The two before it are answered, then
    the stream ends with INVALID_ARGUMENT naming device_id, and the server goes on serving."""
    sent = [
        event("py-stream-bad", "PYSTREAM_BAD", event_id="sb-1"),
        event("py-stream-bad", "PYSTREAM_BAD", event_id="sb-2"),
        event("", "PYSTREAM_BAD", event_id="sb-3"),
        event("py-stream-bad", "PYSTREAM_BAD", event_id="sb-4"),
        event("py-stream-bad", "PYSTREAM_BAD", event_id="sb-5"),
    ]
    call = server.events.Stream(iter(sent), timeout=STREAM_TIMEOUT)
    answered = []
    error = None
    try:
        for c in call:
            answered.append(c)
    except grpc.RpcError as e:
        error = e

    assert [c.event_id for c in answered] == ["sb-1", "sb-2"]
    assert error is not None, "the stream ended without an error"
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "device_id" in (error.details() or "")

    good = server.events.Classify(
        event("py-stream-after", "PYSTREAM_AFTER", event_id="sa-1"), timeout=RPC_TIMEOUT
    )
    assert good.event_id == "sa-1"
    assert good.stored is True
