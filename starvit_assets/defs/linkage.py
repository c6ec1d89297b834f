"""Record linkage zone: the person of every patient record, from de-identified values only.

Reads the published ``patient`` partitions of this source's lake and of the peer sources'
lakes (``STARVIT_LINKAGE_PEER_LAKES``: pseudonymised ids, Patient.link targets, linkage
tokens; records keyed by (source, patient id)), applies the match rules of
``starvit_assets.linkage.match``,
writes the result as a lake partition and loads it into the warehouse raw schema, where the
dbt models ``derived/person_patient_map`` and ``derived/person`` take it up. Computed in
Python, not SQL: connected components need iteration, which PostgreSQL and BigQuery express
differently (see docs/linkage.md).
"""

import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from starvit_assets.defs.deid_raw import deid_asset_key
from starvit_assets.defs.resources import PlatformResource
from starvit_assets.deid.policy import load_policy
from starvit_assets.lake.partitions import LAYER as DEID_LAYER
from starvit_assets.lake.partitions import PART_FILE, RawLake
from starvit_assets.linkage.match import (
    MATCH_RULES,
    PATIENT_LINK_RULE,
    LinkageRecord,
    link_persons,
)
from starvit_assets.linkage.records import PATIENT_TABLE, records_from_table, token_names
from starvit_assets.platform import is_within
from starvit_assets.settings import SettingsError, StarvitSettings
from starvit_assets.warehouse.loader import EXPORT_ID, LoadError

GROUP = "linkage"
LAYER = "linkage"
MAP_TABLE = "person_patient_map"
ROWS_CHECK = "one_person_per_patient"
MAP_SCHEMA = pa.schema(
    [
        ("person_key", pa.string()),
        ("source", pa.string()),
        ("patient_id", pa.string()),
        ("match_rule", pa.string()),
        ("person_size", pa.int64()),
        (EXPORT_ID, pa.string()),
    ]
)
_READ_COLUMNS = ("patient_id", "last_updated", "link_patient_id")


def linkage_asset_key() -> dg.AssetKey:
    return dg.AssetKey([GROUP, MAP_TABLE])


def _latest_patients(lake: RawLake, tokens: tuple[str, ...], source: str) -> tuple[pa.Table, str]:
    """Every published patient row of one source's lake, oldest export first, and the newest
    export id."""
    partitions = lake.partitions(PATIENT_TABLE)
    if not partitions:
        raise dg.Failure(
            description=(
                f"source {source}: no published partitions of deid_raw/{PATIENT_TABLE} in "
                f"{lake.root}: materialize it first"
            )
        )
    tables = []
    for _, path in partitions:
        available = pq.read_schema(path).names
        wanted = [name for name in (*_READ_COLUMNS, *tokens) if name in available]
        table = pq.read_table(path, columns=wanted)
        for name in (*_READ_COLUMNS, *tokens):
            if name not in table.column_names:
                # Partitions published before a column existed hold no value for it.
                table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
        tables.append(table.select([*_READ_COLUMNS, *tokens]))
    rows = pa.concat_tables(tables)
    # The latest version of a patient is its last row by last update (date-shifted alike for
    # one patient, so comparable), then by export: records_from_table keeps the last row.
    # Arrow's sort is stable: equal stamps keep their export order; no stamp sorts first.
    order = pc.sort_indices(rows, sort_keys=[("last_updated", "ascending", "at_start")])
    return rows.take(order), partitions[-1][0]


def source_lakes(settings: StarvitSettings) -> dict[str, RawLake]:
    """This source's lake and the peer lakes of ``STARVIT_LINKAGE_PEER_LAKES``, by source name.

    A peer is another Starvit deployment of the same tokenisation domain (its own PHI zone,
    gate and pseudonymisation key, the same linkage key); only its de-identified ``deid_raw``
    layer is read, never anything of a PHI zone.
    """
    try:
        peers = settings.peer_lakes
    except SettingsError as error:
        raise dg.Failure(description=str(error)) from None
    lakes = {settings.source_name: RawLake(settings.lake_root)}
    roots = {settings.lake_root: settings.source_name}
    for name, root in peers.items():
        if is_within(root, settings.phi_dir) or is_within(settings.phi_dir, root):
            raise dg.Failure(
                description=(
                    f"STARVIT_LINKAGE_PEER_LAKES: the lake of source {name} ({root}) overlaps "
                    f"this deployment's PHI zone ({settings.phi_dir}): only de-identified "
                    "lakes may be read"
                )
            )
        if root in roots:
            raise dg.Failure(
                description=(
                    f"STARVIT_LINKAGE_PEER_LAKES: source {name} names the lake of source "
                    f"{roots[root]} ({root}): each source has a lake of its own"
                )
            )
        if not (root / DEID_LAYER / PATIENT_TABLE).is_dir():
            raise dg.Failure(
                description=(
                    f"STARVIT_LINKAGE_PEER_LAKES: {root} (source {name}) holds no "
                    f"{DEID_LAYER}/{PATIENT_TABLE}: point it at the root of that source's "
                    "de-identified lake (its STARVIT_LAKE_DIR)"
                )
            )
        roots[root] = name
        lakes[name] = RawLake(root)
    return lakes


def _publish_map(lake: RawLake, export_id: str, table: pa.Table) -> Path:
    """The map's partition for ``export_id``: kept when unchanged, else replaced by renames
    (a re-run after a change of the rules), so readers never see a half-written file."""
    published = lake.published_dir(MAP_TABLE, export_id) / PART_FILE
    if published.is_file() and pq.read_table(published).equals(table):
        return published
    lake.stage(MAP_TABLE, export_id, table)
    if published.parent.exists():
        retired = published.parent.with_name(published.parent.name + ".replaced")
        shutil.rmtree(retired, ignore_errors=True)
        published.parent.rename(retired)
        path = lake.publish(MAP_TABLE, export_id)
        shutil.rmtree(retired)
        return path
    return lake.publish(MAP_TABLE, export_id)


@dg.asset(
    key=linkage_asset_key(),
    deps=[deid_asset_key(PATIENT_TABLE)],
    group_name=GROUP,
    kinds={"python", "parquet", "postgres"},
    description=(
        "The person of every patient record of this source and of the peer sources "
        "(STARVIT_LINKAGE_PEER_LAKES): Patient.link pairs and linkage-token matches "
        "(docs/linkage.md) resolved to one person key by connected components; written to the "
        "lake and loaded into the warehouse raw schema for dbt."
    ),
    metadata={
        "zone": "research",
        "contract": dg.MetadataValue.json(
            {
                "grain": "one row per (source, patient_id) per linkage run",
                "keys": [["source", "patient_id", EXPORT_ID]],
                "required": [name for name in MAP_SCHEMA.names],
                "semantics": (
                    "person_key names a person: the records joined by Patient.link or by "
                    f"agreeing linkage tokens (rules {', '.join((PATIENT_LINK_RULE, *MATCH_RULES))}"
                    ", transitively); match_rule is the best rule that joined the record, "
                    "'none' when it stands alone. _export_id is the newest patient export of "
                    "this source; peer sources' records carry their source name."
                ),
                "columns": list(MAP_SCHEMA.names),
            }
        ),
        "match_rules": dg.MetadataValue.json(
            {PATIENT_LINK_RULE: ["Patient.link"], **{k: list(v) for k, v in MATCH_RULES.items()}}
        ),
    },
    check_specs=[
        dg.AssetCheckSpec(
            ROWS_CHECK,
            asset=linkage_asset_key(),
            blocking=True,
            description=(
                "Every patient of this and the peer sources' lakes has exactly one person; the "
                "warehouse holds them all."
            ),
        )
    ],
)
def person_patient_map(
    context: dg.AssetExecutionContext, platform: PlatformResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    settings = platform.settings
    tokens = token_names(load_policy())
    lakes = source_lakes(settings)
    records: list[LinkageRecord] = []
    export_id = ""
    for source, lake in lakes.items():
        rows, newest = _latest_patients(lake, tokens, source)
        if source == settings.source_name:
            export_id = newest
        # Source-qualified: a pseudonymised id is unique only within its source (two
        # deployments sharing a pseudonymisation key give equal raw ids equal pseudonyms).
        records.extend(records_from_table(rows, source, tokens))
    result = link_persons(records)
    table = pa.Table.from_pylist(
        [
            {
                "person_key": a.person_key,
                "source": a.source,
                "patient_id": a.patient_id,
                "match_rule": a.match_rule,
                "person_size": a.person_size,
                EXPORT_ID: export_id,
            }
            for a in result.assignments
        ],
        schema=MAP_SCHEMA,
    )
    path = _publish_map(RawLake(settings.lake_root, layer=LAYER), export_id, table)
    try:
        with platform.raw_warehouse() as warehouse:
            warehouse.load_partition(MAP_TABLE, export_id, path)
            loaded = warehouse.loaded_row_counts(MAP_TABLE).get(export_id, 0)
    except LoadError as error:
        raise dg.Failure(description=str(error)) from None
    patients = len({record.key for record in records})
    rates = result.rates()
    by_source = Counter(record.source for record in records)
    context.log.info(
        f"{MAP_TABLE}: {rates['patients']} patient records of {len(lakes)} source(s), "
        f"{rates['persons']} persons"
    )
    yield dg.AssetCheckResult(
        asset_key=linkage_asset_key(),
        check_name=ROWS_CHECK,
        passed=table.num_rows == patients == loaded,
        metadata={"patients": patients, "rows": table.num_rows, "loaded": loaded},
    )
    yield dg.MaterializeResult(
        asset_key=linkage_asset_key(),
        metadata={
            "export_id": export_id,
            **{name: value for name, value in rates.items()},
            "patients_by_source": dg.MetadataValue.json(dict(sorted(by_source.items()))),
            "peer_lakes": dg.MetadataValue.json(
                {
                    name: str(lake.root)
                    for name, lake in lakes.items()
                    if name != settings.source_name
                }
            ),
            "path": dg.MetadataValue.path(str(path)),
            "table": f"{settings.raw_schema}.{MAP_TABLE}",
            "dagster/row_count": dg.MetadataValue.int(table.num_rows),
        },
    )
