with

immunizations as (

    select * from {{ ref('stg_fhir__immunization') }}

),

latest_versions as (

    {{ latest_version('immunizations', 'immunization_id') }}

),

latest as (

    {{ exclude_deleted('latest_versions', 'Immunization', 'immunization_id') }}

),

final as (

    select
        immunization_id,
        patient_id,
        encounter_id,
        version_id,
        status,
        cvx_code,
        cvx_display,
        is_primary_source,
        occurred_at,
        occurrence_precision,
        last_updated_at,
        {{ lineage_columns() }}

    from latest

)

select * from final
