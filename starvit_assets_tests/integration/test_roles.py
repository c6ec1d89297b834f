"""Warehouse roles on the real embedded PostgreSQL: what each group may and may not read."""

from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from starvit_assets.ops.roles import (
    ANALYST,
    AUDIT_SCHEMA,
    ENGINEER,
    GROUP_ROLES,
    LOADER,
    RolesError,
    create_login,
    ensure_roles,
)
from starvit_assets.settings import StarvitSettings, load_settings

pytestmark = pytest.mark.integration

TABLE = "roles_probe"
LATER_TABLE = "roles_probe_later"
LOGINS = {"alice_analyst": ANALYST, "erin_engineer": ENGINEER, "liam_loader": LOADER}
PASSWORD_VARIABLE = "STARVIT_TEST_LOGIN_PASSWORD"


@dataclass(frozen=True)
class Warehouse:
    dsn: str
    settings: StarvitSettings

    def schema(self, layer: str) -> str:
        return AUDIT_SCHEMA if layer == "audit" else self.settings.schema_name(layer)

    def as_login(self, name: str) -> psycopg.Connection:
        return psycopg.connect(make_conninfo(self.dsn, user=name), autocommit=True)


LAYERS = ("raw", "staging", "refined", "derived", "reference", "snapshots", "audit")


def _execute(dsn: str, statement: sql.Composable) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(statement)


@pytest.fixture(scope="module")
def warehouse(warehouse_dsn: str) -> Iterator[Warehouse]:
    settings = load_settings()
    found = Warehouse(warehouse_dsn, settings)
    with psycopg.connect(warehouse_dsn, autocommit=True) as connection:
        for layer in LAYERS:
            schema = sql.Identifier(found.schema(layer))
            connection.execute(sql.SQL("create schema if not exists {}").format(schema))
            connection.execute(
                sql.SQL("create table if not exists {}.{} (id int primary key, note text)").format(
                    schema, sql.Identifier(TABLE)
                )
            )
            connection.execute(
                sql.SQL("insert into {}.{} values (1, 'probe') on conflict do nothing").format(
                    schema, sql.Identifier(TABLE)
                )
            )
    yield found
    with psycopg.connect(warehouse_dsn, autocommit=True) as connection:
        for name in LOGINS:
            connection.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(name)))
        for layer in LAYERS:
            for table in (TABLE, LATER_TABLE):
                connection.execute(
                    sql.SQL("drop table if exists {}.{}").format(
                        sql.Identifier(found.schema(layer)), sql.Identifier(table)
                    )
                )


@pytest.fixture(scope="module")
def logins(warehouse: Warehouse) -> dict[str, str]:
    ensure_roles(warehouse.dsn, warehouse.settings)
    for name, role in LOGINS.items():
        create_login(warehouse.dsn, name, role)
    return LOGINS


def _can_read(warehouse: Warehouse, login: str, layer: str, table: str = TABLE) -> bool:
    with warehouse.as_login(login) as connection:
        try:
            connection.execute(
                sql.SQL("select count(*) from {}.{}").format(
                    sql.Identifier(warehouse.schema(layer)), sql.Identifier(table)
                )
            ).fetchone()
        except psycopg.errors.InsufficientPrivilege as error:
            assert "permission denied" in str(error)
            return False
    return True


def _can_insert(warehouse: Warehouse, login: str, layer: str) -> bool:
    with warehouse.as_login(login) as connection:
        try:
            with connection.transaction(force_rollback=True):
                connection.execute(
                    sql.SQL("insert into {}.{} values (2, 'write probe')").format(
                        sql.Identifier(warehouse.schema(layer)), sql.Identifier(TABLE)
                    )
                )
        except psycopg.errors.InsufficientPrivilege:
            return False
    return True


def test_group_roles_are_nologin(warehouse: Warehouse, logins: dict[str, str]) -> None:
    with psycopg.connect(warehouse.dsn) as connection:
        rows = connection.execute(
            "select rolname, rolcanlogin from pg_roles where rolname = any(%s)",
            [list(GROUP_ROLES)],
        ).fetchall()
    assert dict(rows) == dict.fromkeys(GROUP_ROLES, False)


@pytest.mark.parametrize(
    ("layer", "readable"),
    [
        ("refined", True),
        ("derived", True),
        ("reference", True),
        ("snapshots", True),
        ("raw", False),
        ("staging", False),
        ("audit", False),
    ],
)
def test_analyst_reads_modelled_layers_only(
    warehouse: Warehouse, logins: dict[str, str], layer: str, readable: bool
) -> None:
    assert _can_read(warehouse, "alice_analyst", layer) is readable


def test_analyst_cannot_write(warehouse: Warehouse, logins: dict[str, str]) -> None:
    assert not _can_insert(warehouse, "alice_analyst", "derived")


def test_engineer_reads_research_schemas_but_not_audit(
    warehouse: Warehouse, logins: dict[str, str]
) -> None:
    for layer in ("raw", "staging", "refined", "derived", "reference", "snapshots"):
        assert _can_read(warehouse, "erin_engineer", layer), layer
    assert not _can_read(warehouse, "erin_engineer", "audit")
    assert not _can_insert(warehouse, "erin_engineer", "raw")


def test_loader_writes_raw_only(warehouse: Warehouse, logins: dict[str, str]) -> None:
    assert _can_insert(warehouse, "liam_loader", "raw")
    assert not _can_insert(warehouse, "liam_loader", "refined")
    assert not _can_read(warehouse, "liam_loader", "derived")
    with (
        warehouse.as_login("liam_loader") as connection,
        connection.transaction(force_rollback=True),
    ):
        # The loader creates its own tables on first load of a new resource type.
        connection.execute(
            sql.SQL("create table {}.loader_probe (id int)").format(
                sql.Identifier(warehouse.schema("raw"))
            )
        )


def test_table_created_later_is_readable(warehouse: Warehouse, logins: dict[str, str]) -> None:
    # dbt recreates its tables on every run; default privileges are what keeps them readable.
    _execute(
        warehouse.dsn,
        sql.SQL("create table {}.{} as select 1 as id").format(
            sql.Identifier(warehouse.schema("derived")), sql.Identifier(LATER_TABLE)
        ),
    )
    _execute(
        warehouse.dsn,
        sql.SQL("create table {}.{} as select 1 as id").format(
            sql.Identifier(warehouse.schema("raw")), sql.Identifier(LATER_TABLE)
        ),
    )
    assert _can_read(warehouse, "alice_analyst", "derived", LATER_TABLE)
    assert not _can_read(warehouse, "alice_analyst", "raw", LATER_TABLE)
    assert _can_read(warehouse, "erin_engineer", "raw", LATER_TABLE)


def test_rerun_is_idempotent_and_removes_stray_grants(
    warehouse: Warehouse, logins: dict[str, str]
) -> None:
    _execute(
        warehouse.dsn,
        sql.SQL("grant usage on schema {} to {}; grant select on {}.{} to {}").format(
            sql.Identifier(warehouse.schema("raw")),
            sql.Identifier(ANALYST),
            sql.Identifier(warehouse.schema("raw")),
            sql.Identifier(TABLE),
            sql.Identifier(ANALYST),
        ),
    )
    assert _can_read(warehouse, "alice_analyst", "raw")

    first = ensure_roles(warehouse.dsn, warehouse.settings)
    second = ensure_roles(warehouse.dsn, warehouse.settings)
    assert first.roles_created == second.roles_created == []
    assert second.schemas_created == []
    assert not _can_read(warehouse, "alice_analyst", "raw")
    assert _can_read(warehouse, "alice_analyst", "derived")


def test_login_password_is_stored_as_scram_verifier(
    warehouse: Warehouse, logins: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_VARIABLE, "correct horse battery staple")
    monkeypatch.delenv(f"{PASSWORD_VARIABLE}_FILE", raising=False)
    created = create_login(
        warehouse.dsn, "alice_analyst", ANALYST, password_secret=PASSWORD_VARIABLE
    )
    assert created is False
    with psycopg.connect(warehouse.dsn) as connection:
        row = connection.execute(
            "select rolpassword from pg_authid where rolname = 'alice_analyst'"
        ).fetchone()
    assert row is not None
    assert row[0].startswith("SCRAM-SHA-256$")
    assert "horse" not in row[0]


def test_login_moves_between_groups(warehouse: Warehouse, logins: dict[str, str]) -> None:
    create_login(warehouse.dsn, "erin_engineer", ANALYST)
    try:
        assert not _can_read(warehouse, "erin_engineer", "raw")
        assert _can_read(warehouse, "erin_engineer", "derived")
    finally:
        create_login(warehouse.dsn, "erin_engineer", ENGINEER)
    assert _can_read(warehouse, "erin_engineer", "raw")


def test_create_login_refuses_unsafe_requests(warehouse: Warehouse, logins: dict[str, str]) -> None:
    with pytest.raises(RolesError, match="superuser"):
        create_login(warehouse.dsn, "postgres", ANALYST)
    with pytest.raises(RolesError, match="group role"):
        create_login(warehouse.dsn, ANALYST, ANALYST)
    with pytest.raises(RolesError, match="role must be one of"):
        create_login(warehouse.dsn, "mallory", "postgres")
    with pytest.raises(RolesError, match="login names"):
        create_login(warehouse.dsn, 'x"; drop table', ANALYST)
