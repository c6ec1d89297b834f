"""One policy, two backends: the local engine and Cloud DLP (the real client library over its
REST transport, against the local DLP endpoint in ``starvit_assets_tests/fakes``).

The policy properties run against both backends; the DLP-specific tests check what only the
DLP backend has: request shapes, batching within DLP's limits, retries and the rate limit.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud import dlp_v2

from starvit_assets.deid.dlp import (
    DlpDeidBackend,
    DlpKey,
    DlpLimits,
    KmsWrappedKey,
    RateLimiter,
    UnwrappedKey,
)
from starvit_assets.deid.engine import (
    DeidBackend,
    DeidError,
    LocalDeidEngine,
    pseudonym,
    shift_fhir_temporal,
)
from starvit_assets.deid.policy import Policy, PolicyError, load_policy
from starvit_assets_tests.fakes.dlp_endpoint import (
    DLP_MAX_REQUEST_BYTES,
    DLP_MAX_VALUES,
    FakeDlpEndpoint,
    RecordedRequest,
)

pytestmark = pytest.mark.integration

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
REFERENCE = dt.date(2026, 6, 15)
MAX_DAYS = 365
KMS_KEY_NAME = "projects/starvit-test/locations/global/keyRings/deid/cryptoKeys/pseudonyms"
WRAPPED_KEY = b"wrapped-by-kms:" + bytes(range(40))
# Tests must not wait: the rate limit and backoff are the production schedule, shortened.
FAST = DlpLimits(
    requests_per_minute=60_000, initial_backoff_seconds=0.001, max_backoff_seconds=0.01
)
TOKEN = re.compile(r"[0-9a-f]{32}")

MakeBackend = Callable[..., DeidBackend]


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def endpoint() -> Iterator[FakeDlpEndpoint]:
    with FakeDlpEndpoint(kms_keys={(KMS_KEY_NAME, WRAPPED_KEY): KEY}) as fake:
        yield fake


@pytest.fixture
def dlp(endpoint: FakeDlpEndpoint) -> Iterator[FakeDlpEndpoint]:
    endpoint.clear()
    yield endpoint
    endpoint.clear()


def _dlp_backend(
    endpoint: FakeDlpEndpoint,
    *,
    key: DlpKey | None = None,
    policy: Policy | None = None,
    limits: DlpLimits = FAST,
    sleep: Callable[[float], None] = time.sleep,
) -> DlpDeidBackend:
    return DlpDeidBackend(
        endpoint.client(),
        project="starvit-test",
        location="europe-west3",
        key=key or UnwrappedKey(KEY),
        policy=policy or load_policy(),
        reference_date=REFERENCE,
        limits=limits,
        sleep=sleep,
    )


@pytest.fixture(params=["local", "dlp"])
def make_backend(request: pytest.FixtureRequest, dlp: FakeDlpEndpoint) -> MakeBackend:
    """``make_backend(key=..., policy=...)``: a backend of the parametrised kind."""

    def make(key: bytes = KEY, policy: Policy | None = None) -> DeidBackend:
        if request.param == "local":
            return LocalDeidEngine(key, policy or load_policy(), reference_date=REFERENCE)
        return _dlp_backend(dlp, key=UnwrappedKey(key), policy=policy)

    return make


def _table(name: str, rows: Sequence[dict[str, Any]], policy: Policy | None = None) -> pa.Table:
    """A flattened view table shaped by the policy: every column, strings unless numeric."""
    columns = (policy or load_policy()).table(name).columns
    return pa.table(
        {
            column: pa.array(
                [row.get(column) for row in rows],
                pa.float64() if column == "value_quantity" else pa.string(),
            )
            for column in columns
        }
    )


def _policy_with(table: str, **rules: dict[str, str]) -> Policy:
    raw = load_policy().model_dump()
    raw["tables"][table]["columns"].update(rules)
    return Policy.model_validate(raw)


def _column(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist()


def _payloads(requests: Sequence[RecordedRequest]) -> str:
    return json.dumps([r.payload for r in requests])


# -- the policy, against both backends --------------------------------------------------------


def test_pseudonyms_are_deterministic_and_join_across_tables(make_backend: MakeBackend) -> None:
    patients = _table("patient", [{"patient_id": "p-1"}, {"patient_id": "p-2"}])
    observations = _table(
        "observation",
        [
            {"observation_id": "o-1", "patient_id": "p-2", "encounter_id": "e-1"},
            {"observation_id": "o-2", "patient_id": "p-1", "encounter_id": "p-1"},
            {"observation_id": "o-3", "patient_id": "p-2", "encounter_id": "e-1"},
        ],
    )

    patient_tokens = _column(make_backend().deidentify("patient", patients), "patient_id")
    observed = make_backend().deidentify("observation", observations)
    again = make_backend().deidentify("observation", observations)

    p1, p2 = patient_tokens
    assert _column(observed, "patient_id") == [p2, p1, p2]
    assert observed.equals(again)
    assert all(TOKEN.fullmatch(token) for token in patient_tokens)
    # The same id in another id space is another token: the resource type is hashed too.
    encounter_tokens = _column(observed, "encounter_id")
    assert encounter_tokens[0] == encounter_tokens[2] != encounter_tokens[1] != p1


def test_pseudonyms_differ_for_other_ids_and_keys_and_never_equal_the_input(
    make_backend: MakeBackend,
) -> None:
    ids = [f"p-{i}" for i in range(50)]
    patients = _table("patient", [{"patient_id": i} for i in ids])

    tokens = _column(make_backend().deidentify("patient", patients), "patient_id")
    other_key = _column(make_backend(OTHER_KEY).deidentify("patient", patients), "patient_id")

    assert len(set(tokens)) == len(ids)
    assert not set(tokens) & set(other_key)
    assert not set(tokens) & set(ids)


def test_date_shift_keeps_precision_and_suffix_with_one_offset_per_patient(
    make_backend: MakeBackend,
) -> None:
    shapes = {
        "2010-09-14": r"\d{4}-\d{2}-\d{2}",
        "2010": r"\d{4}",
        "2010-09": r"\d{4}-\d{2}",
        "2010-09-14T10:00:00+02:00": r"\d{4}-\d{2}-\d{2}T10:00:00\+02:00",
        "2011-02-28T23:59:59.123Z": r"\d{4}-\d{2}-\d{2}T23:59:59\.123Z",
        "2012-12-31T08:30-05:00": r"\d{4}-\d{2}-\d{2}T08:30-05:00",
    }
    rows = [
        {"observation_id": f"o-{i}", "patient_id": "p-1", "effective_datetime": value}
        for i, value in enumerate(shapes)
    ]
    rows[0]["last_updated"] = "2010-09-14T00:00:00Z"

    shifted = make_backend().deidentify("observation", _table("observation", rows))

    outputs = _column(shifted, "effective_datetime")
    for value, output in zip(shapes, outputs, strict=True):
        assert re.fullmatch(shapes[value], output), (value, output)
    days = (dt.date.fromisoformat(outputs[0]) - dt.date(2010, 9, 14)).days
    assert abs(days) <= MAX_DAYS
    # One offset for every date of the patient, in every column: intervals survive.
    assert outputs == [shift_fhir_temporal(value, days) for value in shapes]
    assert _column(shifted, "last_updated")[0] == shift_fhir_temporal("2010-09-14T00:00:00Z", days)


def test_date_shift_preserves_intervals_and_varies_between_patients(
    make_backend: MakeBackend,
) -> None:
    rows = [
        {
            "encounter_id": f"e-{patient}-{visit}",
            "patient_id": f"p-{patient}",
            "period_start": f"2021-0{visit + 1}-01T08:00:00Z",
            "period_end": f"2021-0{visit + 1}-0{visit + 2}T17:00:00Z",
        }
        for patient in range(40)
        for visit in range(2)
    ]

    shifted = make_backend().deidentify("encounter", _table("encounter", rows))

    offsets: dict[str, set[int]] = {}
    for row, start, end in zip(
        rows, _column(shifted, "period_start"), _column(shifted, "period_end"), strict=True
    ):
        before = dt.datetime.fromisoformat(row["period_start"])
        after = dt.datetime.fromisoformat(start)
        assert dt.datetime.fromisoformat(end) - after == (
            dt.datetime.fromisoformat(row["period_end"]) - before
        )
        offsets.setdefault(row["patient_id"], set()).add((after - before).days)
    assert all(len(days) == 1 for days in offsets.values())
    distinct = {days for (days,) in offsets.values()}
    assert len(distinct) > 20
    assert all(abs(days) <= MAX_DAYS for days in distinct)


def test_dates_without_a_patient_and_nulls_stay_null(make_backend: MakeBackend) -> None:
    rows = [
        {"observation_id": "o-1", "patient_id": None, "effective_datetime": "2021-01-01"},
        {"observation_id": None, "patient_id": "p-1", "effective_datetime": None},
        {},
    ]
    patients = _table("patient", [{}, {"patient_id": "p-1"}])

    observed = make_backend().deidentify("observation", _table("observation", rows))
    patient = make_backend().deidentify("patient", patients)

    assert _column(observed, "effective_datetime") == [None, None, None]
    assert _column(observed, "observation_id")[1:] == [None, None]
    assert _column(observed, "patient_id")[0] is None
    assert _column(observed, "encounter_id") == [None, None, None]
    assert all(value is None for value in patient.to_pylist()[0].values())


@pytest.mark.parametrize(
    ("birth_date", "expected"),
    [
        ("1980-07-01", 1980),
        ("1936-06-16", 1936),  # 89 on the reference date
        ("1936-06-15", 1936),  # 90 on the reference date: collapsed, to the same year
        ("1935-12-31", 1936),
        ("1900-01-01", 1936),
        ("1930", 1936),
        ("1937-03", 1937),
        ("2025", 2025),
    ],
)
def test_birth_year_collapses_ages_of_ninety_and_over(
    make_backend: MakeBackend, birth_date: str, expected: int
) -> None:
    patients = _table("patient", [{"patient_id": "p-1", "birth_year": birth_date}])

    generalised = make_backend().deidentify("patient", patients)

    assert _column(generalised, "birth_year") == [expected]
    assert generalised.schema.field("birth_year").type == pa.int64()


def test_zip3_keeps_three_digits_and_blanks_restricted_prefixes(make_backend: MakeBackend) -> None:
    codes = ["02139", "03601", "10212-1234", "8930", "AB1 2CD", None]
    patients = _table("patient", [{"patient_id": "p", "postal_code_3": c} for c in codes])

    generalised = make_backend().deidentify("patient", patients)

    assert _column(generalised, "postal_code_3") == ["021", "000", "000", None, None, None]


def test_redact_nulls_the_column_and_drop_removes_it(make_backend: MakeBackend) -> None:
    policy = _policy_with("patient", gender={"method": "redact"}, version_id={"method": "drop"})
    patients = _table(
        "patient",
        [{"patient_id": "p-1", "gender": "female", "version_id": "3", "deceased": "false"}],
        policy,
    )

    result = make_backend(policy=policy).deidentify("patient", patients)

    assert "version_id" not in result.column_names
    rules = policy.table("patient").columns
    assert result.column_names == [n for n in patients.column_names if rules[n].method != "drop"]
    assert _column(result, "gender") == [None]
    assert result.schema.field("gender").type == pa.string()
    assert _column(result, "deceased") == ["false"]


def test_a_view_column_without_a_rule_cannot_cross(make_backend: MakeBackend) -> None:
    patients = _table("patient", [{"patient_id": "p-1"}]).append_column(
        "name", pa.array(["Jane Doe"])
    )

    with pytest.raises(PolicyError, match="columns without a rule") as error:
        make_backend().deidentify("patient", patients)
    assert "Jane" not in str(error.value)


def test_an_unparseable_date_fails_naming_the_column_not_the_value(
    make_backend: MakeBackend,
) -> None:
    observations = _table(
        "observation",
        [{"observation_id": "o", "patient_id": "p", "effective_datetime": "Jane Doe 1980"}],
    )
    patients = _table("patient", [{"patient_id": "p", "birth_year": "Jane Doe 1980"}])

    with pytest.raises(DeidError, match=r"observation\.effective_datetime: date_shift") as error:
        make_backend().deidentify("observation", observations)
    assert "Jane" not in str(error.value)
    with pytest.raises(DeidError, match=r"patient\.birth_year: generalise") as error:
        make_backend().deidentify("patient", patients)
    assert "Jane" not in str(error.value)


# -- the two backends side by side ------------------------------------------------------------


def _sample(name: str) -> pa.Table:
    rows = []
    for i in range(12):
        row: dict[str, Any] = {}
        for column, rule in load_policy().table(name).columns.items():
            if rule.method == "pseudonymise":
                row[column] = f"{column}-{i % 5}"
            elif rule.method == "date_shift":
                row[column] = ["2020-01-02", "2020-03", "2019", "2020-05-06T07:08:09+01:00"][i % 4]
            elif rule.kind == "birth_year":
                row[column] = f"{1925 + 7 * i}-06-15"
            elif rule.kind == "zip3":
                row[column] = ["02139", "05901", "99999-1234"][i % 3]
            elif column == "value_quantity":
                row[column] = 1.5 * i
            elif rule.method == "keep":
                row[column] = f"{column}-kept"
        rows.append(row)
    return _table(name, rows)


def test_both_backends_publish_the_same_linkage_tokens_and_never_send_the_inputs(
    dlp: FakeDlpEndpoint,
) -> None:
    # The tokens are computed in the PHI zone beside the backend (docs/linkage.md): the
    # linkage key and the names never go to DLP, and both backends publish the same tokens.
    from starvit_assets.linkage.tokens import RECIPES, with_linkage_tokens

    policy = load_policy()
    linkage_key = b"linkage-key-for-the-backend-test!"
    rows = _sample("patient")
    names = pa.array([f"Brennan{i % 4}" for i in range(rows.num_rows)], pa.string())
    rows = rows.set_column(rows.column_names.index("linkage_family"), "linkage_family", names)
    given = pa.array(["Maeve"] * rows.num_rows, pa.string())
    rows = rows.set_column(rows.column_names.index("linkage_given"), "linkage_given", given)
    gender = pa.array(["female"] * rows.num_rows, pa.string())
    rows = rows.set_column(rows.column_names.index("gender"), "gender", gender)
    local = with_linkage_tokens(
        LocalDeidEngine(KEY, policy, reference_date=REFERENCE), policy, lambda: linkage_key
    ).deidentify("patient", rows)
    cloud = with_linkage_tokens(_dlp_backend(dlp), policy, lambda: linkage_key).deidentify(
        "patient", rows
    )
    assert cloud.schema == local.schema
    for name in RECIPES:
        assert cloud.column(name).equals(local.column(name)), name
        assert local.column(name).null_count < rows.num_rows
    sent = _payloads(dlp.requests)
    assert "Brennan" not in sent and "Maeve" not in sent
    assert linkage_key.decode() not in sent


@pytest.mark.parametrize("table_name", sorted(load_policy().tables))
def test_both_backends_give_the_same_schema_tokens_and_generalisations(
    dlp: FakeDlpEndpoint, table_name: str
) -> None:
    rows = _sample(table_name)
    local = LocalDeidEngine(KEY, load_policy(), reference_date=REFERENCE).deidentify(
        table_name, rows
    )
    cloud = _dlp_backend(dlp).deidentify(table_name, rows)

    assert cloud.schema == local.schema
    for column, rule in load_policy().table(table_name).columns.items():
        if rule.method == "date_shift":
            # DLP picks its own offsets; only the shapes (checked above) are shared.
            assert cloud.column(column).null_count == local.column(column).null_count
        elif rule.method != "drop":
            assert cloud.column(column).equals(local.column(column)), column


def test_an_empty_table_crosses_with_the_same_schema(dlp: FakeDlpEndpoint) -> None:
    empty = _sample("patient").slice(0, 0)
    local = LocalDeidEngine(KEY, load_policy(), reference_date=REFERENCE).deidentify(
        "patient", empty
    )

    cloud = _dlp_backend(dlp).deidentify("patient", empty)

    assert cloud.schema == local.schema and cloud.num_rows == 0
    assert dlp.requests == []


# -- the Cloud DLP backend --------------------------------------------------------------------


def test_requests_use_the_documented_dlp_transformations(dlp: FakeDlpEndpoint) -> None:
    patients = _table(
        "patient",
        [{"patient_id": "p-1", "birth_year": "1950-02-03", "last_updated": "2020-01-01"}],
    )

    _dlp_backend(dlp).deidentify("patient", patients)

    requests = dlp.requests
    assert {r.path for r in requests} == {
        "/v2/projects/starvit-test/locations/europe-west3/content:deidentify"
    }
    primitives = {}
    for request in requests:
        assert request.payload is not None
        config = request.payload["deidentifyConfig"]
        assert config["transformationErrorHandling"] == {"throwError": {}}
        (transformation,) = config["recordTransformations"]["fieldTransformations"]
        primitives.update(transformation["primitiveTransformation"])
    unwrapped = {"unwrapped": {"key": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}}
    assert primitives["cryptoHashConfig"] == {"cryptoKey": unwrapped}
    assert primitives["dateShiftConfig"] == {
        "upperBoundDays": MAX_DAYS,
        "lowerBoundDays": -MAX_DAYS,
        "context": {"name": "context"},
        "cryptoKey": unwrapped,
    }
    assert primitives["timePartConfig"] == {"partToExtract": 1}  # YEAR, as the enum number
    buckets = primitives["bucketingConfig"]["buckets"]
    assert buckets[0] == {
        "min": {"integerValue": "0"},
        "max": {"integerValue": "1937"},
        "replacementValue": {"integerValue": "1936"},
    }
    sent = _payloads(requests)
    assert '"stringValue": "Patient/p-1"' in sent
    assert '"stringValue": "date-shift/Patient/p-1"' in sent
    assert '"dateValue": {"year": 2020, "month": 1, "day": 1}' in sent
    assert '"dateValue": {"year": 1950, "month": 2, "day": 3}' in sent


def test_only_values_to_transform_leave_the_process(dlp: FakeDlpEndpoint) -> None:
    policy = _policy_with("observation", code_display={"method": "redact"})
    observations = _table(
        "observation",
        [
            {
                "observation_id": "o-1",
                "patient_id": "p-1",
                "code": "kept-code-marker",
                "code_display": "redacted-text-marker",
                "effective_datetime": "2021-01-01",
            }
        ],
        policy,
    )
    patients = _table("patient", [{"patient_id": "p-1", "postal_code_3": "02139-4307"}])

    _dlp_backend(dlp, policy=policy).deidentify("observation", observations)
    _dlp_backend(dlp, policy=policy).deidentify("patient", patients)

    sent = _payloads(dlp.requests)
    assert "kept-code-marker" not in sent
    assert "redacted-text-marker" not in sent
    assert "02139" not in sent  # ZIP3 is generalised here: DLP has no restricted-prefix list


def test_batches_stay_within_dlp_limits(dlp: FakeDlpEndpoint) -> None:
    # 64-character ids (FHIR's maximum) and distinct dates: several requests' worth of bytes.
    count = 6_000
    rows = [
        {
            "observation_id": f"{i:064d}",
            "patient_id": f"patient-{i % 600}",
            "effective_datetime": f"20{10 + i % 10}-{1 + i % 12:02d}-{1 + i % 28:02d}",
        }
        for i in range(count)
    ]
    observations = _table("observation", rows)

    result = _dlp_backend(dlp, limits=DlpLimits(requests_per_minute=60_000)).deidentify(
        "observation", observations
    )

    requests = dlp.requests
    assert all(r.status == 200 for r in requests)
    assert all(r.values <= DLP_MAX_VALUES for r in requests)
    assert all(r.body_bytes <= DLP_MAX_REQUEST_BYTES for r in requests)
    # Distinct values only: every observation id, patient id and (patient, date) pair once.
    pairs = {(row["patient_id"], row["effective_datetime"]) for row in rows}
    assert sum(r.rows for r in requests) == count + 600 + len(pairs)
    assert len(requests) >= 4
    assert max(r.body_bytes for r in requests) > DLP_MAX_REQUEST_BYTES * 0.8
    assert _column(result, "observation_id") == [
        pseudonym(KEY, "Observation", row["observation_id"]) for row in rows
    ]


class _AsIfGrpc:
    """The REST client presented as a gRPC one, recording each request's protobuf size."""

    def __init__(self, client: dlp_v2.DlpServiceClient) -> None:
        self._client = client
        self.transport = type("Transport", (), {"kind": "grpc"})()
        self.sizes: list[int] = []

    def deidentify_content(
        self, request: dlp_v2.DeidentifyContentRequest, *, retry: Any, timeout: float
    ) -> dlp_v2.DeidentifyContentResponse:
        self.sizes.append(dlp_v2.DeidentifyContentRequest.pb(request).ByteSize())
        return self._client.deidentify_content(request=request, retry=retry, timeout=timeout)


def test_over_grpc_batches_are_sized_in_the_protobuf_encoding() -> None:
    rows = [{"observation_id": f"{i:064d}", "patient_id": "p"} for i in range(20_000)]
    # The JSON of these batches exceeds 0.5 MB; only their protobuf has to fit.
    with FakeDlpEndpoint(max_request_bytes=10 * DLP_MAX_REQUEST_BYTES) as fake:
        client = _AsIfGrpc(fake.client())
        backend = DlpDeidBackend(
            client,
            project="starvit-test",
            key=UnwrappedKey(KEY),
            policy=load_policy(),
            reference_date=REFERENCE,
            limits=DlpLimits(requests_per_minute=60_000),
        )
        result = backend.deidentify("observation", _table("observation", rows))

    assert len(client.sizes) == 4  # 20,001 ids of ~80 bytes: about 1.6 MB of protobuf
    assert all(size <= DLP_MAX_REQUEST_BYTES for size in client.sizes)
    assert max(client.sizes) > DLP_MAX_REQUEST_BYTES * 0.8
    assert _column(result, "observation_id")[-1] == pseudonym(KEY, "Observation", f"{19_999:064d}")


def test_the_value_limit_splits_requests_too(dlp: FakeDlpEndpoint) -> None:
    rows = [
        {"observation_id": f"o-{i}", "patient_id": f"p-{i % 7}", "effective_datetime": "2020"}
        for i in range(1_000)
    ]
    limits = DlpLimits(max_values=300, requests_per_minute=60_000)

    result = _dlp_backend(dlp, limits=limits).deidentify("observation", _table("observation", rows))

    requests = dlp.requests
    assert all(r.values <= 300 for r in requests)
    assert sum(r.values for r in requests) == 1_000 + 7 + 2 * 7
    assert len(requests) == 4 + 1  # 1,007 ids in fours of 300; 7 (patient, date) pairs
    assert result.num_rows == 1_000


def test_quota_errors_are_retried_with_backoff(
    dlp: FakeDlpEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    sleeps: list[float] = []
    limits = DlpLimits(
        requests_per_minute=60_000, initial_backoff_seconds=1.0, max_backoff_seconds=60.0
    )
    backend = _dlp_backend(dlp, limits=limits, sleep=sleeps.append)
    dlp.fail_next(3)

    with caplog.at_level(logging.WARNING, logger="starvit_assets.deid.dlp"):
        result = backend.deidentify("patient", _table("patient", [{"patient_id": "p-secret"}]))

    assert _column(result, "patient_id") == [pseudonym(KEY, "Patient", "p-secret")]
    assert [r.status for r in dlp.requests] == [429, 429, 429, 200]
    backoffs = [s for s in sleeps if s >= 0.25]
    assert len(backoffs) == 3
    assert 0.5 <= backoffs[0] <= 1.0 and 1.0 <= backoffs[1] <= 2.0 and 2.0 <= backoffs[2] <= 4.0
    assert "TooManyRequests (HTTP 429)" in caplog.text
    assert "secret" not in caplog.text


def test_retries_give_up_with_an_error_naming_table_columns_and_step(
    dlp: FakeDlpEndpoint,
) -> None:
    limits = DlpLimits(max_attempts=3, requests_per_minute=60_000, initial_backoff_seconds=0.001)
    dlp.fail_next(3, status=503)

    with pytest.raises(DeidError) as error:
        _dlp_backend(dlp, limits=limits).deidentify(
            "patient", _table("patient", [{"patient_id": "p-secret"}])
        )

    message = str(error.value)
    assert "patient.patient_id" in message and "pseudonymise" in message
    assert "ServiceUnavailable (HTTP 503) after 3 attempts" in message
    assert "secret" not in message
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_other_dlp_errors_fail_at_once_without_values(dlp: FakeDlpEndpoint) -> None:
    unknown = KmsWrappedKey(wrapped_key=b"not-known-to-kms", crypto_key_name=KMS_KEY_NAME)

    with pytest.raises(DeidError, match=r"BadRequest \(HTTP 400\)") as error:
        _dlp_backend(dlp, key=unknown).deidentify(
            "patient", _table("patient", [{"patient_id": "p-secret"}])
        )

    assert "secret" not in str(error.value)
    assert len(dlp.requests) == 1


def test_a_kms_wrapped_key_is_sent_by_name_and_never_shown(dlp: FakeDlpEndpoint) -> None:
    key = KmsWrappedKey(wrapped_key=WRAPPED_KEY, crypto_key_name=KMS_KEY_NAME)
    backend = _dlp_backend(dlp, key=key)

    result = backend.deidentify("patient", _table("patient", [{"patient_id": "p-1"}]))

    # The fake KMS unwraps to KEY: the same tokens as the local engine with that key.
    assert _column(result, "patient_id") == [pseudonym(KEY, "Patient", "p-1")]
    sent = _payloads(dlp.requests)
    assert KMS_KEY_NAME in sent and '"unwrapped"' not in sent
    assert "wrapped-by-kms" not in repr(key) and "wrapped-by-kms" not in repr(backend)
    assert str(KEY) not in repr(UnwrappedKey(KEY))


def test_nothing_is_sent_for_a_table_that_cannot_cross(dlp: FakeDlpEndpoint) -> None:
    patients = _table("patient", [{"patient_id": "p-1"}]).append_column("name", pa.array(["x"]))
    bad_date = _table("patient", [{"patient_id": "p-1", "last_updated": "yesterday"}])
    bad_birth = _table("patient", [{"patient_id": "p-1", "birth_year": "unknown"}])

    with pytest.raises(PolicyError):
        _dlp_backend(dlp).deidentify("patient", patients)
    for table in (bad_date, bad_birth):
        with pytest.raises(DeidError):
            _dlp_backend(dlp).deidentify("patient", table)

    assert dlp.requests == []


def test_an_unwrapped_key_must_be_256_bits() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        UnwrappedKey(bytes(range(64)))


def test_the_rate_limiter_spaces_requests() -> None:
    now = [100.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(600, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        limiter.acquire()
    now[0] += 10.0
    limiter.acquire()

    assert sleeps == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert now[0] == pytest.approx(110.4)


# -- the endpoint itself ----------------------------------------------------------------------


def test_the_endpoint_answers_malformed_requests_with_an_rpc_status(
    dlp: FakeDlpEndpoint,
) -> None:
    url = f"http://{dlp.host}/v2/projects/p/locations/global/content:deidentify"
    request = urllib.request.Request(url, data=b"{not json", method="POST")

    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=5)

    assert error.value.code == 400
    status = json.loads(error.value.read())["error"]
    assert status["code"] == 400 and status["status"] == "INVALID_ARGUMENT"
    assert status["message"]


def test_the_client_library_maps_endpoint_errors_to_api_exceptions(
    dlp: FakeDlpEndpoint,
) -> None:
    ragged = dlp_v2.DeidentifyContentRequest(
        parent="projects/p/locations/global",
        deidentify_config=dlp_v2.DeidentifyConfig(
            record_transformations=dlp_v2.RecordTransformations(
                field_transformations=[
                    dlp_v2.FieldTransformation(
                        fields=[dlp_v2.FieldId(name="a")],
                        primitive_transformation=dlp_v2.PrimitiveTransformation(
                            redact_config=dlp_v2.RedactConfig()
                        ),
                    )
                ]
            )
        ),
        item=dlp_v2.ContentItem(
            table=dlp_v2.Table(
                headers=[dlp_v2.FieldId(name="a"), dlp_v2.FieldId(name="b")],
                rows=[dlp_v2.Table.Row(values=[dlp_v2.Value(string_value="x")])],
            )
        ),
    )

    # Over REST the library maps the HTTP status (BadRequest, TooManyRequests), not the
    # google.rpc code (InvalidArgument, ResourceExhausted): the backend retries on the former.
    with pytest.raises(api_exceptions.BadRequest, match="does not match the headers"):
        dlp.client().deidentify_content(request=ragged, retry=None)
    dlp.fail_next(1)
    with pytest.raises(api_exceptions.TooManyRequests) as error:
        dlp.client().deidentify_content(request=ragged, retry=None)
    assert error.value.reason == "RATE_LIMIT_EXCEEDED"
