with

observations as (

    select * from {{ ref('stg_fhir__observation') }}

),

code_systems as (

    select * from {{ ref('code_systems') }}

),

ucum_conversions as (

    select * from {{ ref('ucum_conversions') }}

),

body_measures as (

    select * from {{ ref('body_measures') }}

),

latest_versions as (

    {{ latest_version('observations', 'observation_id') }}

),

latest as (

    {{ exclude_deleted('latest_versions', 'Observation', 'observation_id') }}

),

coded as (

    select
        latest.*,
        code_systems.code_system,
        unit_systems.code_system as value_unit_code_system

    from latest
    left join code_systems
        on latest.code_system_uri = code_systems.code_system_uri
    left join code_systems as unit_systems
        on latest.value_unit_system_uri = unit_systems.code_system_uri

),

final as (

    select
        coded.observation_id,
        coded.patient_id,
        coded.encounter_id,
        coded.version_id,
        coded.status,
        coded.category_code,
        coded.code_system,
        coded.code_system_uri,
        coded.code,
        coded.code_display,
        body_measures.measure as body_measure,
        coded.value_quantity,
        coded.value_unit,
        coded.value_unit_code,
        coded.value_quantity * ucum_conversions.factor as value_normalised,
        ucum_conversions.canonical_unit as unit_normalised,
        coded.effective_at,
        coded.last_updated_at,
        {{ lineage_columns('coded') }}

    from coded
    left join body_measures
        on coded.code_system = body_measures.code_system
        and coded.code = body_measures.code
    -- a unit code is UCUM only when the quantity names no other unit system
    left join ucum_conversions
        on coded.value_unit_code = ucum_conversions.unit_code
        and (coded.value_unit_system_uri is null or coded.value_unit_code_system = 'ucum')

),

-- terminology: appended last so the columns above keep their place
code_validation as (

    select * from {{ ref('stg_terminology__code_validation') }}

),

validated as (

    select
        final.*,
        code_validation.code_is_valid,
        code_validation.code_system_known,
        code_validation.mapped_system_uri as mapped_system,
        code_validation.mapped_code

    from final
    left join code_validation
        on final.code_system_uri = code_validation.code_system_uri
        and final.code = code_validation.code

)

select * from validated
