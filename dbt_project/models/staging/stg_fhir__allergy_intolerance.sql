with

source as (

    select * from {{ source('fhir_raw', 'allergy_intolerance') }}

),

renamed as (

    select

        ---------- ids
        allergy_intolerance_id,
        patient_id,
        encounter_id,
        version_id,

        ---------- attributes
        clinical_status,
        verification_status,
        type,
        categories,
        criticality,
        snomed_code,
        snomed_display,
        reaction_snomed_code,
        reaction_snomed_display,
        reaction_severity,

        ---------- timestamps
        {{ fhir_datetime_start('onset_datetime') }} as onset_at,
        {{ fhir_datetime_precision('onset_datetime') }} as onset_precision,
        {{ fhir_datetime_start('recorded_date') }} as recorded_at,
        {{ fhir_datetime_start('last_updated') }} as last_updated_at,

        ---------- lineage
        {{ lineage_columns() }}

    from source

)

select * from renamed
