with

patients as (

    select * from {{ ref('patient') }}

),

age_brackets as (

    select * from {{ ref('age_brackets') }}

),

-- each bracket runs from its min_age up to (excluding) the next one's; the last (90+) is open
bracket_intervals as (

    select
        age_bracket,
        min_age,
        lead(min_age) over (order by min_age) as next_min_age

    from age_brackets

),

ages as (

    -- only the birth year crosses the de-identification gate: the age attained in the reference year
    select
        patient_id,
        birth_year,
        {{ reference_date() }} as reference_date,
        cast(extract(year from {{ reference_date() }}) - birth_year as {{ dbt.type_bigint() }}) as age

    from patients

),

-- BigQuery allows no outer join on a range condition alone: bracket the known ages first
bracketed as (

    select
        ages.patient_id,
        bracket_intervals.age_bracket

    from ages
    inner join bracket_intervals
        on ages.age >= bracket_intervals.min_age
        and (bracket_intervals.next_min_age is null or ages.age < bracket_intervals.next_min_age)

),

final as (

    select
        ages.patient_id,
        ages.age,
        bracketed.age_bracket,
        ages.reference_date,
        true as requires_clinician_review,
        {{ metric_version('age_bracket') }} as metric_version

    from ages
    left join bracketed
        on ages.patient_id = bracketed.patient_id

)

select * from final
