"""Privacy-preserving linkage tokens: keyed hashes of normalised demographics, PHI zone only.

A token is ``HMAC-SHA256(linkage_key, "<recipe>|<field>|<field>...")`` over normalised fields,
in the manner of commercial healthcare tokenisation: two records of one person from two
sources that share the linkage key get the same token when the fields of a recipe agree after
normalisation, and nobody without the key can compute or confirm a token from demographics.
The key is not the pseudonymisation key (a token must never equal a pseudonym, and the
linkage key is shared by every source of a tokenisation domain while pseudonyms may not be).

A token whose recipe lacks one of its fields is null: it cannot match anything.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pyarrow as pa

from starvit_assets.deid.engine import DeidBackend, hmac_sha256
from starvit_assets.deid.policy import LinkageTokenPolicy, Policy

TOKEN_HEX_CHARS = 64
RECIPE_VERSION = "1"

# Common English diminutives and variants -> one canonical given name. Optional by design
# (docs/linkage.md): a nickname table trades a little precision for recall on given names.
NICKNAMES: Mapping[str, str] = {
    "liv": "olivia",
    "livvy": "olivia",
    "eli": "elijah",
    "lige": "elijah",
    "sophie": "sofia",
    "sophia": "sofia",
    "tom": "tomasz",
    "tomek": "tomasz",
    "luke": "lucas",
    "luc": "lucas",
    "annah": "hannah",
    "hanna": "hannah",
    "mat": "mateo",
    "matty": "mateo",
    "ingie": "ingrid",
    "inga": "ingrid",
    "bill": "william",
    "will": "william",
    "liz": "elizabeth",
    "beth": "elizabeth",
    "bob": "robert",
    "rob": "robert",
    "kate": "katherine",
    "katie": "katherine",
    "jim": "james",
    "jimmy": "james",
    "mike": "michael",
    "peg": "margaret",
    "maggie": "margaret",
}

_NOT_LETTER = re.compile(r"[^a-z]")
_SOUNDEX = {
    **dict.fromkeys("bfpv", "1"),
    **dict.fromkeys("cgjkqsxz", "2"),
    **dict.fromkeys("dt", "3"),
    "l": "4",
    **dict.fromkeys("mn", "5"),
    "r": "6",
}
_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
_ZIP5 = re.compile(r"^(\d{5})(?:-?\d{4})?$")
_SEX = {"female": "f", "male": "m", "f": "f", "m": "m"}


def normalise_name(value: str | None) -> str | None:
    """Casefolded ASCII letters only: diacritics, punctuation, spaces and digits stripped."""
    if value is None:
        return None
    decomposed = unicodedata.normalize("NFKD", value.casefold())
    letters = _NOT_LETTER.sub("", "".join(c for c in decomposed if not unicodedata.combining(c)))
    return letters or None


def canonical_given(value: str | None) -> str | None:
    name = normalise_name(value)
    return NICKNAMES.get(name, name) if name else None


def soundex(value: str | None) -> str | None:
    """American Soundex (letter + three digits) of a normalised name."""
    name = normalise_name(value)
    if not name:
        return None
    digits = [name[0].upper()]
    previous = _SOUNDEX.get(name[0], "")
    for letter in name[1:]:
        code = _SOUNDEX.get(letter, "")
        if code and code != previous:
            digits.append(code)
        # h and w do not separate letters of the same code; vowels do.
        if letter not in "hw":
            previous = code
    return "".join(digits).ljust(4, "0")[:4]


def normalise_birth_date(value: str | None) -> str | None:
    """A full FHIR date (YYYY-MM-DD) or nothing: a partial date cannot identify a day."""
    if value is None:
        return None
    match = _DATE.match(value.strip()[:10])
    return match.group(0) if match else None


def normalise_zip5(value: str | None) -> str | None:
    if value is None:
        return None
    match = _ZIP5.match(value.strip())
    return match.group(1) if match else None


def normalise_sex(value: str | None) -> str | None:
    """Administrative gender as f/m; other and unknown carry no agreement, so they are null."""
    return _SEX.get(value.strip().casefold()) if value else None


@dataclass(frozen=True)
class Demographics:
    """The raw inputs of one record (PHI: exists only in the PHI zone, never written)."""

    family: str | None
    given: str | None
    birth_date: str | None
    sex: str | None
    postal_code: str | None


def _fields(record: Demographics) -> dict[str, str | None]:
    family = normalise_name(record.family)
    given = canonical_given(record.given)
    birth_date = normalise_birth_date(record.birth_date)
    names = sorted(name for name in (family, given) if name)
    return {
        "family": family,
        "given": given,
        "given_initial": given[0] if given else None,
        "family_soundex": soundex(record.family),
        "birth_date": birth_date,
        "birth_year": birth_date[:4] if birth_date else None,
        "sex": normalise_sex(record.sex),
        "zip5": normalise_zip5(record.postal_code),
        # Order-free name pair: survives given and family swapped between fields.
        "name_pair": "+".join(names) if len(names) == 2 else None,
    }


# The recipes: which normalised fields each token hashes, in order. Changing one changes every
# token it makes (bump RECIPE_VERSION, and re-tokenise every source of the domain).
RECIPES: Mapping[str, tuple[str, ...]] = {
    "link_token_1": ("family", "given_initial", "birth_date", "sex"),
    "link_token_2": ("family_soundex", "given", "birth_date"),
    "link_token_3": ("given", "family", "zip5", "birth_year"),
    "link_token_4": ("name_pair", "birth_date"),
}


_FIELD_INPUTS: Mapping[str, tuple[str, ...]] = {
    "family": ("family",),
    "given": ("given",),
    "given_initial": ("given",),
    "family_soundex": ("family",),
    "birth_date": ("birth_date",),
    "birth_year": ("birth_date",),
    "sex": ("sex",),
    "zip5": ("postal_code",),
    "name_pair": ("family", "given"),
}


def recipe_inputs(recipe: str) -> tuple[str, ...]:
    """The demographic inputs a recipe reads, in first-use order (for the column lineage)."""
    fields = (input_ for field in RECIPES[recipe] for input_ in _FIELD_INPUTS[field])
    return tuple(dict.fromkeys(fields))


def token_inputs(record: Demographics) -> dict[str, str | None]:
    """Recipe -> the normalised string it hashes, or None when a field is missing (PHI)."""
    fields = _fields(record)
    inputs: dict[str, str | None] = {}
    for name, recipe in RECIPES.items():
        values = [fields[field] for field in recipe]
        inputs[name] = (
            None
            if any(value is None for value in values)
            else "|".join((f"v{RECIPE_VERSION}", name, *(str(v) for v in values)))
        )
    return inputs


def tokens(key: bytes, record: Demographics) -> dict[str, str | None]:
    """Recipe -> token (64 hex characters), or None when the recipe lacks a field."""
    return {
        name: None if text is None else hmac_sha256(key, text.encode()).hex()[:TOKEN_HEX_CHARS]
        for name, text in token_inputs(record).items()
    }


def token_columns(key: bytes, spec: LinkageTokenPolicy, rows: pa.Table) -> dict[str, pa.Array]:
    """The token columns of a view's raw rows, one value per row (the inputs stay here)."""
    inputs = spec.inputs
    unknown = [name for name in spec.tokens if name not in RECIPES]
    if unknown:
        raise ValueError(f"unknown linkage token recipes: {', '.join(unknown)}")
    columns: dict[str, list[str | None]] = {
        str(field): rows.column(column).cast(pa.string()).to_pylist()
        for field, column in inputs.items()
    }
    missing: list[str | None] = [None] * rows.num_rows
    family, given, birth_date, sex, postal_code = (
        columns.get(field, missing)
        for field in ("family", "given", "birth_date", "sex", "postal_code")
    )
    results: dict[str, list[str | None]] = {name: [] for name in spec.tokens}
    cache: dict[Demographics, dict[str, str | None]] = {}
    for index in range(rows.num_rows):
        record = Demographics(
            family[index], given[index], birth_date[index], sex[index], postal_code[index]
        )
        made = cache.get(record)
        if made is None:
            made = cache[record] = tokens(key, record)
        for name in spec.tokens:
            results[name].append(made[name])
    return {name: pa.array(values, pa.string()) for name, values in results.items()}


class LinkageTokenBackend:
    """Any de-identification backend, plus the linkage tokens its policy asks for.

    The tokens are computed here, in the PHI zone, from the view's raw rows, before and apart
    from the backend, as commercial tokenisation runs at the data holder: the linkage key is
    never handed to a de-identification service, and the local engine and Cloud DLP publish
    the same tokens because neither computes them. The inputs themselves are ``drop`` (or
    generalised) columns of the policy, so they never cross.
    """

    def __init__(self, inner: DeidBackend, policy: Policy, key: bytes) -> None:
        self._inner = inner
        self._policy = policy
        self._key = key

    @property
    def policy_version(self) -> str:
        return str(getattr(self._inner, "policy_version", self._policy.version))

    def deidentify(self, table_name: str, rows: pa.Table) -> pa.Table:
        spec = self._policy.table(table_name).linkage_tokens
        deidentified = self._inner.deidentify(table_name, rows)
        if spec is None:
            return deidentified
        for name, column in token_columns(self._key, spec, rows).items():
            deidentified = deidentified.append_column(pa.field(name, pa.string()), column)
        return deidentified


def with_linkage_tokens(
    inner: DeidBackend, policy: Policy, key: Callable[[], bytes]
) -> DeidBackend:
    """``inner`` wrapped when the policy asks for tokens anywhere; ``key`` read only then."""
    if not any(table.linkage_tokens for table in policy.tables.values()):
        return inner
    return LinkageTokenBackend(inner, policy, key())
