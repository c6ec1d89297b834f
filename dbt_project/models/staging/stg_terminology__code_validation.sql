with

source as (

    select * from {{ source('terminology', 'terminology_code_validation') }}

),

renamed as (

    select

        ---------- ids
        code_system as code_system_uri,
        code,

        ---------- validation
        is_valid as code_is_valid,
        system_known as code_system_known,
        display as terminology_display,
        message as validation_message,

        ---------- mapping
        mapped_system as mapped_system_uri,
        mapped_code,
        mapped_display,
        map_equivalence,

        ---------- bookkeeping
        occurrences,
        source_tables,
        terminology_service,
        validated_at

    from source

)

select * from renamed
