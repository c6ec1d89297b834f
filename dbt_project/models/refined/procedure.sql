with

procedures as (

    select * from {{ ref('stg_fhir__procedure') }}

),

latest_versions as (

    {{ latest_version('procedures', 'procedure_id') }}

),

latest as (

    {{ exclude_deleted('latest_versions', 'Procedure', 'procedure_id') }}

),

final as (

    select
        procedure_id,
        patient_id,
        encounter_id,
        version_id,
        status,
        snomed_code,
        snomed_display,
        performed_at,
        performed_precision,
        last_updated_at,
        {{ lineage_columns() }}

    from latest

)

select * from final
