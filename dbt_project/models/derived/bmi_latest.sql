{#-
    Incremental: a run recomputes only the patients with a body measurement loaded after the
    newest measurement this table has used (source_loaded_at), and the patients whose row was
    computed from an observation that is no longer usable (deleted by an export, itself or
    with its patient; marked entered-in-error; moved to another patient). Their rows are
    merged on patient_id; then the post-hook deletes every row still computed from an
    unusable observation: the patients left without a usable height and weight, and the
    deleted patients. Both steps use macros/body_measures.sql, so they agree on "usable".
    A run for a window (vars window_start / window_end: _loaded_at in [start, end)) or for one
    export (var export_id: the current version of the measurement first arrived in it) looks
    for newly loaded measurements there instead of after the watermark; defs/dbt.py passes
    them. The rows with unusable inputs are recomputed in either case.
-#}
{{
    config(
        materialized='incremental',
        unique_key='patient_id',
        incremental_strategy='merge',
        on_schema_change='append_new_columns',
        post_hook="delete from {{ this }} as bmi where {{ bmi_inputs_unusable('bmi') }}",
    )
}}

with

observations as (

    select * from {{ ref('observation') }}

),

{% if is_incremental() and incremental_window_given() %}

newly_loaded_patients as (

    select distinct observations.patient_id

    from observations
    where observations.body_measure is not null
        {%- if var('window_start') %}
        and observations._loaded_at >= {{ timestamp_literal(var('window_start')) }}
        {%- endif %}
        {%- if var('window_end') %}
        and observations._loaded_at < {{ timestamp_literal(var('window_end')) }}
        {%- endif %}
        {%- if var('export_id') %}
        and observations._export_id = '{{ var('export_id') }}'
        {%- endif %}

),

{% elif is_incremental() %}

watermark as (

    select max(source_loaded_at) as loaded_at from {{ this }}

),

newly_loaded_patients as (

    select distinct observations.patient_id

    from observations
    cross join watermark
    where observations.body_measure is not null
        and (watermark.loaded_at is null or observations._loaded_at > watermark.loaded_at)

),

{% endif %}

{% if is_incremental() %}

-- rows computed from an observation that is no longer usable: recomputed from what is left
patients_with_unusable_inputs as (

    select bmi.patient_id

    from {{ this }} as bmi
    where {{ bmi_inputs_unusable('bmi') }}

),

changed_patients as (

    select patient_id from newly_loaded_patients
    union distinct
    select patient_id from patients_with_unusable_inputs

),

{% endif %}

usable_measurements as (

    select usable.*

    from ({{ usable_body_measurements() }}) as usable
    {% if is_incremental() %}
    where usable.patient_id in (select patient_id from changed_patients)
    {% endif %}

),

ranked as (

    select
        usable_measurements.*,
        row_number() over (
            partition by patient_id, body_measure
            order by effective_at desc nulls last, last_updated_at desc nulls last, observation_id desc
        ) as recency_rank

    from usable_measurements

),

heights as (

    select * from ranked where body_measure = 'body_height' and recency_rank = 1

),

weights as (

    select * from ranked where body_measure = 'body_weight' and recency_rank = 1

),

final as (

    select
        heights.patient_id,
        heights.value_normalised as height_cm,
        weights.value_normalised as weight_kg,
        {{ round_half_up(
            'weights.value_normalised / ((heights.value_normalised / 100.0) * (heights.value_normalised / 100.0))',
            1
        ) }} as bmi,
        heights.observation_id as height_observation_id,
        weights.observation_id as weight_observation_id,
        heights.effective_at as height_effective_at,
        weights.effective_at as weight_effective_at,
        greatest(heights._loaded_at, weights._loaded_at) as source_loaded_at,
        {{ dbt.current_timestamp() }} as computed_at,
        true as requires_clinician_review,
        {{ metric_version('bmi') }} as metric_version

    from heights
    inner join weights
        on heights.patient_id = weights.patient_id

)

select * from final
