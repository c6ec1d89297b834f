with

source as (

    select * from {{ source('fhir_raw', 'medication_request') }}

),

renamed as (

    select

        ---------- ids
        medication_request_id,
        patient_id,
        encounter_id,
        version_id,

        ---------- attributes
        status,
        intent,
        rxnorm_code,
        medication_display,

        ---------- timestamps
        {{ fhir_datetime_start('authored_on') }} as authored_at,
        {{ fhir_datetime_start('last_updated') }} as last_updated_at,

        ---------- lineage
        {{ lineage_columns() }}

    from source

)

select * from renamed
