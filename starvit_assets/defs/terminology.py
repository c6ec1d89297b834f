"""Terminology zone: every (system, code) pair in the warehouse raw tables, validated and mapped.

Reads the distinct codes of the coded raw columns (codes are not PHI: they name concepts, not
people), asks the configured terminology service (``STARVIT_TERMINOLOGY_URL``, or the
embedded local service) whether each is valid and what it maps to, and replaces
``sv_<env>_raw.terminology_code_validation`` in one transaction. The dbt staging and refined
models join it; the asset check judges the share of valid codes per code system.
"""

from collections.abc import Iterator, Sequence
from contextlib import closing

import dagster as dg
import psycopg
from psycopg import sql

from starvit_assets.defs.resources import PlatformResource
from starvit_assets.defs.warehouse import warehouse_raw_key
from starvit_assets.settings import WarehouseTarget
from starvit_assets.terminology.local import ContentError
from starvit_assets.terminology.model import TerminologyError
from starvit_assets.terminology.service import terminology_service
from starvit_assets.terminology.validation import (
    CODE_COLUMNS,
    COLUMNS,
    MAP_TARGETS,
    CodeColumn,
    CodeValidationRow,
    judge_shares,
    merge_occurrences,
    shares_by_system,
    validate_and_map,
)

GROUP = "terminology"
TABLE = "terminology_code_validation"
VALIDATION_KEY = dg.AssetKey([GROUP, "code_validation"])
SHARE_CHECK = "valid_code_share"

_COLUMN_TYPES = {
    "code_system": "text not null",
    "code": "text not null",
    "is_valid": "boolean not null",
    "system_known": "boolean not null",
    "occurrences": "bigint not null",
}

CONTRACT = {
    "grain": "one row per distinct (code_system, code) pair in the coded raw columns",
    "keys": [["code_system", "code"]],
    "required": ["code_system", "code", "is_valid", "system_known", "occurrences"],
    "semantics": (
        "is_valid: the terminology service's $validate-code result for the code in its system "
        "(false for an unknown code, and for every code of a system the service does not know, "
        "system_known false); display: the service's display; mapped_*: the first usable "
        "$translate match of a valid code whose system has a map target "
        f"({', '.join(f'{s} -> {t}' for s, t in MAP_TARGETS.items())}); occurrences: coded "
        "rows in the raw tables (every version of every export); source_tables: the raw "
        "tables the code appears in; terminology_service: 'embedded' or the server's base URL. "
        "Replaced in one transaction on every run."
    ),
    "columns": list(COLUMNS),
    "sources": [
        f"{column.table}.{column.code_column} ({column.system_column or column.system})"
        for column in CODE_COLUMNS
    ],
}


def _existing_tables(connection: psycopg.Connection, schema: str) -> set[str]:
    rows = connection.execute(
        "select table_name from information_schema.tables where table_schema = %s", (schema,)
    ).fetchall()
    return {str(row[0]) for row in rows}


def _code_counts(
    connection: psycopg.Connection, schema: str, column: CodeColumn
) -> list[tuple[str, str, str, int]]:
    system = (
        sql.Identifier(column.system_column) if column.system_column else sql.Literal(column.system)
    )
    code = sql.Identifier(column.code_column)
    query = sql.SQL(
        "select {system}, {code}, count(*) from {table} where {code} is not null "
        "and {system} is not null group by 1, 2"
    ).format(system=system, code=code, table=sql.Identifier(schema, column.table))
    return [
        (column.table, str(system_value), str(code_value), int(rows))
        for system_value, code_value, rows in connection.execute(query).fetchall()
    ]


def read_code_occurrences(
    connection: psycopg.Connection, schema: str, columns: Sequence[CodeColumn] = CODE_COLUMNS
) -> tuple[list[tuple[str, str, str, int]], list[str]]:
    """(table, system, code, rows) per coded column, and the tables not loaded yet."""
    present = _existing_tables(connection, schema)
    counts: list[tuple[str, str, str, int]] = []
    for column in columns:
        if column.table in present:
            counts.extend(_code_counts(connection, schema, column))
    missing = sorted({column.table for column in columns} - present)
    return counts, missing


def replace_validation_table(
    connection: psycopg.Connection, schema: str, rows: Sequence[CodeValidationRow]
) -> None:
    """The table's whole content replaced in one transaction: readers see old or new."""
    target = sql.Identifier(schema, TABLE)
    definitions = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(_COLUMN_TYPES.get(name, "text")))
        for name in COLUMNS
    )
    with connection.transaction():
        connection.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
        connection.execute(
            sql.SQL(
                "create table if not exists {} ({}, validated_at timestamptz not null "
                "default now(), primary key (code_system, code))"
            ).format(target, definitions)
        )
        # Delete, not truncate or drop: the staging view depends on the table, and a reader
        # in another transaction keeps seeing the old rows until this one commits.
        connection.execute(sql.SQL("delete from {}").format(target))
        columns = sql.SQL(", ").join(sql.Identifier(name) for name in COLUMNS)
        with (
            connection.cursor() as cursor,
            cursor.copy(sql.SQL("copy {} ({}) from stdin").format(target, columns)) as copy,
        ):
            for row in rows:
                copy.write_row([getattr(row, name) for name in COLUMNS])


@dg.asset(
    key=VALIDATION_KEY,
    deps=sorted({warehouse_raw_key(column.table) for column in CODE_COLUMNS}, key=str),
    group_name=GROUP,
    kinds={"postgres", "fhir"},
    description=(
        f"Every (system, code) pair of the coded raw columns, validated ($validate-code) and "
        f"mapped ($translate) by the terminology service: table `{TABLE}` in the warehouse raw "
        "schema, replaced in one transaction; joined into the refined models."
    ),
    metadata={"contract": dg.MetadataValue.json(CONTRACT)},
    check_specs=[
        dg.AssetCheckSpec(
            SHARE_CHECK,
            asset=VALIDATION_KEY,
            blocking=False,
            description=(
                "Per known code system, at least STARVIT_TERMINOLOGY_MIN_VALID_SHARE of the "
                "coded rows are valid, and at most STARVIT_TERMINOLOGY_MAX_UNKNOWN_SYSTEM_SHARE "
                "of them use an unknown system. Warns (never blocks): invalid codes are a "
                "finding about the source, kept and flagged in the refined models."
            ),
        )
    ],
)
def terminology_code_validation(
    context: dg.AssetExecutionContext, platform: PlatformResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    settings = platform.settings
    if settings.warehouse_target != WarehouseTarget.POSTGRES:
        raise dg.Failure(
            description=(
                "terminology validation writes to the PostgreSQL warehouse only; the "
                f"{settings.warehouse_target.value} target is not supported yet"
            )
        )
    schema = settings.raw_schema
    try:
        service = terminology_service(settings)
    except ContentError as error:
        raise dg.Failure(description=f"terminology content: {error}") from None
    with closing(service), platform.warehouse_connection() as connection:
        counts, missing = read_code_occurrences(connection, schema)
        occurrences = merge_occurrences(counts)
        try:
            rows = validate_and_map(service, occurrences)
        except TerminologyError as error:
            raise dg.Failure(description=str(error)) from None
        replace_validation_table(connection, schema, rows)
    if missing:
        context.log.info(f"raw tables not loaded yet, skipped: {', '.join(missing)}")
    shares = shares_by_system(rows)
    verdict = judge_shares(
        shares,
        min_valid_share=settings.terminology_min_valid_share,
        max_unknown_system_share=settings.terminology_max_unknown_system_share,
    )
    yield dg.AssetCheckResult(
        asset_key=VALIDATION_KEY,
        check_name=SHARE_CHECK,
        passed=verdict.passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=verdict.description,
        metadata={
            "min_valid_share": dg.MetadataValue.float(settings.terminology_min_valid_share),
            "max_unknown_system_share": dg.MetadataValue.float(
                settings.terminology_max_unknown_system_share
            ),
            "unknown_system_share": dg.MetadataValue.float(round(verdict.unknown_system_share, 6)),
            "below_threshold": dg.MetadataValue.json(list(verdict.below_threshold)),
            "by_code_system": dg.MetadataValue.json(
                {
                    share.code_system: {
                        "system_known": share.system_known,
                        "codes": share.codes,
                        "valid_codes": share.valid_codes,
                        "coded_rows": share.occurrences,
                        "valid_rows": share.valid_occurrences,
                        "valid_share": round(share.valid_share, 6),
                    }
                    for share in shares
                }
            ),
        },
    )
    yield dg.MaterializeResult(
        asset_key=VALIDATION_KEY,
        metadata={
            "table": f"{schema}.{TABLE}",
            "dagster/relation_identifier": f"warehouse.{schema}.{TABLE}",
            "rows": dg.MetadataValue.int(len(rows)),
            "valid_codes": dg.MetadataValue.int(sum(row.is_valid for row in rows)),
            "invalid_codes": dg.MetadataValue.int(sum(not row.is_valid for row in rows)),
            "mapped_codes": dg.MetadataValue.int(sum(row.mapped_code is not None for row in rows)),
            "terminology_service": service.description,
            "tables_not_loaded": dg.MetadataValue.json(missing),
        },
    )
