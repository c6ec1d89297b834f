{#-
    Rounds half away from zero to `digits` decimals, identically on PostgreSQL and BigQuery:
    the value is first fixed to 9 decimals (BigQuery's NUMERIC scale; PostgreSQL's float8 ->
    numeric cast keeps 15 significant digits), then rounded.
    Python twin: starvit_assets.clinical.bmi.round_half_up.
-#}
{% macro round_half_up(expression, digits) -%}
    round(round(cast({{ expression }} as numeric), 9), {{ digits }})
{%- endmacro %}
