"""Graph zone: the research graph in TigerGraph (RESTPP upserts) or as loading-job files."""

from collections.abc import Iterator

import dagster as dg

from starvit_assets.defs.resources import PlatformResource
from starvit_assets.graph.loader import GraphLoadError, graph_loader, reconcile
from starvit_assets.graph.schema import EDGE_TYPES, VERTEX_TYPES
from starvit_assets.graph.source import GRAPH_SOURCE_MODELS, read_graph_data

GROUP = "graph"
RECONCILE_CHECK = "counts_reconcile"
GRAPH_KEY = dg.AssetKey([GROUP, "tigergraph_load"])

_VERTEX_NAMES = ", ".join(vertex.name for vertex in VERTEX_TYPES)
_EDGE_NAMES = ", ".join(edge.name for edge in EDGE_TYPES)

CONTRACT = {
    "grain": (
        f"one vertex per Patient, Encounter and code ({_VERTEX_NAMES}); one edge per source "
        f"row ({_EDGE_NAMES}): per encounter, per condition with a SNOMED CT code, per "
        "medication request with an RxNorm code, per observation with a LOINC code. Files are "
        "replaced on every load; TigerGraph is upserted (idempotent) and the vertices no "
        "longer in the source deleted, with their edges."
    ),
    # A vertex's key is its primary id; an edge's is its endpoints plus its discriminator
    # (the source row's pseudonymised id).
    "keys": [[f"{vertex.name}.{vertex.primary_id.name}"] for vertex in VERTEX_TYPES]
    + [
        [f"{edge.name}.{edge.discriminator.name}"]
        for edge in EDGE_TYPES
        if edge.discriminator is not None
    ],
    "semantics": (
        "Patients (pseudonymised id, gender, age bracket, weight category) from "
        "derived.patient_features; encounters from refined.encounter; Condition (SNOMED CT), "
        "Medication (RxNorm) and ObservationType (LOINC) vertices from the refined models, "
        "with their display text. Edges: has_encounter (period dates), has_condition "
        "(onset_at), prescribed (authored_at), has_observation from the observation's "
        "encounter when it is loaded, else from the patient (effective_at, value, unit). "
        "Dates are UTC; TigerGraph has no null, so a missing value takes the type's default."
    ),
    "vertices": {
        vertex.name: [vertex.primary_id.name, *(a.name for a in vertex.attributes)]
        for vertex in VERTEX_TYPES
    },
    "edges": {
        edge.name: {
            "endpoints": [list(pair) for pair in edge.endpoints],
            "discriminator": edge.discriminator.name if edge.discriminator else None,
            "attributes": [a.name for a in edge.attributes],
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
        f"The research graph: vertices ({_VERTEX_NAMES}) and edges ({_EDGE_NAMES}) from the "
        "derived and refined models. Upserted in batches into TigerGraph over RESTPP "
        "(pyTigerGraph) when STARVIT_TIGERGRAPH_HOST is set, vertices no longer in the source "
        "deleted; loading-job files otherwise."
    ),
    metadata={"contract": dg.MetadataValue.json(CONTRACT)},
    check_specs=[
        dg.AssetCheckSpec(
            RECONCILE_CHECK,
            asset=GRAPH_KEY,
            blocking=True,
            description=(
                "Per vertex and edge type, the rows loaded (CSV rows written, or upserts "
                "TigerGraph accepted) and the rows the target holds (CSV rows read back, or "
                "TigerGraph's own count) both equal the rows read from the warehouse."
            ),
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
    loader = graph_loader(settings)
    try:
        report = loader.load(graph)
    except GraphLoadError as error:
        raise dg.Failure(description=str(error)) from None
    expected = graph.counts()
    problems = reconcile(expected, report)
    yield dg.AssetCheckResult(
        asset_key=GRAPH_KEY,
        check_name=RECONCILE_CHECK,
        passed=not problems,
        metadata={
            "expected": dg.MetadataValue.json(expected),
            "loaded": dg.MetadataValue.json(report.loaded),
            "in_target": dg.MetadataValue.json(report.in_target),
            "differences": dg.MetadataValue.json(problems),
        },
    )
    yield dg.MaterializeResult(
        asset_key=GRAPH_KEY,
        metadata={
            **{
                f"rows/{name}": dg.MetadataValue.int(count) for name, count in report.loaded.items()
            },
            **{
                f"filtered/{reason}": dg.MetadataValue.int(count)
                for reason, count in graph.filtered.items()
            },
            **{
                f"deleted/{name}": dg.MetadataValue.int(count)
                for name, count in report.deleted.items()
            },
            "segments": dg.MetadataValue.json(report.segments),
            "target": dg.MetadataValue.text(report.target),
            "location": dg.MetadataValue.text(report.location),
            "batches": dg.MetadataValue.int(report.batches),
            "requests": dg.MetadataValue.int(report.attempts),
            **(
                {"path": dg.MetadataValue.path(report.location)} if report.target == "files" else {}
            ),
        },
    )
