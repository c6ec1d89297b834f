{#-
    The terminology service's answer for every validated (system, code) pair, with the
    system's short name from the `code_systems` seed (`snomed`, `icd10`, `rxnorm`, `cvx`, ...),
    so that a refined model joins on the short name its own code columns are named after.
    A system with no short name has no answer here: `CODE_SYSTEMS` must name it.
-#}
{% macro validated_codes() -%}
    select
        validations.*,
        validated_systems.code_system

    from {{ ref('stg_terminology__code_validation') }} as validations
    inner join {{ ref('code_systems') }} as validated_systems
        on validations.code_system_uri = validated_systems.code_system_uri
{%- endmacro %}
