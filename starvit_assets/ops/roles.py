"""Warehouse access roles: NOLOGIN group roles that people and services are made members of.

- ``starvit_analyst`` reads refined, derived, reference (seeds) and snapshots; never raw,
  staging or audit; writes nothing.
- ``starvit_engineer`` reads every research schema, raw and staging included; never audit;
  writes nothing.
- ``starvit_loader`` reads and writes raw (and may create tables there); nothing else.

Analysts get the modelled layers only: raw and staging carry every column the gate let
through, one row per resource version, which is more than research questions need, and the
audit schema records who did what. The reference seeds are the clinical rules (unit
factors, WHO categories), not patient data, so analysts may read them.

``ensure_roles`` converges rather than adds: for each group role and each managed schema it
revokes everything, then grants exactly the plan, in one transaction, so a hand-made grant
(say, analysts on raw) is removed by the next run and nobody ever sees a half-applied state.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from starvit_assets.ops.logging import read_secret
from starvit_assets.settings import StarvitSettings

ANALYST = "starvit_analyst"
ENGINEER = "starvit_engineer"
LOADER = "starvit_loader"
GROUP_ROLES = (ANALYST, ENGINEER, LOADER)
AUDIT_SCHEMA = "audit"

_LOGIN_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_TABLE_WRITE = "SELECT, INSERT, UPDATE, DELETE, TRUNCATE"
_SEQUENCE_WRITE = "USAGE, SELECT, UPDATE"


class RolesError(Exception):
    """A role could not be created or granted; the message names the role, never a secret."""


@dataclass(frozen=True)
class RolePlan:
    role: str
    read: tuple[str, ...]
    write: tuple[str, ...] = ()


@dataclass
class RolesReport:
    roles_created: list[str] = field(default_factory=list)
    schemas_created: list[str] = field(default_factory=list)
    schemas_managed: list[str] = field(default_factory=list)


def research_schemas(settings: StarvitSettings) -> dict[str, str]:
    """Layer name -> schema name for every schema dbt and the loader write."""
    layers = ("raw", "staging", "refined", "derived", "reference", "snapshots")
    return {layer: settings.schema_name(layer) for layer in layers}


def role_plans(settings: StarvitSettings) -> list[RolePlan]:
    schemas = research_schemas(settings)
    return [
        RolePlan(
            ANALYST,
            read=tuple(
                schemas[layer] for layer in ("refined", "derived", "reference", "snapshots")
            ),
        ),
        RolePlan(ENGINEER, read=tuple(schemas.values())),
        RolePlan(LOADER, read=(schemas["raw"],), write=(schemas["raw"],)),
    ]


def managed_schemas(settings: StarvitSettings) -> list[str]:
    return [*research_schemas(settings).values(), AUDIT_SCHEMA]


def ensure_roles(
    dsn: str, settings: StarvitSettings, *, table_owners: Sequence[str] = ()
) -> RolesReport:
    """Create the group roles and converge their privileges on every managed schema.

    ``table_owners`` are the roles that create tables later (dbt's and the loader's login);
    default privileges apply only to tables those roles create. Empty means the role of
    ``dsn``, which is right when dbt, the loader and this function share one login (the
    embedded and compose setups).
    """
    report = RolesReport(schemas_managed=managed_schemas(settings))
    plans = role_plans(settings)
    with psycopg.connect(dsn) as connection:
        owners = list(table_owners) or [str(_scalar(connection, sql.SQL("select current_user")))]
        database = str(_scalar(connection, sql.SQL("select current_database()")))
        existing_roles = _existing_roles(connection, [*GROUP_ROLES, *owners])
        missing_owners = [owner for owner in owners if owner not in existing_roles]
        if missing_owners:
            raise RolesError(f"table owner roles do not exist: {', '.join(missing_owners)}")
        for plan in plans:
            if plan.role not in existing_roles:
                connection.execute(
                    sql.SQL("create role {} nologin").format(sql.Identifier(plan.role))
                )
                report.roles_created.append(plan.role)
            else:
                # A group role that someone turned into a login would bypass per-person audit.
                connection.execute(
                    sql.SQL("alter role {} nologin").format(sql.Identifier(plan.role))
                )
            connection.execute(
                sql.SQL("grant connect on database {} to {}").format(
                    sql.Identifier(database), sql.Identifier(plan.role)
                )
            )

        existing_schemas = {
            row[0]
            for row in connection.execute(
                "select nspname from pg_namespace where nspname = any(%s)",
                [report.schemas_managed],
            )
        }
        for schema in report.schemas_managed:
            if schema not in existing_schemas:
                # Grants and default privileges need the schema; dbt's "create schema if not
                # exists" later finds it and carries on.
                connection.execute(
                    sql.SQL("create schema if not exists {}").format(sql.Identifier(schema))
                )
                report.schemas_created.append(schema)

        for plan in plans:
            for schema in report.schemas_managed:
                _revoke_all(connection, plan.role, schema, owners)
                if schema in plan.write:
                    _grant(connection, plan.role, schema, owners, write=True)
                elif schema in plan.read:
                    _grant(connection, plan.role, schema, owners, write=False)
    return report


def _revoke_all(
    connection: psycopg.Connection, role: str, schema: str, owners: Sequence[str]
) -> None:
    params = {"role": sql.Identifier(role), "schema": sql.Identifier(schema)}
    for statement in (
        "revoke all on all tables in schema {schema} from {role}",
        "revoke all on all sequences in schema {schema} from {role}",
        "revoke all on schema {schema} from {role}",
    ):
        connection.execute(sql.SQL(statement).format(**params))
    for owner in owners:
        for kind in ("tables", "sequences"):
            connection.execute(
                sql.SQL(
                    "alter default privileges for role {owner} in schema {schema} "
                    "revoke all on {kind} from {role}"
                ).format(owner=sql.Identifier(owner), kind=sql.SQL(kind), **params)
            )


def _grant(
    connection: psycopg.Connection,
    role: str,
    schema: str,
    owners: Sequence[str],
    *,
    write: bool,
) -> None:
    params = {"role": sql.Identifier(role), "schema": sql.Identifier(schema)}
    schema_privileges = "usage, create" if write else "usage"
    table_privileges = _TABLE_WRITE if write else "SELECT"
    sequence_privileges = _SEQUENCE_WRITE if write else "SELECT"
    statements = [
        f"grant {schema_privileges} on schema {{schema}} to {{role}}",
        f"grant {table_privileges} on all tables in schema {{schema}} to {{role}}",
        f"grant {sequence_privileges} on all sequences in schema {{schema}} to {{role}}",
    ]
    for statement in statements:
        connection.execute(sql.SQL(statement).format(**params))
    for owner in owners:
        for kind, privileges in (("tables", table_privileges), ("sequences", sequence_privileges)):
            connection.execute(
                sql.SQL(
                    "alter default privileges for role {owner} in schema {schema} "
                    f"grant {privileges} on {kind} to {{role}}"
                ).format(owner=sql.Identifier(owner), **params)
            )


def create_login(dsn: str, name: str, role: str, *, password_secret: str | None = None) -> bool:
    """Create (or update) a login role that is a member of exactly one group role.

    The password comes from the environment variable ``password_secret`` or the file named by
    ``<password_secret>_FILE`` (see ``read_secret``), never from an argument, so it does not
    land in shell history or process listings. It is hashed to a SCRAM verifier on this side,
    so the server (and its statement log) never sees it in clear. Without ``password_secret``
    the login has no password and relies on pg_hba (peer, certificate, or cloud IAM).
    Returns whether the login was created (False: it existed and was updated).
    """
    if not _LOGIN_NAME.match(name):
        raise RolesError(
            "login names are lower-case letters, digits and '_', starting with a letter or '_'"
        )
    if role not in GROUP_ROLES:
        raise RolesError(f"role must be one of {', '.join(GROUP_ROLES)}")
    if name in GROUP_ROLES:
        raise RolesError(f"{name} is a group role; pick a personal login name")
    password = read_secret(password_secret) if password_secret else None

    with psycopg.connect(dsn) as connection:
        if role not in _existing_roles(connection, [role]):
            raise RolesError(f"group role {role} does not exist: run ensure_roles first")
        row = connection.execute(
            "select rolsuper from pg_roles where rolname = %s", [name]
        ).fetchone()
        if row is not None and row[0]:
            raise RolesError(f"{name} is a superuser; refusing to turn it into a {role} login")
        password_clause: sql.Composable = sql.SQL("")
        if password is not None:
            verifier = connection.pgconn.encrypt_password(
                password.encode(), name.encode(), b"scram-sha-256"
            )
            password_clause = sql.SQL(" password {}").format(sql.Literal(verifier.decode()))
        verb = sql.SQL("create role" if row is None else "alter role")
        connection.execute(
            sql.SQL("{} {} login{}").format(verb, sql.Identifier(name), password_clause)
        )
        for other in GROUP_ROLES:
            if other != role:
                connection.execute(
                    sql.SQL("revoke {} from {}").format(sql.Identifier(other), sql.Identifier(name))
                )
        connection.execute(
            sql.SQL("grant {} to {}").format(sql.Identifier(role), sql.Identifier(name))
        )
    return row is None


def _existing_roles(connection: psycopg.Connection, names: Sequence[str]) -> set[str]:
    return {
        row[0]
        for row in connection.execute(
            "select rolname from pg_roles where rolname = any(%s)", [list(names)]
        )
    }


def _scalar(connection: psycopg.Connection, query: sql.SQL) -> object:
    row = connection.execute(query).fetchone()
    if row is None:
        raise RolesError("the server returned no row")
    return row[0]
