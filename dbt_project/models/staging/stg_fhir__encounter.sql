with

source as (

    select * from {{ source('fhir_raw', 'encounter') }}

),

renamed as (

    select

        ---------- ids
        encounter_id,
        patient_id,
        version_id,

        ---------- attributes
        status,
        class_code,
        type_system as type_system_uri,
        type_code,

        ---------- timestamps
        {{ fhir_datetime_start('period_start') }} as period_start_at,
        {{ fhir_datetime_start('period_end') }} as period_end_at,
        {{ fhir_datetime_start('last_updated') }} as last_updated_at,

        ---------- lineage
        {{ lineage_columns() }}

    from source

)

select * from renamed
