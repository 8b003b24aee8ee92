"""The Prometheus metrics port, scraped over HTTP by Python's standard library and parsed by the
official Python client's OpenMetrics parser (``prometheus_client``): every family the README
lists is there, counters move by exactly what a grpcio client sent, and the bearer token is
required."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from conftest import DEFAULT_CONFIG
from fleet_helpers import event, rpc_error

TOKEN = "py-scrape-token-7f3a"

# Every family the README lists that a fresh single server (no primary) reports.
FAMILIES = {
    "fleet_events": "counter",
    "fleet_events_refused": "counter",
    "fleet_events_by_type": "counter",
    "fleet_store_commit_events": "histogram",
    "fleet_store_commit_duration_seconds": "histogram",
    "fleet_store_write_queue_depth": "gauge",
    "fleet_store_write_queue_capacity": "gauge",
    "fleet_store_events": "gauge",
    "fleet_store_size_bytes": "gauge",
    "fleet_store_healthy": "gauge",
    "fleet_streams_open": "gauge",
    "fleet_subscribers_open": "gauge",
    "fleet_subscriber_missed_events": "counter",
    "fleet_flood_blocks": "gauge",
    "fleet_flood_held_back_events": "gauge",
    "fleet_build_info": "gauge",
    "fleet_notification_queue_events": "gauge",
    "fleet_notifications_dropped": "counter",
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_open_fds": "gauge",
    "process_start_time_seconds": "gauge",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return _free_port()


@pytest.fixture(scope="module")
def server_config(tmp_path_factory, metrics_port) -> str:
    token_file = tmp_path_factory.mktemp("metrics") / "metrics.token"
    token_file.write_text(TOKEN + "\n")
    return DEFAULT_CONFIG + (
        f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\ntoken_file = "{token_file}"\n'
    )


def _get(port: int, token: str | None, path: str = "/metrics", method: str = "GET"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of one scrape, by (sample name, sorted labels)."""
    status, headers, body = _get(port, TOKEN)
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def families(port: int) -> dict[str, str]:
    _, _, body = _get(port, TOKEN)
    return {f.name: f.type for f in text_string_to_metric_families(body)}


def test_every_listed_family_is_there_with_its_type(server, metrics_port):
    got = families(metrics_port)
    for name, kind in FAMILIES.items():
        assert got.get(name) == kind, f"{name}: {got.get(name)!r}, expected {kind}"


def test_counters_move_by_exactly_what_a_client_sent(server, metrics_port):
    before = scrape(metrics_port)
    for i in range(4):
        server.events.Classify(event("py-metrics-1", "MYAPP_METRICS_WARN", event_id=f"m{i}"),
                               timeout=10)
    # A repeat is a duplicate.
    server.events.Classify(event("py-metrics-1", "MYAPP_METRICS_WARN", event_id="m0"), timeout=10)
    err = rpc_error(server.events.Classify, event("", "MYAPP_METRICS_WARN", event_id="bad"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(metrics_port)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    # The type is not in the catalog: counted as "other" under the unknown-type severity.
    assert delta("fleet_events_by_type_total", event_type="other", outcome="stored") == 4
    assert delta("fleet_events_by_type_total", event_type="other", outcome="duplicate") == 1
    assert sum(
        delta("fleet_events_total", severity=s, outcome="stored")
        for s in ("INFO", "WARNING", "FUNCTIONAL_FAILURE", "CRITICAL")
    ) == 4
    assert delta("fleet_events_refused_total", reason="invalid_argument") == 1
    assert delta("fleet_store_commit_events_count") >= 1
    assert after[("fleet_store_healthy", ())] == 1
    assert after[("fleet_store_events", ())] >= 4


def test_the_token_is_required_and_other_requests_are_refused(server, metrics_port):
    assert _get(metrics_port, None)[0] == 401
    assert _get(metrics_port, "wrong")[0] == 401
    assert _get(metrics_port, TOKEN, path="/")[0] == 404
    status, headers, _ = _get(metrics_port, TOKEN, method="POST")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"
    # Still serving.
    assert ("fleet_store_healthy", ()) in scrape(metrics_port)
