"""The ``starvit`` command line: parses arguments and calls the domain modules.

User mistakes (a missing folder, a bad URL, an unreachable server) end in one clear line on
stderr and exit status 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from starvit_assets.settings import (
    DBT_PROJECT_DIR,
    REPO_ROOT,
    SettingsError,
    StarvitSettings,
    dbt_executable,
    load_settings,
    venv_executable,
)

EXIT_USER_ERROR = 2
DEFAULT_DEMO_PATIENTS = 50


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# --- fhir ---------------------------------------------------------------------------------
def cmd_fhir_synth(args: argparse.Namespace) -> int:
    from starvit_assets.fhir.synth import generate

    if args.patients < 1:
        raise CliError("--patients must be at least 1")
    for flag in ("--fault-rate", "--duplicate-rate", "--overlap"):
        rate = getattr(args, flag.removeprefix("--").replace("-", "_"))
        # "not within" also refuses NaN, which every comparison fails.
        if not 0.0 <= rate <= 1.0:
            raise CliError(f"{flag} must be between 0 and 1 (a share), not {rate}")
    fault_rates = _fault_rates(args.fault) if args.fault else None
    try:
        counts = generate(
            Path(args.out),
            patients=args.patients,
            seed=args.seed,
            fault_rate=args.fault_rate,
            fault_rates=fault_rates,
            duplicate_rate=args.duplicate_rate,
            source=args.source_name,
            overlap=args.overlap,
        )
    except ValueError as error:
        raise CliError(str(error)) from None
    for resource_type, count in counts.items():
        print(f"{resource_type:<20} {count:>10}")
    print(f"wrote {sum(counts.values())} resources to {Path(args.out).resolve()}")
    return 0


def _fault_rates(settings: list[str]) -> dict[str, float]:
    """``--fault KIND=RATE`` flags of ``fhir synth`` as ``generate``'s ``fault_rates``; the
    kinds and rates are checked by ``generate`` itself."""
    rates: dict[str, float] = {}
    for setting in settings:
        kind, separator, value = setting.partition("=")
        if not separator or not kind:
            raise CliError(
                f"--fault takes KIND=RATE, for example unknown_code=0.01, not {setting!r}"
            )
        try:
            rates[kind] = float(value)
        except ValueError:
            raise CliError(f"--fault {kind}: the rate must be a number, not {value!r}") from None
    return rates


def cmd_fhir_serve(args: argparse.Namespace) -> int:
    from starvit_assets.fhir.server import BulkDataServer

    data = _existing_ndjson_folder(args.data)
    options = serve_options(args)
    try:
        server = BulkDataServer(data, host=args.host, port=args.port, **options)
    except OSError as error:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {error.strerror}") from None
    print(f"serving FHIR Bulk Data from {data} (auth: {server.auth_mode}; Ctrl-C to stop)")
    if server.auth_mode == "oauth":
        print(f"token endpoint: {server.token_url}")
    server.serve_forever(on_ready=lambda url: print(f"base URL: {url}", flush=True))
    return 0


def serve_options(args: argparse.Namespace) -> dict[str, Any]:
    """``BulkDataServer`` keyword arguments from the ``fhir serve`` flags, validated."""
    from starvit_assets.fhir.server import Faults
    from starvit_assets.fhir.server_auth import AuthConfigError, OAuthClient, load_public_keys

    for flag, value in (
        ("--max-lines-per-file", args.max_lines_per_file),
        ("--manifest-page-size", args.manifest_page_size),
        ("--token-lifetime", args.token_lifetime),
    ):
        if value is not None and value < 1:
            raise CliError(f"{flag} must be at least 1")
    try:
        faults = Faults.parse(args.fault)
    except ValueError as error:
        raise CliError(str(error)) from None
    options: dict[str, Any] = {
        "max_lines_per_file": args.max_lines_per_file,
        "manifest_page_size": args.manifest_page_size,
        "faults": faults,
    }
    given = {
        flag: value
        for flag, value in (
            ("--access-token-file", args.access_token_file),
            ("--client-id", args.client_id),
            ("--client-secret-file", args.client_secret_file),
            ("--client-public-key", args.client_public_key),
            ("--client-key-id", args.client_key_id),
            ("--token-lifetime", args.token_lifetime),
        )
        if value is not None
    }
    allowed = {
        "none": set(),
        "bearer": {"--access-token-file"},
        "oauth": set(given) - {"--access-token-file"},
    }[args.auth]
    if set(given) - allowed:
        raise CliError(
            f"{', '.join(sorted(set(given) - allowed))} do(es) not apply to --auth {args.auth}"
        )
    if args.auth == "bearer":
        if args.access_token_file is None:
            raise CliError("--auth bearer needs --access-token-file")
        options["access_token"] = _secret_file("--access-token-file", args.access_token_file)
    elif args.auth == "oauth":
        if not args.client_id:
            raise CliError("--auth oauth needs --client-id")
        if args.client_secret_file is None and args.client_public_key is None:
            raise CliError(
                "--auth oauth needs --client-secret-file (client credentials) and/or "
                "--client-public-key (a JWKS or PEM public key, for a JWT client assertion)"
            )
        if args.client_key_id is not None and args.client_public_key is None:
            raise CliError("--client-key-id goes with --client-public-key")
        secret = (
            _secret_file("--client-secret-file", args.client_secret_file)
            if args.client_secret_file is not None
            else None
        )
        try:
            keys = (
                load_public_keys(Path(args.client_public_key), args.client_key_id)
                if args.client_public_key is not None
                else {}
            )
            options["oauth_clients"] = [OAuthClient(args.client_id, secret=secret, keys=keys)]
        except AuthConfigError as error:
            raise CliError(str(error)) from None
        options["token_lifetime"] = args.token_lifetime or 300
    return options


def _secret_file(flag: str, name: str) -> str:
    """The stripped content of a secret file; errors name the file, never its content."""
    path = Path(name).expanduser()
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise CliError(f"cannot read {flag} {path}: {reason}") from None
    if not secret:
        raise CliError(f"{flag} {path} is empty")
    return secret


def cmd_fhir_export(args: argparse.Namespace) -> int:
    from starvit_assets.fhir.auth import load_auth_from_env
    from starvit_assets.fhir.client import BulkDataClient, ExportRequest

    try:
        request = ExportRequest(
            level=args.level,
            group_id=args.group,
            types=_comma_list(args.type),
            since=args.since,
            type_filters=tuple(args.type_filter),
            elements=_comma_list(args.elements),
            patients=tuple(args.patient),
            include_associated_data=tuple(
                code for value in args.include_associated_data for code in _comma_list(value)
            ),
            method="POST" if args.post or args.patient else "GET",
            lenient=args.lenient,
            allow_partial_manifests=args.allow_partial_manifests,
        )
    except ValueError as error:
        raise CliError(str(error)) from None
    if args.incremental and not args.state_dir:
        raise CliError("--incremental needs --state-dir, where the watermarks are kept")
    auth = load_auth_from_env(fhir_base_url=args.base_url)
    state_dir = Path(args.state_dir).expanduser() if args.state_dir else None
    with BulkDataClient(args.base_url, auth=auth, state_dir=state_dir) as client:
        result = client.export(Path(args.out), request=request, incremental=args.incremental)
    for resource_type, count in sorted(result.counts.items()):
        print(f"{resource_type:<20} {count:>10}")
    print(
        f"transactionTime {result.transaction_time}; manifest at {Path(args.out) / 'manifest.json'}"
    )
    return 0


def _comma_list(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


def _existing_ndjson_folder(folder: str) -> Path:
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise CliError(f"{path} is not a folder")
    if not any(path.glob("*.ndjson")):
        raise CliError(f"{path} holds no .ndjson files")
    return path


# --- terminology --------------------------------------------------------------------------
def cmd_terminology_serve(args: argparse.Namespace) -> int:
    from starvit_assets.terminology.local import CONTENT_DIR, LocalTerminology
    from starvit_assets.terminology.server import TerminologyServer

    folders = [Path(folder).expanduser().resolve() for folder in args.content] or [CONTENT_DIR]
    server = TerminologyServer(LocalTerminology(folders), host=args.host, port=args.port)
    print(f"serving FHIR terminology from {', '.join(map(str, folders))} (Ctrl-C to stop)")
    server.serve_forever(on_ready=lambda url: print(f"base URL: {url}", flush=True))
    return 0


def cmd_terminology_validate(args: argparse.Namespace) -> int:
    from starvit_assets.terminology.model import Coding, TranslateRequest
    from starvit_assets.terminology.service import terminology_service
    from starvit_assets.terminology.validation import MAP_TARGETS

    service = terminology_service(load_settings())
    try:
        coding = Coding(args.system, args.code)
        answer = service.validate_code(coding)
        state = "valid" if answer.valid else "INVALID"
        print(f"{args.system}#{args.code}: {state} ({service.description})")
        for label, text in (("display", answer.display), ("message", answer.message)):
            if text:
                print(f"  {label}: {text}")
        target = MAP_TARGETS.get(args.system)
        if answer.valid and target:
            best = service.translate(TranslateRequest(coding, target_system=target)).best()
            if best:
                print(f"  maps to {best.target.system}#{best.target.code} ({best.equivalence})")
    finally:
        service.close()
    return 0 if answer.valid else 1


# --- views --------------------------------------------------------------------------------
def cmd_views_conformance(args: argparse.Namespace) -> int:
    from starvit_assets.views.conformance import run_conformance

    tests_dir = Path(args.dir)
    if not tests_dir.is_dir():
        raise CliError(f"{tests_dir} is not a folder of SQL on FHIR test files")
    summary = run_conformance(tests_dir, Path(args.report))
    print(f"{summary.passed} passed, {summary.failed} failed")
    for failure in summary.failures:
        print(f"  FAILED {failure}")
    return 0 if summary.failed == 0 else 1


# --- db / dbt -----------------------------------------------------------------------------
def cmd_db_url(args: argparse.Namespace) -> int:
    from starvit_assets import platform

    settings = load_settings()
    platform.ensure_dirs(settings)
    endpoints = platform.resolve_endpoints(settings)
    print(
        f"warehouse schemas: {settings.raw_schema}, {settings.schema_name('refined')}, {settings.schema_name('derived')}"
    )
    print(endpoints.warehouse_dsn)
    return 0


def cmd_db_stop(args: argparse.Namespace) -> int:
    from starvit_assets.warehouse.embedded import stop_embedded_postgres

    settings = load_settings()
    stopped = stop_embedded_postgres(settings.pgdata_dir)
    print("embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL was not running")
    return 0


def cmd_dbt_prepare(args: argparse.Namespace) -> int:
    prepare_dbt_manifest()
    print(f"dbt manifest written to {DBT_PROJECT_DIR / 'target' / 'manifest.json'}")
    return 0


def prepare_dbt_manifest() -> None:
    """Parse the dbt project once, at install time, so loading definitions never parses it."""
    from dagster_dbt import DbtCliResource

    from starvit_assets.clinical.seeds import write_seeds

    write_seeds(DBT_PROJECT_DIR / "seeds")
    DbtCliResource(
        project_dir=str(DBT_PROJECT_DIR),
        profiles_dir=str(DBT_PROJECT_DIR),
        dbt_executable=dbt_executable(),
    ).cli(["parse", "--quiet"], raise_on_error=True, target_path=DBT_PROJECT_DIR / "target").wait()


def cmd_dbt_docs(args: argparse.Namespace) -> int:
    """Generate the dbt docs (the data dictionary) against the warehouse and serve them.

    The docs get their own target path: ``dbt docs generate`` writes a manifest.json too, and
    in dbt_project/target it would replace the prepared manifest Dagster loads."""
    import subprocess

    from starvit_assets import platform
    from starvit_assets.defs.dbt import DBT_DOCS_PORT, DBT_DOCS_TARGET_DIR

    settings = load_settings()
    platform.ensure_dirs(settings)
    platform.activate(settings)
    common = [
        "--project-dir",
        str(DBT_PROJECT_DIR),
        "--profiles-dir",
        str(DBT_PROJECT_DIR),
        "--target-path",
        str(DBT_DOCS_TARGET_DIR),
    ]
    subprocess.run([dbt_executable(), "docs", "generate", *common], check=True)
    print(f"dbt docs generated in {DBT_DOCS_TARGET_DIR}")
    if args.no_serve:
        return 0
    print(f"dbt docs on http://127.0.0.1:{DBT_DOCS_PORT} (Ctrl-C to stop)")
    subprocess.run(
        [dbt_executable(), "docs", "serve", "--port", str(DBT_DOCS_PORT), "--no-browser", *common],
        check=True,
    )
    return 0


# --- demo / dev ---------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from starvit_assets.demo import run_demo

    data = _existing_ndjson_folder(args.data) if args.data else None
    if args.patients < 1:
        raise CliError("--patients must be at least 1")
    return run_demo(data=data, patients=args.patients, seed=args.seed)


def cmd_dev(args: argparse.Namespace) -> int:
    from starvit_assets import platform
    from starvit_assets.demo import ensure_source_data

    settings = load_settings()
    platform.ensure_dirs(settings)
    platform.activate(settings)
    ensure_source_data(settings, patients=DEFAULT_DEMO_PATIENTS, seed=1)
    command = [
        venv_executable("dagster"),
        "dev",
        "-w",
        str(REPO_ROOT / "workspace.yaml"),
        "-p",
        str(args.port),
    ]
    print(f"Dagster UI on http://127.0.0.1:{args.port} (DAGSTER_HOME={settings.dagster_home})")
    os.execvp(command[0], command)


def cmd_bench(args: argparse.Namespace) -> int:
    from starvit_assets.bench import run_bench

    if args.patients < 1:
        raise CliError("--patients must be at least 1")
    return run_bench(
        patients=args.patients, out=Path(args.out), seed=args.seed, lineage=not args.gate_only
    )


# --- parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="starvit", description="Starvit data platform")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    zones = parser.add_subparsers(dest="command", required=True)

    fhir = zones.add_parser(
        "fhir", help="FHIR synthetic data, local Bulk Data server, export client"
    )
    fhir_commands = fhir.add_subparsers(dest="fhir_command", required=True)
    synth = fhir_commands.add_parser("synth", help="generate deterministic synthetic NDJSON")
    synth.add_argument("--patients", type=int, default=100)
    synth.add_argument("--seed", type=int, default=1)
    synth.add_argument("--out", required=True)
    synth.add_argument(
        "--fault-rate",
        type=float,
        default=0.0,
        help="share of resources given a planted data-quality fault, 0 to 1 (truth.json lists them)",
    )
    synth.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND=RATE",
        help="plant only this fault kind at this rate (repeatable), e.g. duplicate_person=0.1; "
        "see docs/synthetic-data.md",
    )
    synth.add_argument(
        "--duplicate-rate",
        type=float,
        default=0.0,
        help="share of persons given a second, unlinked Patient record (persons.json: truth)",
    )
    synth.add_argument(
        "--source-name",
        default="A",
        help="another data holder than the default A: its own ids, sharing --overlap persons",
    )
    synth.add_argument(
        "--overlap",
        type=float,
        default=0.0,
        help="with --source-name: share of its persons that are also source A's (same seed)",
    )
    synth.set_defaults(handler=cmd_fhir_synth)
    serve = fhir_commands.add_parser("serve", help="serve a folder of NDJSON as a Bulk Data server")
    serve.add_argument("--data", required=True)
    serve.add_argument("--port", type=int, default=8090)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument(
        "--max-lines-per-file", type=int, help="split a type's output into files of this size"
    )
    serve.add_argument(
        "--manifest-page-size",
        type=int,
        help="output entries per manifest page, for clients sending allowPartialManifests",
    )
    serve.add_argument(
        "--auth",
        choices=("none", "bearer", "oauth"),
        default="none",
        help="none; one fixed bearer token; or OAuth2 client credentials / JWT assertion",
    )
    serve.add_argument("--access-token-file", help="--auth bearer: file holding the token")
    serve.add_argument("--client-id", help="--auth oauth: the registered client id")
    serve.add_argument(
        "--client-secret-file",
        help="--auth oauth: file holding the client secret (client_secret_basic/post)",
    )
    serve.add_argument(
        "--client-public-key",
        help="--auth oauth: a JWKS JSON or PEM public key file, for private_key_jwt",
    )
    serve.add_argument("--client-key-id", help="the kid of a PEM --client-public-key")
    serve.add_argument(
        "--token-lifetime", type=int, help="--auth oauth: seconds an access token lives (300)"
    )
    serve.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="inject a fault (repeatable), e.g. status_transient=3; see docs/extract.md",
    )
    serve.set_defaults(handler=cmd_fhir_serve)
    export = fhir_commands.add_parser("export", help="run a Bulk Data $export and download it")
    export.add_argument("--base-url", required=True)
    export.add_argument("--out", required=True)
    export.add_argument("--type", help="comma-separated resource types")
    export.add_argument("--since", help="FHIR instant: only resources updated after it")
    export.add_argument(
        "--level", choices=("system", "patient", "group"), default="system", help="kick-off level"
    )
    export.add_argument("--group", help="Group id, for --level group")
    export.add_argument("--post", action="store_true", help="kick off by POST with Parameters")
    export.add_argument(
        "--type-filter",
        action="append",
        default=[],
        help="_typeFilter, e.g. 'Observation?status=final'",
    )
    export.add_argument("--elements", help="comma-separated _elements")
    export.add_argument(
        "--patient", action="append", default=[], help="Patient id to export (POST only)"
    )
    export.add_argument("--lenient", action="store_true", help="send Prefer: handling=lenient")
    export.add_argument(
        "--include-associated-data",
        action="append",
        default=[],
        help="includeAssociatedData codes, e.g. LatestProvenanceResources (repeatable or comma-separated)",
    )
    export.add_argument(
        "--allow-partial-manifests",
        action="store_true",
        help="send allowPartialManifests=true: the server may page the manifest",
    )
    export.add_argument(
        "--incremental",
        action="store_true",
        help="take _since from the stored watermark of this server (needs --state-dir)",
    )
    export.add_argument(
        "--state-dir", help="folder for resumable export state and incremental watermarks"
    )
    export.set_defaults(handler=cmd_fhir_export)

    terminology = zones.add_parser("terminology", help="FHIR terminology: local server, checks")
    terminology_commands = terminology.add_subparsers(dest="terminology_command", required=True)
    tx_serve = terminology_commands.add_parser(
        "serve", help="serve the shipped CodeSystems, ValueSets and ConceptMaps over FHIR"
    )
    tx_serve.add_argument("--port", type=int, default=8095)
    tx_serve.add_argument("--host", default="127.0.0.1")
    tx_serve.add_argument(
        "--content",
        action="append",
        default=[],
        help="folder of terminology JSON resources (repeatable; default: the shipped content)",
    )
    tx_serve.set_defaults(handler=cmd_terminology_serve)
    tx_validate = terminology_commands.add_parser(
        "validate", help="validate one code with the configured terminology service"
    )
    tx_validate.add_argument("system", help="code system URI, e.g. http://loinc.org")
    tx_validate.add_argument("code")
    tx_validate.set_defaults(handler=cmd_terminology_validate)

    views = zones.add_parser("views", help="SQL on FHIR v2 ViewDefinitions")
    views_commands = views.add_subparsers(dest="views_command", required=True)
    conformance = views_commands.add_parser("conformance", help="run SQL on FHIR test files")
    conformance.add_argument("dir")
    conformance.add_argument("--report", required=True)
    conformance.set_defaults(handler=cmd_views_conformance)

    db = zones.add_parser("db", help="the warehouse database")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser(
        "url", help="start the embedded server if needed; print the DSN"
    ).set_defaults(handler=cmd_db_url)
    db_commands.add_parser("stop", help="stop the embedded server").set_defaults(
        handler=cmd_db_stop
    )

    dbt = zones.add_parser("dbt", help="the dbt project")
    dbt_commands = dbt.add_subparsers(dest="dbt_command", required=True)
    dbt_commands.add_parser("prepare", help="generate seeds and parse the manifest").set_defaults(
        handler=cmd_dbt_prepare
    )

    demo = zones.add_parser("demo", help="run the whole lineage headless and print a summary")
    demo.add_argument("--data", help="folder of your own NDJSON files instead of synthetic data")
    demo.add_argument("--patients", type=int, default=DEFAULT_DEMO_PATIENTS)
    demo.add_argument("--seed", type=int, default=1)
    demo.set_defaults(handler=cmd_demo)

    dev = zones.add_parser("dev", help="start the Dagster UI on the embedded defaults")
    dev.add_argument("--port", type=int, default=3000)
    dev.set_defaults(handler=cmd_dev)

    bench = zones.add_parser("bench", help="run the lineage on a larger synthetic set")
    bench.add_argument("--patients", type=int, default=10_000)
    bench.add_argument("--seed", type=int, default=7)
    bench.add_argument("--out", default="bench.json")
    bench.add_argument(
        "--gate-only",
        action="store_true",
        help="stop after the flatten+de-identify and DuckDB stages (no Dagster lineage run)",
    )
    bench.set_defaults(handler=cmd_bench)
    docs = dbt_commands.add_parser("docs", help="generate the dbt docs and serve them locally")
    docs.add_argument("--no-serve", action="store_true", help="generate only")
    docs.set_defaults(handler=cmd_dbt_docs)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from starvit_assets.exports import ExportRecordError
    from starvit_assets.fhir.errors import ExportError
    from starvit_assets.terminology.local import ContentError
    from starvit_assets.terminology.model import TerminologyError
    from starvit_assets.warehouse.embedded import EmbeddedPostgresError

    return (
        CliError,
        SettingsError,
        ExportError,
        ExportRecordError,
        EmbeddedPostgresError,
        TerminologyError,
        ContentError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except _user_errors() as error:
        print(f"starvit: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


def settings_summary(settings: StarvitSettings) -> str:
    return json.dumps({"home": str(settings.home), "env": settings.env.value}, indent=2)


if __name__ == "__main__":
    sys.exit(main())
