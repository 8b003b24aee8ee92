"""The contract as a grpcio client meets it (issue 13): structured error details read with
grpcio-status, undecodable messages refused as INVALID_ARGUMENT naming the stream index, the
outcome of a resend, and comments on every method through reflection (grpcurl describe)."""

from __future__ import annotations

import re
import shutil
import subprocess

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from fleet_helpers import RPC_TIMEOUT, event, rpc_error
from fleetevents.v1 import fleetevents_pb2 as pb

CLASSIFY = "/fleetevents.v1.EventService/Classify"
STREAM = "/fleetevents.v1.EventService/Stream"


def details(err: grpc.RpcError) -> dict[str, object]:
    """The google.rpc details of a refusal, by message name."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no grpc-status-details-bin on {err.code()}: {err.details()}"
    assert status.code == err.code().value[0]
    out: dict[str, object] = {}
    for any_ in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest,
                    error_details_pb2.ResourceInfo, error_details_pb2.RetryInfo):
            if any_.Is(cls.DESCRIPTOR):
                msg = cls()
                any_.Unpack(msg)
                out[cls.DESCRIPTOR.name] = msg
    return out


def raw_classify(server, payload: bytes):
    call = server.channel.unary_unary(CLASSIFY, request_serializer=lambda b: b,
                                      response_deserializer=pb.Classification.FromString)
    return call(payload, timeout=RPC_TIMEOUT)


def test_a_bad_field_names_it_in_a_bad_request(server):
    err = rpc_error(server.events.Classify, event("", "PY_CONTRACT_TYPE", event_id="c-1"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    d = details(err)
    info = d["ErrorInfo"]
    assert (info.reason, info.domain) == ("INVALID_FIELD", "fleet-events")
    assert [v.field for v in d["BadRequest"].field_violations] == ["device_id"]
    # Each thing is said once.
    assert err.details().count("device_id") == 1, err.details()


def test_not_found_names_the_resource(server):
    err = rpc_error(server.catalog.GetEventType, pb.GetEventTypeRequest(event_type="PY_NOPE"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    d = details(err)
    assert d["ErrorInfo"].reason == "NOT_FOUND"
    r = d["ResourceInfo"]
    assert (r.resource_type, r.resource_name) == ("fleetevents.v1.EventType", "PY_NOPE")


@pytest.mark.parametrize("payload", [
    b"\xff\xff\xff\xff",                       # not protobuf at all
    b"\x12\x02\xff\xfe",                       # device_id that is not UTF-8
    b"\x0a\x10abc",                            # a length past the end
], ids=["garbage", "not-utf8", "truncated"])
def test_an_undecodable_unary_message_is_invalid_argument(server, payload):
    with pytest.raises(grpc.RpcError) as info:
        raw_classify(server, payload)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert details(err)["ErrorInfo"].reason == "UNDECODABLE_MESSAGE"
    # The server goes on serving.
    ok = server.events.Classify(
        event(f"py-after-{payload.hex()}", "PY_CONTRACT_TYPE", event_id="after"),
        timeout=RPC_TIMEOUT)
    assert ok.outcome == pb.OUTCOME_STORED


def test_an_undecodable_stream_message_is_named_by_its_index(server):
    # A device of its own per test: the module's server blocks more than 5 a device and type.
    good = [event("py-stream", "PY_CONTRACT_TYPE", event_id=f"s-{i}").SerializeToString()
            for i in range(2)]
    msgs = good + [b"\x12\x02\xff\xfe", good[0]]
    call = server.channel.stream_stream(STREAM, request_serializer=lambda b: b,
                                        response_deserializer=pb.Classification.FromString)
    answers = []
    with pytest.raises(grpc.RpcError) as info:
        for a in call(iter(msgs), timeout=RPC_TIMEOUT):
            answers.append(a)
    assert [a.event_id for a in answers] == ["s-0", "s-1"]
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith("event #3"), err.details()
    d = details(err)
    assert d["ErrorInfo"].reason == "UNDECODABLE_MESSAGE"
    assert d["ErrorInfo"].metadata["event_index"] == "3"


def test_a_resend_is_answered_as_a_duplicate(server):
    first = server.events.Classify(event("py-dup", "PY_CONTRACT_TYPE", event_id="dup-1"),
                                   timeout=RPC_TIMEOUT)
    again = server.events.Classify(event("py-dup", "PY_CONTRACT_TYPE", event_id="dup-1"),
                                   timeout=RPC_TIMEOUT)
    assert (first.outcome, again.outcome) == (pb.OUTCOME_STORED, pb.OUTCOME_DUPLICATE)
    assert pb.Outcome.Name(again.outcome) == "OUTCOME_DUPLICATE"


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is installed by scripts/test.sh")
def test_grpcurl_describe_shows_a_comment_on_every_method(server):
    base = ["grpcurl", "-cacert", str(server.data_dir / "ca.pem"),
            "-H", f"authorization: Bearer {server.admin_token}", server.address]
    services = [s for s in subprocess.run(base + ["list"], check=True, capture_output=True,
                                          text=True, timeout=30).stdout.split()
                if s.startswith("fleetevents.v1.")]
    assert len(services) >= 13, services
    for service in services:
        text = subprocess.run(base + ["describe", service], check=True, capture_output=True,
                              text=True, timeout=30).stdout
        lines = text.splitlines()
        rpcs = [i for i, line in enumerate(lines) if line.strip().startswith("rpc ")]
        assert rpcs, text
        for i in rpcs:
            assert lines[i - 1].strip().startswith("//"), f"{service}: {lines[i]} has no comment"
        assert re.search(r"^// \S", text, re.M), f"{service} has no comment"
