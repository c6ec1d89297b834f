{#-
    Schemas are named sv_<env>_<layer>: the layer is the `schema` config set per folder in
    dbt_project.yml (staging, refined, derived, snapshots, reference) and the environment comes
    from the var `starvit_env` or the STARVIT_ENV variable (default dev). A node without a
    layer falls back to the target schema.
-#}
{% macro generate_schema_name(custom_schema_name, node) -%}
    {%- if custom_schema_name is none -%}
        {{ target.schema }}
    {%- else -%}
        sv_{{ starvit_env() }}_{{ custom_schema_name | trim }}
    {%- endif -%}
{%- endmacro %}

{% macro starvit_env() -%}
    {{ var('starvit_env', env_var('STARVIT_ENV', 'dev')) }}
{%- endmacro %}
