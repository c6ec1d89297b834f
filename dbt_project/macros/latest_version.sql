{#-
    The latest version of each resource in a relation that accumulates rows from several
    exports: by last_updated_at, then the later export, then the later line. Adds
    `_version_rank` (always 1 in the result) which the caller leaves out of its final select.
-#}
{% macro latest_version(relation, resource_id) -%}
    select *
    from (
        select
            *,
            row_number() over (
                partition by {{ resource_id }}
                order by last_updated_at desc nulls last, _export_id desc, _source_line desc
            ) as _version_rank
        from {{ relation }}
    ) as versions
    where _version_rank = 1
{%- endmacro %}
