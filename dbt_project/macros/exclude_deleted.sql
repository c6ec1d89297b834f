{#-
    The rows of `relation` (the latest versions of one resource type) that the exports'
    deleted[] lists have not deleted: neither the resource itself nor its patient (a deleted
    Patient takes the rows that name it along, so no refined row points at a patient that is
    gone). A deletion applies to the versions exported up to the export that reported it; a
    version exported later (the id used again after the delete) stays. Deletions come from
    `stg_fhir__deleted_resource`, pseudonymised with the same key and resource type as the ids,
    so they match; the gate's retractions are among them, whatever their `reason`.
-#}
{% macro exclude_deleted(relation, resource_type, resource_id, patient_id='patient_id') -%}
    select {{ relation }}.*
    from {{ relation }}
    where not exists (
        select 1
        from {{ ref('stg_fhir__deleted_resource') }} as deletions
        where deletions._export_id >= {{ relation }}._export_id
            and (
                (deletions.resource_type = '{{ resource_type }}'
                    and deletions.resource_id = {{ relation }}.{{ resource_id }})
                {%- if resource_type != 'Patient' %}
                or (deletions.resource_type = 'Patient'
                    and deletions.resource_id = {{ relation }}.{{ patient_id }})
                {%- endif %}
            )
    )
{%- endmacro %}
