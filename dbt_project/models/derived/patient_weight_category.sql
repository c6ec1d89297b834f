with

bmi_latest as (

    select * from {{ ref('bmi_latest') }}

),

who_bmi_categories as (

    select * from {{ ref('who_bmi_categories') }}

),

-- each category runs from its lower bound up to (excluding) the next one's; the last is open
category_intervals as (

    select
        weight_category,
        lower_bound,
        lead(lower_bound) over (order by lower_bound) as upper_bound

    from who_bmi_categories

),

final as (

    select
        bmi_latest.patient_id,
        bmi_latest.bmi,
        category_intervals.weight_category,
        true as requires_clinician_review,
        {{ metric_version('weight_category') }} as metric_version

    from bmi_latest
    inner join category_intervals
        on bmi_latest.bmi >= category_intervals.lower_bound
        and (category_intervals.upper_bound is null or bmi_latest.bmi < category_intervals.upper_bound)

)

select * from final
