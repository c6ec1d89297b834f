with

patients as (

    select * from {{ ref('stg_fhir__patient') }}

),

latest_versions as (

    {{ latest_version('patients', 'patient_id') }}

),

latest as (

    {{ exclude_deleted('latest_versions', 'Patient', 'patient_id') }}

),

final as (

    select
        patient_id,
        version_id,
        gender,
        birth_year,
        postal_code_3,
        is_deceased,
        last_updated_at,
        {{ lineage_columns() }}

    from latest

)

select * from final
