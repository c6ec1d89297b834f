with

source as (

    select * from {{ source('fhir_raw', 'observation') }}

),

renamed as (

    select

        ---------- ids
        observation_id,
        patient_id,
        encounter_id,
        version_id,

        ---------- attributes
        status,
        category_code,
        code_system as code_system_uri,
        code,
        code_display,
        value_quantity,
        value_unit,
        value_unit_system as value_unit_system_uri,
        value_unit_code,

        ---------- timestamps
        {{ fhir_datetime_start('effective_datetime') }} as effective_at,
        {{ fhir_datetime_start('last_updated') }} as last_updated_at,

        ---------- lineage
        {{ lineage_columns() }}

    from source

)

select * from renamed
