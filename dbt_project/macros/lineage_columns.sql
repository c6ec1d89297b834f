{#- The lineage columns every raw table carries (docs/raw-tables.md) plus the load time. -#}
{% macro lineage_columns(relation_alias=none) -%}
    {%- set prefix = relation_alias ~ '.' if relation_alias else '' -%}
    {%- for column in ['_export_id', '_source_file', '_source_line', '_content_hash', '_policy_version', '_loaded_at'] %}
    {{ prefix }}{{ column }}{{ ',' if not loop.last }}
    {%- endfor %}
{%- endmacro %}
