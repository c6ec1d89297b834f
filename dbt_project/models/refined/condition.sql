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

),

-- terminology: appended last so the columns above keep their place
code_validation as (

    {{ validated_codes() }}

),

validated as (

    select
        final.*,
        snomed.code_is_valid as snomed_code_is_valid,
        icd10.code_is_valid as icd10_code_is_valid,
        snomed.mapped_system_uri as mapped_system,
        snomed.mapped_code

    from final
    left join code_validation as snomed
        on snomed.code_system = 'snomed'
        and final.snomed_code = snomed.code
    left join code_validation as icd10
        on icd10.code_system = 'icd10cm'
        and final.icd10_code = icd10.code

)

select * from validated
