with

patients as (

    select * from {{ ref('patient') }}

),

age_brackets as (

    select * from {{ ref('patient_age_bracket') }}

),

weight_categories as (

    select * from {{ ref('patient_weight_category') }}

),

conditions as (

    select * from {{ ref('condition') }}

),

medication_requests as (

    select * from {{ ref('medication_request') }}

),

encounters as (

    select * from {{ ref('encounter') }}

),

condition_counts as (

    select
        patient_id,
        count(*) as condition_count

    from conditions
    where verification_status is null or verification_status <> 'entered-in-error'
    group by patient_id

),

medication_request_counts as (

    select
        patient_id,
        count(*) as medication_request_count

    from medication_requests
    where status is null or status <> 'entered-in-error'
    group by patient_id

),

encounter_counts as (

    select
        patient_id,
        count(*) as encounter_count

    from encounters
    where status is null or status <> 'entered-in-error'
    group by patient_id

),

final as (

    select
        patients.patient_id,
        patients.gender,
        age_brackets.age_bracket,
        weight_categories.bmi,
        weight_categories.weight_category,
        coalesce(condition_counts.condition_count, 0) as condition_count,
        coalesce(medication_request_counts.medication_request_count, 0) as medication_request_count,
        coalesce(encounter_counts.encounter_count, 0) as encounter_count,
        true as requires_clinician_review,
        {{ metric_version('patient_features') }} as metric_version

    from patients
    left join age_brackets
        on patients.patient_id = age_brackets.patient_id
    left join weight_categories
        on patients.patient_id = weight_categories.patient_id
    left join condition_counts
        on patients.patient_id = condition_counts.patient_id
    left join medication_request_counts
        on patients.patient_id = medication_request_counts.patient_id
    left join encounter_counts
        on patients.patient_id = encounter_counts.patient_id

)

select * from final
