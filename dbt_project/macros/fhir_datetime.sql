{#-
    FHIR date / dateTime / instant strings keep their original precision in the raw tables.
    fhir_datetime_start turns one into the first instant it can denote, as a timestamp with
    time zone: "2010" -> 2010-01-01 00:00 UTC, "2010-09" -> 2010-09-01 00:00 UTC,
    "2010-09-14" -> 2010-09-14 00:00 UTC, a date-time -> the exact instant of its offset
    (a date-time without an offset, which FHIR forbids, is read as UTC).
    Python twin: starvit_assets.clinical.dates.fhir_datetime_start.
-#}
{% macro fhir_datetime_start(column) -%}
    {{ return(adapter.dispatch('fhir_datetime_start', 'starvit')(column)) }}
{%- endmacro %}

{#- PostgreSQL (and the default): `~` is its regular-expression match. -#}
{% macro default__fhir_datetime_start(column) -%}
    case
        when {{ column }} is null then null
        when length({{ column }}) = 4 then cast({{ column }} || '-01-01T00:00:00+00:00' as timestamp with time zone)
        when length({{ column }}) = 7 then cast({{ column }} || '-01T00:00:00+00:00' as timestamp with time zone)
        when length({{ column }}) = 10 then cast({{ column }} || 'T00:00:00+00:00' as timestamp with time zone)
        when {{ column }} ~ '(Z|[+-][0-9]{2}:[0-9]{2})$' then cast({{ column }} as timestamp with time zone)
        else cast({{ column }} || '+00:00' as timestamp with time zone)
    end
{%- endmacro %}

{% macro bigquery__fhir_datetime_start(column) -%}
    case
        when {{ column }} is null then null
        when length({{ column }}) = 4 then timestamp(concat({{ column }}, '-01-01'), 'UTC')
        when length({{ column }}) = 7 then timestamp(concat({{ column }}, '-01'), 'UTC')
        {#- TIMESTAMP() honours an offset in the string and defaults to UTC without one. #}
        else timestamp({{ column }})
    end
{%- endmacro %}

{#- The precision a FHIR date/dateTime string was recorded with: year, month, day or second. -#}
{% macro fhir_datetime_precision(column) -%}
    case
        when {{ column }} is null then null
        when length({{ column }}) = 4 then 'year'
        when length({{ column }}) = 7 then 'month'
        when length({{ column }}) = 10 then 'day'
        else 'second'
    end
{%- endmacro %}
