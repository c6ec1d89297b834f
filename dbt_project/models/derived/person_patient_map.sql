with

runs as (

    select * from {{ ref('stg_linkage__person_patient_map') }}

),

-- the map is recomputed whole on every run: only the latest run is current
latest_run as (

    select max(linkage_run) as linkage_run from runs

),

final as (

    select
        runs.person_key,
        runs.source,
        runs.patient_id,
        runs.match_rule,
        runs.person_size,
        runs.linkage_run

    from runs
    inner join latest_run
        on runs.linkage_run = latest_run.linkage_run

)

select * from final
