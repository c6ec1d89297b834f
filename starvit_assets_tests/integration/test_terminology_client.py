"""The terminology client against the local terminology server, over real HTTP: batching,
retries, timeouts, clear errors and the persistent, bounded cache."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from starvit_assets.fhir import synth
from starvit_assets.terminology.cache import ResponseCache
from starvit_assets.terminology.client import ClientConfig, RemoteTerminology
from starvit_assets.terminology.model import (
    Coding,
    NotFoundError,
    TerminologyError,
    TranslateRequest,
)
from starvit_assets.terminology.server import TerminologyServer

FAST = ClientConfig(timeout_seconds=5.0, attempts=4, backoff_seconds=0.0, batch_size=50)
VITAL_SIGNS = "https://starvit.example.org/fhir/ValueSet/vital-signs"


@pytest.fixture
def server() -> Iterator[TerminologyServer]:
    with TerminologyServer() as running:
        yield running


def _client(
    server: TerminologyServer,
    cache: ResponseCache | None = None,
    config: ClientConfig = FAST,
    waits: list[float] | None = None,
) -> RemoteTerminology:
    sleep = waits.append if waits is not None else (lambda _seconds: None)
    return RemoteTerminology(server.base_url, cache=cache, config=config, sleep=sleep)


def _codings(count: int) -> list[Coding]:
    known = [Coding(synth.LOINC, code) for code in synth.OBSERVATION_CODES]
    unknown = [Coding(synth.LOINC, f"{n}-0") for n in range(count)]
    return (known + unknown)[:count]


def test_many_codes_go_in_batch_bundles_of_batch_size(server: TerminologyServer) -> None:
    codings = _codings(120)
    answers = _client(server).validate_codes(codings)
    assert [a.valid for a in answers] == [c.code in synth.OBSERVATION_CODES for c in codings]
    assert [(r.path, r.entries) for r in server.requests] == [
        ("/fhir", 50),
        ("/fhir", 50),
        ("/fhir", 20),
    ]


def test_every_operation_over_http(server: TerminologyServer) -> None:
    client = _client(server)
    unknown_system = client.validate_code(Coding("http://loinc.org/", "8302-2"))
    assert not unknown_system.valid and not unknown_system.system_known
    assert client.validate_code(Coding(synth.LOINC, "8302-2")).display == "Body height"
    assert client.lookup(Coding(synth.RXNORM, "197361")).display == "amlodipine 5 MG Oral Tablet"
    with pytest.raises(NotFoundError, match="Unknown code"):
        client.lookup(Coding(synth.RXNORM, "0"))
    assert client.validate_in_value_set(VITAL_SIGNS, Coding(synth.LOINC, "8480-6")).valid
    assert not client.validate_in_value_set(VITAL_SIGNS, Coding(synth.LOINC, "718-7")).valid
    expansion = client.expand(VITAL_SIGNS, count=3)
    assert expansion.total == 9 and len(expansion.contains) == 3
    with pytest.raises(NotFoundError, match="ValueSet"):
        client.expand("https://starvit.example.org/fhir/ValueSet/none")
    translations = client.translate_many(
        [
            TranslateRequest(Coding(synth.SNOMED, "44054006"), target_system=synth.ICD10CM),
            TranslateRequest(Coding(synth.SNOMED, "73761001"), target_system=synth.ICD10CM),
        ]
    )
    best = translations[0].best()
    assert best is not None and best.target.code == "E11.9"
    assert not translations[1].result and translations[1].best() is None
    assert server.requests[-1].entries == 2  # the two translations went as one batch


def test_the_server_answers_query_parameters_and_refuses_bad_requests(
    server: TerminologyServer,
) -> None:
    base = server.base_url
    validated = httpx.get(
        f"{base}/CodeSystem/$validate-code", params={"url": synth.CVX, "code": "115"}
    )
    assert validated.status_code == 200
    assert validated.json()["parameter"][0] == {"name": "result", "valueBoolean": True}
    missing = httpx.get(f"{base}/CodeSystem/$lookup", params={"code": "115"})
    assert missing.status_code == 400
    assert "needs a code and a system" in missing.json()["issue"][0]["diagnostics"]
    capability = httpx.get(f"{base}/metadata").json()
    assert capability["resourceType"] == "CapabilityStatement"
    assert (
        httpx.post(base, json={"resourceType": "Bundle", "type": "transaction"}).status_code == 400
    )


def test_5xx_and_429_are_retried_honouring_a_short_retry_after(server: TerminologyServer) -> None:
    server.faults.statuses[:] = [503, 429]
    server.faults.retry_after = "2"
    waits: list[float] = []
    answer = _client(server, waits=waits).validate_code(Coding(synth.CVX, "21"))
    assert answer.valid
    assert [r.status for r in server.requests] == [503, 429, 200]
    assert waits == [2.0, 2.0]


def test_a_transient_batch_entry_failure_retries_the_bundle(server: TerminologyServer) -> None:
    server.faults.entry_statuses[:] = [503]
    answers = _client(server).validate_codes(_codings(3))
    assert [a.valid for a in answers] == [True, True, True]
    assert [r.entries for r in server.requests] == [3, 3]


def test_a_persistent_5xx_gives_up_with_the_operation_and_status(server: TerminologyServer) -> None:
    server.faults.statuses[:] = [502] * 10
    with pytest.raises(TerminologyError) as raised:
        _client(server).lookup(Coding(synth.CVX, "21"))
    assert str(raised.value) == (
        "terminology CodeSystem/$lookup failed (HTTP 502): injected HTTP 502 "
        "(gave up after 4 attempts)"
    )
    assert raised.value.status == 502
    assert len(server.requests) == 4


def test_a_4xx_is_not_retried_and_says_why(server: TerminologyServer) -> None:
    server.faults.statuses[:] = [403]
    with pytest.raises(TerminologyError, match=r"ConceptMap/\$translate failed \(HTTP 403\)"):
        _client(server).translate(TranslateRequest(Coding(synth.SNOMED, "38341003")))
    assert len(server.requests) == 1


def test_a_slow_server_times_out_with_a_clear_error(server: TerminologyServer) -> None:
    server.faults.delay_seconds = 1.0
    config = ClientConfig(timeout_seconds=0.2, attempts=2, backoff_seconds=0.0)
    with pytest.raises(TerminologyError) as raised:
        _client(server, config=config).validate_code(Coding(synth.CVX, "21"))
    message = str(raised.value)
    assert message.startswith("terminology CodeSystem/$validate-code failed (no HTTP response)")
    assert "timed out after 0.2 s" in message and "gave up after 2 attempts" in message


def test_an_unreachable_server_is_a_network_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = RemoteTerminology(
        f"http://127.0.0.1:{port}/fhir", config=ClientConfig(attempts=2, backoff_seconds=0.0)
    )
    with pytest.raises(TerminologyError, match=r"\(no HTTP response\): network error"):
        client.validate_code(Coding(synth.CVX, "21"))


def test_answers_persist_between_runs_in_the_cache(
    server: TerminologyServer, tmp_path: Path
) -> None:
    path = tmp_path / "state" / "terminology-cache.sqlite"
    codings = _codings(20)
    first = _client(server, ResponseCache(path)).validate_codes(codings)
    assert len(server.requests) == 1
    server.clear_requests()
    # A new client and a new cache object over the same file: a later run.
    again = _client(server, ResponseCache(path)).validate_codes(codings)
    assert again == first
    assert server.requests == []
    # Only the codes not seen before are asked for.
    _client(server, ResponseCache(path)).validate_codes([*codings, Coding(synth.CVX, "03")])
    assert [r.entries for r in server.requests] == [1]


def test_the_cache_is_bounded_least_recently_used_first(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "cache.sqlite", max_entries=3)
    for key in ("a", "b", "c"):
        cache.put(key, {"answer": key})
    assert cache.get("a") == {"answer": "a"}  # a is now the most recently used
    cache.put("d", {"answer": "d"})
    assert len(cache) == 3
    assert cache.get("b") is None
    assert {k for k in "acd" if cache.get(k) is not None} == {"a", "c", "d"}
    # The bound holds for a new cache object over the same file too.
    reopened = ResponseCache(tmp_path / "cache.sqlite", max_entries=2)
    reopened.put("e", {"answer": "e"})
    assert len(reopened) == 2


def test_cached_answers_expire(tmp_path: Path) -> None:
    now = [1000.0]
    cache = ResponseCache(tmp_path / "cache.sqlite", max_age_seconds=60, clock=lambda: now[0])
    cache.put("a", {"answer": "a"})
    now[0] += 59
    assert cache.get("a") == {"answer": "a"}
    now[0] += 2
    assert cache.get("a") is None


def test_failures_are_not_cached(server: TerminologyServer, tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "cache.sqlite")
    server.faults.statuses[:] = [500] * 4
    with pytest.raises(TerminologyError):
        _client(server, cache).validate_code(Coding(synth.CVX, "21"))
    assert len(cache) == 0
    assert _client(server, cache).validate_code(Coding(synth.CVX, "21")).valid
    assert len(cache) == 1
