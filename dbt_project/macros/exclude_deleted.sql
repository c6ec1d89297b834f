{#-
    The rows of `relation` (the latest versions of one resource type) whose resource the
    export's deleted[] list has not deleted. A deletion applies to the versions exported up to
    the export that reported it; a version exported later (the id re-used after the delete)
    stays. Deletions come from `stg_fhir__deleted_resource`, pseudonymised with the same key
    and resource type as the ids, so they match.
-#}
{% macro exclude_deleted(relation, resource_type, resource_id) -%}
    select {{ relation }}.*
    from {{ relation }}
    where not exists (
        select 1
        from {{ ref('stg_fhir__deleted_resource') }} as deletions
        where deletions.resource_type = '{{ resource_type }}'
            and deletions.resource_id = {{ relation }}.{{ resource_id }}
            and deletions._export_id >= {{ relation }}._export_id
    )
{%- endmacro %}
