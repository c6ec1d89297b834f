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

),

-- terminology: appended last so the columns above keep their place
code_validation as (

    {{ validated_codes() }}

),

validated as (

    select
        final.*,
        code_validation.code_is_valid as cvx_code_is_valid

    from final
    left join code_validation
        on code_validation.code_system = 'cvx'
        and final.cvx_code = code_validation.code

)

select * from validated
