with

source as (

    select * from {{ source('fhir_raw', 'deleted_resource') }}

),

renamed as (

    select

        ---------- ids
        resource_type,
        resource_id,

        ---------- attributes
        -- partitions published before retractions existed hold deletions only
        coalesce(reason, 'deleted') as reason,

        ---------- timestamps
        {{ fhir_datetime_start('export_transaction_time') }} as deleted_by_export_at,

        ---------- lineage
        {{ lineage_columns() }}

    from source

)

select * from renamed
