with

conditions as (

    select * from {{ ref('stg_fhir__condition') }}

),

latest_versions as (

    {{ latest_version('conditions', 'condition_id') }}

),

latest as (

    {{ exclude_deleted('latest_versions', 'Condition', 'condition_id') }}

),

final as (

    select
        condition_id,
        patient_id,
        encounter_id,
        version_id,
        clinical_status,
        verification_status,
        snomed_code,
        snomed_display,
        icd10_code,
        icd10_display,
        onset_at,
        onset_precision,
        recorded_at,
        last_updated_at,
        {{ lineage_columns() }}

    from latest

)

select * from final
