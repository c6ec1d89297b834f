with

encounters as (

    select * from {{ ref('stg_fhir__encounter') }}

),

code_systems as (

    select * from {{ ref('code_systems') }}

),

latest_versions as (

    {{ latest_version('encounters', 'encounter_id') }}

),

latest as (

    {{ exclude_deleted('latest_versions', 'Encounter', 'encounter_id') }}

),

final as (

    select
        latest.encounter_id,
        latest.patient_id,
        latest.version_id,
        latest.status,
        latest.class_code,
        code_systems.code_system as type_code_system,
        latest.type_system_uri,
        latest.type_code,
        latest.period_start_at,
        latest.period_end_at,
        latest.last_updated_at,
        {{ lineage_columns('latest') }}

    from latest
    left join code_systems
        on latest.type_system_uri = code_systems.code_system_uri

)

select * from final
