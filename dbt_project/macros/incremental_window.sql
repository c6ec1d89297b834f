{#-
    The window of an incremental run, from the vars window_start, window_end (ISO 8601 instants)
    and export_id, which defs/dbt.py validates before it passes them. A value that does not
    look like one fails the compilation here too, so nothing else reaches the SQL text.
-#}
{% macro incremental_window_given() -%}
    {%- for name in ['window_start', 'window_end'] -%}
        {%- set value = var(name) -%}
        {%- if value and not modules.re.match('^\\d{4}-\\d{2}-\\d{2}[ T]\\d{2}:\\d{2}:\\d{2}(\\.\\d+)?(Z|[+-]\\d{2}:\\d{2})$', value | string) -%}
            {{ exceptions.raise_compiler_error('var ' ~ name ~ ' must be an ISO 8601 instant with an offset, like 2026-01-02T00:00:00+00:00') }}
        {%- endif -%}
    {%- endfor -%}
    {%- if var('export_id') and not modules.re.match('^[A-Za-z0-9._-]{1,128}$', var('export_id') | string) -%}
        {{ exceptions.raise_compiler_error('var export_id may hold only letters, digits, ".", "_" and "-"') }}
    {%- endif -%}
    {{- return(var('window_start') or var('window_end') or var('export_id')) -}}
{%- endmacro %}

{#- An ISO 8601 instant as a timestamp literal both adapters read. -#}
{% macro timestamp_literal(instant) -%}
    cast('{{ instant | string | replace("T", " ") | replace("Z", "+00:00") }}' as {{ var('column_types')[target.type].timestamp }})
{%- endmacro %}
