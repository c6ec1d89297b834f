with

source as (

    select * from {{ source('fhir_raw', 'immunization') }}

),

renamed as (

    select

        ---------- ids
        immunization_id,
        patient_id,
        encounter_id,
        version_id,

        ---------- attributes
        status,
        cvx_code,
        cvx_display,
        primary_source as is_primary_source,

        ---------- timestamps
        {{ fhir_datetime_start('occurrence_datetime') }} as occurred_at,
        {{ fhir_datetime_precision('occurrence_datetime') }} as occurrence_precision,
        {{ fhir_datetime_start('last_updated') }} as last_updated_at,

        ---------- lineage
        {{ lineage_columns() }}

    from source

)

select * from renamed
