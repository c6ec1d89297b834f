with

runs as (

    select * from {{ ref('stg_linkage__person_patient_map') }}

),

patients as (

    select * from {{ ref('patient') }}

),

-- the map is recomputed whole on every run: only the latest run is current
latest_run as (

    select max(linkage_run) as linkage_run from runs

),

-- the linkage reads every published patient record; one of this source that an export deleted
-- since (refined patient leaves it out) leaves its person too, so nothing here points at a
-- patient that is gone. Peer sources' records are not in this warehouse: their own deletions
-- reach the linkage through their lakes.
current_patients as (

    select runs.*

    from runs
    inner join latest_run
        on runs.linkage_run = latest_run.linkage_run
    where runs.source <> '{{ env_var('STARVIT_SOURCE_NAME', 'A') }}'
        or exists (
            select 1 from patients where patients.patient_id = runs.patient_id
        )

),

final as (

    select
        person_key,
        source,
        patient_id,
        match_rule,
        count(*) over (partition by person_key) as person_size,
        linkage_run

    from current_patients

)

select * from final
