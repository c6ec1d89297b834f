"""The RESTPP loader through the real pyTigerGraph, over HTTP, against the local endpoint."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from starvit_assets.graph.loader import (
    GraphLoadError,
    RestppGraphLoader,
    TigerGraphConfig,
    graph_loader,
    reconcile,
)
from starvit_assets.graph.schema import EDGE_SEGMENTS, VERTEX_TYPES, GraphData, schema_gsql
from starvit_assets.settings import StarvitSettings
from starvit_assets_tests.fakes.tigergraph_endpoint import FakeTigerGraphEndpoint
from starvit_assets_tests.unit.test_graph_files import sample_graph

pytestmark = pytest.mark.integration

SECRET = "s3cr3t-for-tests"


@pytest.fixture
def endpoint() -> Iterator[FakeTigerGraphEndpoint]:
    with FakeTigerGraphEndpoint(schema_gsql(), secret=SECRET, require_token=True) as fake:
        yield fake


def loader(endpoint: FakeTigerGraphEndpoint, **overrides: object) -> RestppGraphLoader:
    settings: dict[str, object] = {
        "host": endpoint.url,
        "secret": SECRET,
        "batch_size": 2,
        "retry_wait_seconds": 0.0,
        **overrides,
    }
    return RestppGraphLoader(TigerGraphConfig(**settings))  # type: ignore[arg-type]


def upserts(endpoint: FakeTigerGraphEndpoint) -> list[tuple[int, int, int]]:
    return [
        (r.status, r.vertices, r.edges)
        for r in endpoint.requests
        if r.path == "/restpp/graph/starvit"
    ]


def test_load_upserts_in_batches_and_reconciles(endpoint: FakeTigerGraphEndpoint) -> None:
    graph = sample_graph()
    hook_before = sys.excepthook

    report = loader(endpoint).load(graph)

    assert reconcile(graph.counts(), report) == []
    assert report.loaded == report.in_target == graph.counts()
    # Two patients in one batch of two; every other type in one batch each; empty types none.
    assert [v for _, v, _ in upserts(endpoint) if v] == [2, 1, 1, 1]
    assert report.batches == len(upserts(endpoint)) == 4 + 4
    assert endpoint.requests[0].path == "/gsql/v1/tokens"
    # Two conditions of one patient with one code stay two edges (the discriminator).
    assert endpoint.edge_count("has_condition") == 2
    assert endpoint.vertex("Patient", "p2") == {
        "gender": "male",
        "age_bracket": "90+",
        "weight_category": "",  # no null in TigerGraph: the STRING default
    }
    ((key, observation),) = endpoint.edges_of("has_observation")[:1]
    assert key[:5] == ("has_observation", "Encounter", "e1", "ObservationType", "29463-7")
    assert observation == {
        "observation_id": "o1",
        "effective_at": "2020-01-01 09:10:00",
        "value": 70.5,
        "unit": "kg",
    }
    assert sys.excepthook is hook_before


def test_batches_follow_the_configured_size(endpoint: FakeTigerGraphEndpoint) -> None:
    graph = GraphData(vertices={"Patient": [(f"p{i}", "female", None, None) for i in range(7)]})

    report = loader(endpoint, batch_size=3).load(graph)

    assert [v for _, v, _ in upserts(endpoint)] == [3, 3, 1]
    assert report.loaded["Patient"] == report.in_target["Patient"] == 7


def test_reloading_is_idempotent_and_updates_in_place(endpoint: FakeTigerGraphEndpoint) -> None:
    graph = sample_graph()
    first = loader(endpoint).load(graph)
    graph.vertices["Patient"][0] = ("p1", "female", "40-49", None)
    graph.edges["has_observation_from_Encounter"][0] = ("e1", "29463-7", "o1", None, None, "kg")

    second = loader(endpoint).load(graph)

    assert second.in_target == first.in_target == graph.counts()
    assert second.loaded == graph.counts()
    # Updated in place; a value that became null is the type default, not the old value.
    assert endpoint.vertex("Patient", "p1") == {
        "gender": "female",
        "age_bracket": "40-49",
        "weight_category": "",
    }
    ((_, observation),) = endpoint.edges_of("has_observation")[:1]
    assert observation["effective_at"] == "1970-01-01 00:00:00"
    assert observation["value"] == 0.0


@pytest.mark.parametrize("json_body", [True, False], ids=["tigergraph-error", "proxy-html"])
def test_transient_errors_are_retried(endpoint: FakeTigerGraphEndpoint, json_body: bool) -> None:
    graph = sample_graph()
    endpoint.fail_next(2, status=503, json_body=json_body)

    report = loader(endpoint).load(graph)

    assert reconcile(graph.counts(), report) == []
    assert [status for status, _, _ in upserts(endpoint)][:3] == [503, 503, 200]
    # batches, the two retries, the token, one listing per vertex type (for stale vertices),
    # one vertex count and one count per edge segment
    assert report.attempts == report.batches + 2 + 1 + len(VERTEX_TYPES) + 1 + len(EDGE_SEGMENTS)


def test_persistent_errors_fail_with_status_and_step(endpoint: FakeTigerGraphEndpoint) -> None:
    endpoint.fail_next(3, status=502, json_body=False)

    with pytest.raises(GraphLoadError) as raised:
        loader(endpoint, max_attempts=3).load(sample_graph())

    message = str(raised.value)
    assert "upsert of Patient vertices (batch 1)" in message
    assert "HTTP 502" in message
    assert "after 3 attempt(s)" in message
    assert "p1" not in message and SECRET not in message


def test_a_refused_payload_is_not_retried(endpoint: FakeTigerGraphEndpoint) -> None:
    graph = sample_graph()
    graph.edges["has_encounter"] = [("p1", "e1", "1 January 2020", None)]

    with pytest.raises(GraphLoadError) as raised:
        loader(endpoint).load(graph)

    message = str(raised.value)
    assert "upsert of has_encounter edges (batch 1)" in message
    assert "HTTP 400" in message and "after 1 attempt(s)" in message
    assert "REST-30000" in message


def test_edges_to_missing_vertices_are_skipped_and_fail_reconciliation(
    endpoint: FakeTigerGraphEndpoint,
) -> None:
    graph = sample_graph()
    graph.edges["has_condition"].append(("p-unknown", "38341003", "c3", None, None))

    report = loader(endpoint).load(graph)

    assert report.loaded["has_condition"] == report.in_target["has_condition"] == 2
    assert endpoint.vertex("Patient", "p-unknown") is None
    assert reconcile(graph.counts(), report) == [
        "has_condition: 3 source rows, 2 loaded",
        "has_condition: 3 source rows, 2 in the tigergraph target",
    ]


def deletions(endpoint: FakeTigerGraphEndpoint) -> list[tuple[str, int]]:
    return [(r.path, r.status) for r in endpoint.requests if r.method == "DELETE"]


def test_a_stale_vertex_left_from_an_earlier_load_is_deleted_with_its_edges(
    endpoint: FakeTigerGraphEndpoint,
) -> None:
    graph = sample_graph()
    loader(endpoint).load(graph)
    assert endpoint.edge_count("has_observation") == 2
    del graph.vertices["Patient"][1]  # p2: deleted at the source, or purged
    graph.edges["has_observation_from_Patient"] = []

    report = loader(endpoint).load(graph)

    assert reconcile(graph.counts(), report) == []
    assert report.deleted == {
        "Patient": 1,
        "Encounter": 0,
        "Condition": 0,
        "Medication": 0,
        "ObservationType": 0,
    }
    assert endpoint.vertex("Patient", "p2") is None
    assert endpoint.vertex("Patient", "p1") is not None
    # TigerGraph deletes a vertex's edges with it: p2's observation edge went too.
    assert [key[2] for key, _ in endpoint.edges_of("has_observation")] == ["e1"]
    assert deletions(endpoint) == [("/restpp/graph/starvit/vertices/Patient/p2", 200)]
    listings = [r for r in endpoint.requests if r.method == "GET" and "/vertices/" in r.path]
    assert [r.query for r in listings][:1] == [{"select": "patient_id"}]


def test_stale_vertex_deletions_are_batched_retried_and_idempotent(
    endpoint: FakeTigerGraphEndpoint,
) -> None:
    graph = sample_graph()
    for number in range(5):
        endpoint.add_vertex("Patient", f"stale-{number}")
    # A stale id with a character that must be escaped in the URL path.
    endpoint.add_vertex("Condition", "stale/code 1")
    endpoint.fail_next(1, status=503, method="DELETE")

    report = loader(endpoint, batch_size=2).load(graph)

    assert reconcile(graph.counts(), report) == []
    assert report.deleted["Patient"] == 5 and report.deleted["Condition"] == 1
    assert endpoint.vertex("Condition", "stale/code 1") is None
    sent = deletions(endpoint)
    # the first DELETE failed; its batch (stale-0, stale-1) was sent again; then two batches
    assert sent[0] == ("/restpp/graph/starvit/vertices/Patient/stale-0", 503)
    assert [path.rsplit("/", 1)[1] for path, status in sent[1:6]] == [
        "stale-0",
        "stale-1",
        "stale-2",
        "stale-3",
        "stale-4",
    ]
    assert len(sent) == 1 + 5 + 1

    again = loader(endpoint, batch_size=2).load(graph)

    assert reconcile(graph.counts(), again) == []
    assert sum(again.deleted.values()) == 0
    assert len(deletions(endpoint)) == len(sent)  # nothing left to delete, nothing sent


def test_deleting_a_vertex_that_is_already_gone_deletes_nothing(
    endpoint: FakeTigerGraphEndpoint,
) -> None:
    # What makes a retried deletion batch safe: the ids an interrupted attempt deleted are
    # deleted again without an error.
    connection = loader(endpoint)._connect()
    try:
        endpoint.add_vertex("Patient", "p9")
        assert connection.delVerticesById("Patient", ["p9"]) == 1
        assert connection.delVerticesById("Patient", ["p9"]) == 0
    finally:
        connection.close()


def test_a_stalled_request_times_out_and_is_retried(
    endpoint: FakeTigerGraphEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    graph = sample_graph()
    endpoint.stall_next(1, seconds=5.0)

    with caplog.at_level("WARNING", logger="starvit.graph"):
        report = loader(endpoint, timeout_seconds=0.3).load(graph)

    assert reconcile(graph.counts(), report) == []
    # the stalled request (the first Patient upsert) was abandoned and its batch sent again
    assert [r.getMessage() for r in caplog.records] == [
        "TigerGraph upsert of Patient vertices (batch 1): no HTTP response; retrying (attempt 1)"
    ]
    assert report.attempts == report.batches + 1 + 1 + len(VERTEX_TYPES) + 1 + len(EDGE_SEGMENTS)


def test_a_request_that_keeps_stalling_ends_in_a_clear_error(
    endpoint: FakeTigerGraphEndpoint,
) -> None:
    endpoint.stall_next(2, seconds=5.0)

    with pytest.raises(GraphLoadError) as raised:
        loader(endpoint, timeout_seconds=0.3, max_attempts=2).load(sample_graph())

    message = str(raised.value)
    assert "upsert of Patient vertices (batch 1)" in message
    assert "no HTTP response" in message and "after 2 attempt(s)" in message
    assert "timed out" in message
    assert "p1" not in message and SECRET not in message


def test_the_timeout_is_also_sent_as_the_gsql_timeout() -> None:
    loader_ = RestppGraphLoader(
        TigerGraphConfig(host="http://tg.example.org:14240", timeout_seconds=1.5)
    )
    connection = loader_._connect()
    try:
        assert connection.responseConfigHeader["GSQL-TIMEOUT"] == "1500"
    finally:
        connection.close()


def test_username_and_password_mint_a_token_when_restpp_asks_for_one() -> None:
    schema = schema_gsql()
    with FakeTigerGraphEndpoint(schema, password="pw", require_token=True) as endpoint:
        report = loader(endpoint, secret="", username="tigergraph", password="pw").load(
            sample_graph()
        )
        statuses = [(r.path, r.status) for r in endpoint.requests[:3]]

    assert reconcile(sample_graph().counts(), report) == []
    assert statuses == [
        ("/restpp/graph/starvit", 401),
        ("/gsql/v1/tokens", 200),
        ("/restpp/graph/starvit", 200),
    ]


def test_tigergraph_3_token_endpoint_is_used_when_the_4_endpoint_is_absent() -> None:
    with FakeTigerGraphEndpoint(
        schema_gsql(), version="3.10.1", secret=SECRET, require_token=True
    ) as endpoint:
        report = loader(endpoint).load(sample_graph())
        paths = [(r.path, r.status) for r in endpoint.requests[:2]]

    assert paths == [("/gsql/v1/tokens", 404), ("/restpp/requesttoken", 200)]
    assert reconcile(sample_graph().counts(), report) == []


def test_a_wrong_secret_is_a_clear_error(endpoint: FakeTigerGraphEndpoint) -> None:
    with pytest.raises(GraphLoadError) as raised:
        loader(endpoint, secret="wrong").load(sample_graph())

    assert "token request" in str(raised.value)
    assert "wrong" not in str(raised.value)


def test_settings_choose_the_loader(tmp_path: object) -> None:
    files = graph_loader(StarvitSettings(home=tmp_path))  # type: ignore[arg-type]
    restpp = graph_loader(
        StarvitSettings(
            home=tmp_path,  # type: ignore[arg-type]
            tigergraph_host="http://tg.example.org:14240",
            tigergraph_secret="x",  # type: ignore[arg-type]
            tigergraph_batch_size=50,
            tigergraph_timeout_seconds=12.5,
        )
    )
    assert type(files).__name__ == "FileGraphLoader"
    assert isinstance(restpp, RestppGraphLoader)
    assert restpp.config.batch_size == 50 and restpp.config.secret == "x"
    assert restpp.config.timeout_seconds == 12.5
    assert "secret" not in repr(restpp.config)


def test_https_certificates_are_verified() -> None:
    # pyTigerGraph would send the token to any https server without checking its certificate.
    connection = RestppGraphLoader(TigerGraphConfig(host="https://tg.example.org:14240"))._connect()
    try:
        assert connection.verify is True
        assert connection._session.verify is True
    finally:
        connection.close()
