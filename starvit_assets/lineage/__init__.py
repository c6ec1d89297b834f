"""Column-level lineage of the raw tables: FHIR element -> raw column -> dbt staging column."""

from starvit_assets.lineage.columns import (
    ColumnLineage,
    LineageError,
    TableLineage,
    shipped_lineage,
    staging_model_name,
    table_lineage,
)

__all__ = [
    "ColumnLineage",
    "LineageError",
    "TableLineage",
    "shipped_lineage",
    "staging_model_name",
    "table_lineage",
]
