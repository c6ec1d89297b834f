{#-
    The refined observations a body-measure metric may use: a known body measure in its
    canonical unit, a status in var `metric_observation_statuses`, and a value within the
    measure's plausible range (seed `body_measures`). `bmi_latest` computes from these, and
    its post-hook deletes the rows whose observations are no longer among them.
-#}
{% macro usable_body_measurements() -%}
    select observations.*
    from {{ ref('observation') }} as observations
    inner join {{ ref('body_measures') }} as body_measures
        on observations.body_measure = body_measures.measure
        and observations.unit_normalised = body_measures.canonical_unit
    where observations.status in {{ metric_observation_statuses() }}
        and observations.value_normalised >= body_measures.plausible_min
        and observations.value_normalised <= body_measures.plausible_max
{%- endmacro %}

{#-
    A condition on the rows of a BMI relation (alias `bmi`) whose height or weight observation
    is no longer usable for that patient: deleted by an export (itself or its patient: a
    deleted Patient takes its observations along), marked entered-in-error, or moved to
    another patient. Such a row must be recomputed from what is left, or removed.
-#}
{% macro bmi_inputs_unusable(bmi='bmi') -%}
    not exists (
        select 1
        from ({{ usable_body_measurements() }}) as usable_heights
        where usable_heights.observation_id = {{ bmi }}.height_observation_id
            and usable_heights.patient_id = {{ bmi }}.patient_id
            and usable_heights.body_measure = 'body_height'
    )
    or not exists (
        select 1
        from ({{ usable_body_measurements() }}) as usable_weights
        where usable_weights.observation_id = {{ bmi }}.weight_observation_id
            and usable_weights.patient_id = {{ bmi }}.patient_id
            and usable_weights.body_measure = 'body_weight'
    )
{%- endmacro %}
