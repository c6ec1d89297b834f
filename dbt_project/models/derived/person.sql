with

person_patients as (

    select * from {{ ref('person_patient_map') }}

),

final as (

    select
        person_key,
        count(*) as patient_count,
        count(distinct source) as source_count,
        count(*) > 1 as is_linked,
        {{ dbt.listagg("distinct match_rule", "','", "order by match_rule") }} as match_rules,
        max(linkage_run) as linkage_run

    from person_patients
    group by person_key

)

select * from final
