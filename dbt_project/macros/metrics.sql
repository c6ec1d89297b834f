{#- The version name of a derived clinical metric (var `metric_versions`), as a string literal. -#}
{% macro metric_version(metric) -%}
    cast('{{ var("metric_versions")[metric] }}' as {{ dbt.type_string() }})
{%- endmacro %}

{#- The date ages are computed at: var `reference_date` (YYYY-MM-DD) or today. -#}
{% macro reference_date() -%}
    {%- if var('reference_date', none) -%}
        cast('{{ var("reference_date") }}' as date)
    {%- else -%}
        current_date
    {%- endif -%}
{%- endmacro %}

{#- Observation statuses whose values may feed a metric, as an SQL list. -#}
{% macro metric_observation_statuses() -%}
    (
    {%- for status in var('metric_observation_statuses') -%}
        '{{ status }}'{{ ', ' if not loop.last }}
    {%- endfor -%}
    )
{%- endmacro %}
