with

allergy_intolerances as (

    select * from {{ ref('stg_fhir__allergy_intolerance') }}

),

latest_versions as (

    {{ latest_version('allergy_intolerances', 'allergy_intolerance_id') }}

),

latest as (

    {{ exclude_deleted('latest_versions', 'AllergyIntolerance', 'allergy_intolerance_id') }}

),

final as (

    select
        allergy_intolerance_id,
        patient_id,
        encounter_id,
        version_id,
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
        onset_at,
        onset_precision,
        recorded_at,
        last_updated_at,
        {{ lineage_columns() }}

    from latest

),

-- terminology: appended last so the columns above keep their place
code_validation as (

    {{ validated_codes() }}

),

validated as (

    select
        final.*,
        substance.code_is_valid as snomed_code_is_valid,
        reaction.code_is_valid as reaction_snomed_code_is_valid

    from final
    left join code_validation as substance
        on substance.code_system = 'snomed'
        and final.snomed_code = substance.code
    left join code_validation as reaction
        on reaction.code_system = 'snomed'
        and final.reaction_snomed_code = reaction.code

)

select * from validated
