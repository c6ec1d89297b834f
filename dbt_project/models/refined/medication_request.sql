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

)

select * from final
