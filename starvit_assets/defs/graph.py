"""Graph zone: TigerGraph loading files written from the refined and derived models."""

from collections.abc import Iterator

import dagster as dg

from starvit_assets.defs.resources import PlatformResource
from starvit_assets.graph.files import EDGE_TYPES, VERTEX_TYPES, count_csv_rows, write_loading_files
from starvit_assets.graph.source import GRAPH_SOURCE_MODELS, read_graph_data

GROUP = "graph"
RECONCILE_CHECK = "counts_reconcile"
GRAPH_KEY = dg.AssetKey([GROUP, "tigergraph_load"])

CONTRACT = {
    "grain": (
        "one CSV row per vertex (Patient, Condition, Medication) and per edge (has_condition, "
        "prescribed); the whole graph is replaced on every load"
    ),
    # A vertex's key is its first attribute. Edges have no key: one per refined condition with
    # a SNOMED code, one per refined medication request with an RxNorm code.
    "keys": [[f"{vertex.name}.{vertex.attributes[0]}"] for vertex in VERTEX_TYPES],
    "semantics": (
        "Patients (pseudonymised id, gender, age bracket, weight category) from "
        "derived.patient_features; Condition (SNOMED CT) and Medication (RxNorm) vertices "
        "from the refined models, with their display text; edges from each patient to the "
        "codes of their conditions (with onset_at) and medication requests (with authored_at)."
    ),
    "vertices": {vertex.name: list(vertex.attributes) for vertex in VERTEX_TYPES},
    "edges": {
        edge.name: {
            "from": edge.from_vertex,
            "to": edge.to_vertex,
            "attributes": list(edge.attributes),
        }
        for edge in EDGE_TYPES
    },
}


@dg.asset(
    key=GRAPH_KEY,
    deps=[dg.AssetKey(list(model)) for model in GRAPH_SOURCE_MODELS],
    group_name=GROUP,
    kinds={"tigergraph", "csv"},
    description=(
        "TigerGraph vertices (Patient, Condition, Medication) and edges (has_condition, "
        "prescribed) from the derived and refined models; loading-job files when no "
        "TigerGraph is configured."
    ),
    metadata={"contract": dg.MetadataValue.json(CONTRACT)},
    check_specs=[
        dg.AssetCheckSpec(
            RECONCILE_CHECK,
            asset=GRAPH_KEY,
            blocking=True,
            description="Vertex and edge rows written equal the rows read from the warehouse.",
        )
    ],
)
def tigergraph_load(
    context: dg.AssetExecutionContext, platform: PlatformResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    settings = platform.settings
    with platform.warehouse_connection() as connection:
        graph = read_graph_data(
            connection, settings.schema_name("refined"), settings.schema_name("derived")
        )
    out_dir = settings.graph_dir / "load"
    write_loading_files(graph, out_dir)
    expected = graph.counts()
    on_disk = count_csv_rows(out_dir)
    yield dg.AssetCheckResult(
        asset_key=GRAPH_KEY,
        check_name=RECONCILE_CHECK,
        passed=expected == on_disk,
        metadata={
            "expected": dg.MetadataValue.json(expected),
            "written": dg.MetadataValue.json(on_disk),
        },
    )
    yield dg.MaterializeResult(
        asset_key=GRAPH_KEY,
        metadata={
            **{f"rows/{name}": dg.MetadataValue.int(count) for name, count in on_disk.items()},
            "path": dg.MetadataValue.path(str(out_dir)),
        },
    )
