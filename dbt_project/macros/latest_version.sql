{#-
    The current version of each resource in a relation that accumulates rows from several
    exports. The latest version is the one with the newest last_updated_at (then the later
    export, then the later line); of the rows holding exactly that content under the same
    de-identification policy (same _content_hash and _policy_version), the earliest load is
    returned, so that `_export_id` and `_loaded_at` say since when the warehouse has held this
    content. A full re-export of unchanged data therefore changes nothing downstream, and
    incremental models recompute only what really changed.
    Adds `_latest_content_hash`, `_latest_policy_version` and `_version_rank` (always 1 in the
    result), which the caller leaves out of its final select.
-#}
{% macro latest_version(relation, resource_id) -%}
    select *
    from (
        select
            *,
            row_number() over (
                partition by {{ resource_id }}
                order by _export_id asc, _source_line asc
            ) as _version_rank
        from (
            select
                *,
                first_value(_content_hash) over (
                    partition by {{ resource_id }}
                    order by last_updated_at desc nulls last, _export_id desc, _source_line desc
                ) as _latest_content_hash,
                first_value(_policy_version) over (
                    partition by {{ resource_id }}
                    order by last_updated_at desc nulls last, _export_id desc, _source_line desc
                ) as _latest_policy_version
            from {{ relation }}
        ) as versions
        where _content_hash is not distinct from _latest_content_hash
            and _policy_version is not distinct from _latest_policy_version
    ) as current_versions
    where _version_rank = 1
{%- endmacro %}
