"""A fleet-events client in Python (grpcio): TLS with the server's CA pinned, a bearer token,
and each EventService call once. It prints one line per step and exits 1 at the first surprise.

    python example.py --server 127.0.0.1:50051 --ca fleet-events-data/ca.pem --token "$(cat fleet-events-data/admin.token)"

or set FLEET_EVENTS_SERVER, FLEET_EVENTS_CA and FLEET_EVENTS_TOKEN. The stubs are generated
into gen/ first (see README.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

sys.path.insert(0, str(Path(__file__).resolve().parent / "gen"))
from fleetevents.v1 import fleetevents_pb2 as pb  # noqa: E402
from fleetevents.v1 import fleetevents_pb2_grpc as pb_grpc  # noqa: E402

EVENT_TYPE = "EXAMPLE_DISK_CLONED"
STREAM_EVENTS = 5
TIMEOUT = 10.0


class Failure(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default=os.environ.get("FLEET_EVENTS_SERVER", "127.0.0.1:50051"))
    ap.add_argument("--ca", default=os.environ.get("FLEET_EVENTS_CA", "fleet-events-data/ca.pem"))
    ap.add_argument("--token", default=os.environ.get("FLEET_EVENTS_TOKEN", ""))
    args = ap.parse_args()
    if not args.token:
        raise Failure("connect: no token (--token or FLEET_EVENTS_TOKEN)")
    addr = args.server.removeprefix("https://")  # the CLI's form is accepted too

    # 1. TLS that trusts only the server's own CA, plus the bearer token on every call.
    creds = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=Path(args.ca).read_bytes()),
        grpc.access_token_call_credentials(args.token),
    )
    with grpc.secure_channel(addr, creds) as channel:
        run(channel, addr)


def run(channel: grpc.Channel, addr: str) -> None:
    events = pb_grpc.EventServiceStub(channel)

    me = pb_grpc.AccessServiceStub(channel).WhoAmI(pb.WhoAmIRequest(), timeout=TIMEOUT)
    print(f"connect server={addr} kind={me.kind} name={me.name} role={pb.Role.Name(me.role)}")

    # The application's own event type (clients may not send the server's KLSRV_* types).
    result = "created"
    try:
        pb_grpc.CatalogServiceStub(channel).RegisterEventType(
            pb.RegisterEventTypeRequest(
                event_type=EVENT_TYPE,
                severity=pb.SEVERITY_WARNING,
                display_name="Disk cloned (example)",
                application="fleet-events examples",
            ),
            timeout=TIMEOUT,
        )
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        result = "exists"
    print(f"register event_type={EVENT_TYPE} result={result}")

    # A device of our own, so that the query below counts only this run's events.
    device = f"example-python-{time.time_ns()}"

    def event(event_id: str) -> pb.Event:
        return pb.Event(event_id=event_id, device_id=device, event_type=EVENT_TYPE,
                        params={"fingerprint": "hw-42"})

    # 2. Unary Classify.
    c = events.Classify(event("classify-1"), timeout=TIMEOUT)
    if c.outcome != pb.OUTCOME_STORED:
        raise Failure(f"classify: outcome {pb.Outcome.Name(c.outcome)}, want OUTCOME_STORED")
    print(f"classify event_id={c.event_id} outcome={pb.Outcome.Name(c.outcome)} "
          f'severity={pb.Severity.Name(c.severity)} display_name="{c.display_name}"')

    # 3. Bidi Stream: exactly one answer per event, in order.
    sent = [event(f"stream-{i + 1}") for i in range(STREAM_EVENTS)]
    answers = list(events.Stream(iter(sent), timeout=TIMEOUT))
    if len(answers) != len(sent):
        raise Failure(f"stream: {len(answers)} answers to {len(sent)} events")
    for i, (answer, ev) in enumerate(zip(answers, sent), start=1):
        if answer.event_id != ev.event_id:
            raise Failure(f"stream: answer {i} is for {answer.event_id!r}, want {ev.event_id!r}")
    stored = sum(a.outcome == pb.OUTCOME_STORED for a in answers)
    print(f"stream sent={len(sent)} received={len(answers)} in_order=true stored={stored}")

    # 4. A resend of an event already taken (same device_id and event_id).
    dup = events.Classify(sent[0], timeout=TIMEOUT)
    if dup.outcome != pb.OUTCOME_DUPLICATE:
        raise Failure(f"duplicate: outcome {pb.Outcome.Name(dup.outcome)}, want OUTCOME_DUPLICATE")
    print(f"duplicate event_id={dup.event_id} outcome={pb.Outcome.Name(dup.outcome)}")

    # 5. Subscribe: registered once the response headers arrive; then one more event.
    sub = events.Subscribe(pb.SubscribeRequest(device_ids=[device]), timeout=TIMEOUT)
    try:
        sub.initial_metadata()
        events.Classify(event("live-1"), timeout=TIMEOUT)
        live = next(sub)
    finally:
        sub.cancel()
    if live.event_id != "live-1":
        raise Failure(f"subscribe: received {live.event_id!r}, want 'live-1'")
    print(f"subscribe event_id={live.event_id} received=true")

    # 6. QueryEvents, two per page, following next_page_token to the end.
    query = pb.QueryEventsRequest(device_id=device, page_size=2)
    count = pages = 0
    while True:
        page = events.QueryEvents(query, timeout=TIMEOUT)
        count += len(page.events)
        pages += 1
        if not page.next_page_token:
            break
        query.page_token = page.next_page_token
    if count != 1 + STREAM_EVENTS + 1:
        raise Failure(f"query: {count} events, want {1 + STREAM_EVENTS + 1}")
    print(f"query page_size=2 pages={pages} count={count}")

    # 7. A bad event: INVALID_ARGUMENT with google.rpc details (grpc-status-details-bin).
    bad = event("bad-1")
    bad.device_id = ""
    try:
        events.Classify(bad, timeout=TIMEOUT)
        raise Failure("invalid: an event without device_id was accepted")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
            raise
        code = e.code().name
        status = rpc_status.from_call(e)  # None when the trailer is missing
    field = reason = domain = ""
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            field = ",".join(v.field for v in bad_request.field_violations)
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain = info.reason, info.domain
    if (field, reason, domain) != ("device_id", "INVALID_FIELD", "fleet-events"):
        raise Failure(f"invalid: details field={field!r} reason={reason!r} domain={domain!r}")
    print(f"invalid code={code} field={field} reason={reason} domain={domain}")
    print("done")


if __name__ == "__main__":
    try:
        main()
    except (Failure, grpc.RpcError, OSError) as err:
        detail = f"{err.code().name}: {err.details()}" if isinstance(err, grpc.RpcError) else err
        print(f"FAIL {detail}", file=sys.stderr)
        sys.exit(1)
