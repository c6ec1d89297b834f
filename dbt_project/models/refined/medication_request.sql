with

medication_requests as (

    select * from {{ ref('stg_fhir__medication_request') }}

),

latest_versions as (

    {{ latest_version('medication_requests', 'medication_request_id') }}

),

latest as (

    {{ exclude_deleted('latest_versions', 'MedicationRequest', 'medication_request_id') }}

),

final as (

    select
        medication_request_id,
        patient_id,
        encounter_id,
        version_id,
        status,
        intent,
        rxnorm_code,
        medication_display,
        authored_at,
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
        code_validation.code_is_valid,
        code_validation.mapped_system_uri as mapped_system,
        code_validation.mapped_code

    from final
    left join code_validation
        on code_validation.code_system = 'rxnorm'
        and final.rxnorm_code = code_validation.code

)

select * from validated
