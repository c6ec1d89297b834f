"""The one place that assembles the Starvit Definitions and applies the shared policies.

Each zone module defines its own assets and checks; here every asset spec passes once
through ``apply_platform_policies``, which sets owners, freshness, zone tags, retention and
the zone's automation condition. An asset in a group with no policy fails the load: nothing
goes unowned.
"""

import datetime as dt
import warnings
from dataclasses import dataclass

import dagster as dg

from starvit_assets.defs.alerting import ALERTING_SENSORS, AUDIT_SENSORS, OPENLINEAGE_SENSORS
from starvit_assets.defs.automation import (
    automation_condition_sensor,
    daily_full_lineage,
    dbt_condition,
    downstream_condition,
    fhir_exports_job,
    fhir_full_refresh_job,
    full_lineage_job,
    new_fhir_data,
)
from starvit_assets.defs.dbt import dbt_models, dbt_resource
from starvit_assets.defs.deid_raw import deid_assets
from starvit_assets.defs.deletions import DELETION_ASSETS
from starvit_assets.defs.extract import fhir_export
from starvit_assets.defs.graph import tigergraph_load
from starvit_assets.defs.linkage import person_patient_map
from starvit_assets.defs.resources import PlatformResource, bigquery_resource, gcs_resource
from starvit_assets.defs.retention import RETENTION_DEFS
from starvit_assets.defs.subscriptions import medplum_subscription_events
from starvit_assets.defs.terminology import terminology_code_validation
from starvit_assets.defs.warehouse import WAREHOUSE_RAW_ASSETS
from starvit_assets.ops.logging import configure_logging_from_env
from starvit_assets.settings import load_settings


class PolicyMissingError(Exception):
    pass


DATA_PLATFORM = "team:data-platform"
PRIVACY = "team:privacy-engineering"
ANALYTICS = "team:analytics-engineering"


@dataclass(frozen=True)
class ZonePolicy:
    owner: str
    zone: str
    retention: str
    automation: dg.AutomationCondition | None
    """None only for the zone that runs on schedules and sensors (the FHIR exports)."""


# Exports are started by the schedule and the sensors (defs/automation.py, defs/subscriptions.py);
# every zone downstream follows them by its automation condition.
ZONE_POLICIES: dict[str, ZonePolicy] = {
    "phi_extract": ZonePolicy(
        owner=DATA_PLATFORM,
        zone="phi",
        retention="PHI staging: purged once de-identified; never kept past 7 days",
        automation=None,
    ),
    "deid_raw": ZonePolicy(
        owner=PRIVACY,
        zone="research",
        retention="immutable partitions per export; kept 6 years",
        automation=downstream_condition(),
    ),
    "warehouse_raw": ZonePolicy(
        owner=DATA_PLATFORM, zone="research", retention="6 years", automation=downstream_condition()
    ),
    "staging": ZonePolicy(
        owner=ANALYTICS,
        zone="research",
        retention="view over raw; no copy",
        automation=dbt_condition(),
    ),
    "refined": ZonePolicy(
        owner=ANALYTICS,
        zone="research",
        retention="rebuilt from raw; 6 years",
        automation=dbt_condition(),
    ),
    "derived": ZonePolicy(
        owner=ANALYTICS,
        zone="research",
        retention="rebuilt from refined; 6 years",
        automation=dbt_condition(),
    ),
    "reference": ZonePolicy(
        owner=ANALYTICS,
        zone="research",
        retention="versioned in git",
        automation=dbt_condition(),
    ),
    "linkage": ZonePolicy(
        owner=PRIVACY,
        zone="research",
        retention="one partition per patient export; rebuilt from deid_raw; 6 years",
        automation=downstream_condition(),
    ),
    "graph": ZonePolicy(
        owner=DATA_PLATFORM,
        zone="research",
        retention="replaced on every load",
        automation=downstream_condition(),
    ),
    "terminology": ZonePolicy(
        owner=ANALYTICS,
        zone="research",
        retention="replaced on every run (codes and answers only)",
        automation=downstream_condition(),
    ),
}

DAILY_FRESHNESS = dg.FreshnessPolicy.time_window(
    fail_window=dt.timedelta(hours=30), warn_window=dt.timedelta(hours=26)
)


def apply_platform_policies(spec: dg.AssetSpec) -> dg.AssetSpec:
    group = spec.group_name or "default"
    policy = ZONE_POLICIES.get(group)
    if policy is None:
        raise PolicyMissingError(
            f"asset {spec.key.to_user_string()} is in group {group!r}, which has no policy"
        )
    return spec.replace_attributes(
        owners=list(spec.owners) or [policy.owner],
        freshness_policy=spec.freshness_policy or DAILY_FRESHNESS,
        tags={**spec.tags, "starvit/zone": policy.zone},
        metadata={**spec.metadata, "retention": policy.retention},
        automation_condition=(
            spec.automation_condition
            if spec.automation_condition is not None
            else policy.automation
        ),
    )


def build_definitions() -> dg.Definitions:
    settings = load_settings()
    definitions = dg.Definitions(
        assets=[
            fhir_export,
            *deid_assets(settings.deid_backend),
            *WAREHOUSE_RAW_ASSETS,
            person_patient_map,
            terminology_code_validation,
            *DELETION_ASSETS,
            dbt_models,
            tigergraph_load,
        ],
        jobs=[full_lineage_job, fhir_exports_job, fhir_full_refresh_job, *RETENTION_DEFS.jobs],
        schedules=[daily_full_lineage, *RETENTION_DEFS.schedules],
        sensors=[
            new_fhir_data,
            medplum_subscription_events,
            automation_condition_sensor,
            *ALERTING_SENSORS,
            *AUDIT_SENSORS,
            *OPENLINEAGE_SENSORS,
        ],
        resources={
            "platform": PlatformResource(
                bigquery=bigquery_resource(settings), gcs=gcs_resource(settings)
            ),
            "dbt": dbt_resource(settings.warehouse_target.value),
        },
    )
    with warnings.catch_warnings():
        # map_asset_specs is the one-pass policy hook dagster-open-platform uses; still "preview".
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return definitions.map_asset_specs(func=apply_platform_policies)


configure_logging_from_env()
defs = build_definitions()
