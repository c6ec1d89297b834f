with

source as (

    select * from {{ source('linkage', 'person_patient_map') }}

),

renamed as (

    select

        ---------- ids
        person_key,
        source,
        patient_id,

        ---------- linkage
        match_rule,
        person_size,

        ---------- lineage
        _export_id as linkage_run,
        _loaded_at

    from source

)

select * from renamed
