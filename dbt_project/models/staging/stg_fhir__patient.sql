with

source as (

    select * from {{ source('fhir_raw', 'patient') }}

),

renamed as (

    select

        ---------- ids
        patient_id,
        version_id,

        ---------- attributes
        gender,
        birth_year,
        postal_code_3,
        deceased as is_deceased,

        ---------- record linkage (docs/linkage.md)
        link_patient_id as linked_patient_id,
        link_type,
        link_token_1,
        link_token_2,
        link_token_3,
        link_token_4,

        ---------- timestamps
        {{ fhir_datetime_start('last_updated') }} as last_updated_at,

        ---------- lineage
        {{ lineage_columns() }}

    from source

)

select * from renamed
