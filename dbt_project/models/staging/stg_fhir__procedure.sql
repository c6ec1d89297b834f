with

source as (

    select * from {{ source('fhir_raw', 'procedure') }}

),

renamed as (

    select

        ---------- ids
        procedure_id,
        patient_id,
        encounter_id,
        version_id,

        ---------- attributes
        status,
        snomed_code,
        snomed_display,

        ---------- timestamps
        {{ fhir_datetime_start('performed_datetime') }} as performed_at,
        {{ fhir_datetime_precision('performed_datetime') }} as performed_precision,
        {{ fhir_datetime_start('last_updated') }} as last_updated_at,

        ---------- lineage
        {{ lineage_columns() }}

    from source

)

select * from renamed
