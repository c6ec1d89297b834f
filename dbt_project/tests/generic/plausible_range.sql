{#-
    Fails for every non-null value outside the plausible range of `measure` in seed
    `body_measures` (closed interval [plausible_min, plausible_max]), and once when the seed
    has no such measure, so a typo cannot make the test pass silently.
-#}
{% test plausible_range(model, column_name, measure) %}

with

limits as (

    select plausible_min, plausible_max
    from {{ ref('body_measures') }}
    where measure = '{{ measure }}'

),

implausible as (

    select {{ column_name }} as value
    from {{ model }}
    cross join limits
    where {{ column_name }} is not null
        and ({{ column_name }} < limits.plausible_min or {{ column_name }} > limits.plausible_max)

),

missing_limits as (

    select cast(null as {{ dbt.type_float() }}) as value
    from (select 1 as one) as single_row
    where not exists (select 1 from limits)

)

select value from implausible
union all
select value from missing_limits

{% endtest %}
