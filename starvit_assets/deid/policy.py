"""The declarative de-identification policy (``policy.yaml``), validated on load."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

DEFAULT_POLICY = Path(__file__).with_name("policy.yaml")

Method = Literal["keep", "drop", "pseudonymise", "date_shift", "generalise", "redact"]


class PolicyError(Exception):
    """The policy is invalid or does not cover a view exactly; the message says where."""


class ColumnRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method
    resource_type: str | None = None
    kind: Literal["birth_year", "zip3"] | None = None

    @model_validator(mode="after")
    def _parameters_fit_the_method(self) -> ColumnRule:
        if (self.method == "pseudonymise") != (self.resource_type is not None):
            raise ValueError("resource_type is required by, and only by, pseudonymise")
        if (self.method == "generalise") != (self.kind is not None):
            raise ValueError("kind is required by, and only by, generalise")
        return self


LinkageField = Literal["family", "given", "birth_date", "sex", "postal_code"]
# Inputs that identify on their own: the view column they are read from must not cross as is.
_IDENTIFYING_INPUTS = ("family", "given", "birth_date", "postal_code")


class LinkageTokenPolicy(BaseModel):
    """Table-level recipe: linkage tokens computed from raw view columns in the PHI zone
    (starvit_assets/linkage/tokens.py, docs/linkage.md); the tokens are added as columns."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: dict[LinkageField, str]
    """Demographic field -> the view column it is read from (before de-identification)."""
    tokens: tuple[str, ...]
    """The token recipes to compute; each becomes a published column of that name."""


class TablePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    date_shift_context: str
    columns: dict[str, ColumnRule]
    linkage_tokens: LinkageTokenPolicy | None = None

    @model_validator(mode="after")
    def _linkage_inputs_never_cross(self) -> TablePolicy:
        spec = self.linkage_tokens
        if spec is None:
            return self
        for field, column in spec.inputs.items():
            rule = self.columns.get(column)
            if rule is None:
                raise ValueError(f"linkage input {field} reads {column!r}, which has no rule")
            if field in _IDENTIFYING_INPUTS and rule.method in ("keep", "pseudonymise"):
                raise ValueError(
                    f"linkage input {field} reads {column!r}, which the policy publishes as "
                    f"is ({rule.method}): drop or generalise it"
                )
        clashing = [name for name in spec.tokens if name in self.columns]
        if clashing:
            raise ValueError(f"linkage tokens clash with view columns: {', '.join(clashing)}")
        return self

    def check_covers(self, columns: Sequence[str], table: str = "") -> None:
        """The allowlist: every column has a rule, and every rule names a column."""
        uncovered = [name for name in columns if name not in self.columns]
        unknown = [name for name in self.columns if name not in columns]
        problems = []
        if uncovered:
            problems.append(f"columns without a rule (they cannot cross): {', '.join(uncovered)}")
        if unknown:
            problems.append(f"rules for columns the view does not have: {', '.join(unknown)}")
        if self.date_shift_context not in columns:
            problems.append(f"date_shift_context {self.date_shift_context!r} is not a view column")
        if problems:
            raise PolicyError(f"policy for table {table!r}: " + "; ".join(problems))


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str
    date_shift_max_days: int = 365
    tables: dict[str, TablePolicy]

    def table(self, name: str) -> TablePolicy:
        try:
            return self.tables[name]
        except KeyError:
            raise PolicyError(f"the policy has no rules for table {name!r}") from None


def load_policy(path: Path | None = None) -> Policy:
    source = path or DEFAULT_POLICY
    try:
        raw = yaml.safe_load(source.read_text())
        policy = Policy.model_validate(raw)
    except (OSError, yaml.YAMLError) as error:
        raise PolicyError(f"cannot read the policy {source}: {type(error).__name__}") from None
    except ValidationError as error:
        locations = "; ".join(
            f"{'.'.join(str(p) for p in issue['loc'])}: {issue['msg']}" for issue in error.errors()
        )
        raise PolicyError(f"invalid policy {source}: {locations}") from None
    if not 1 <= policy.date_shift_max_days <= 3650:
        raise PolicyError("date_shift_max_days must be between 1 and 3650")
    return policy
