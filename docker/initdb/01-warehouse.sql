-- The compose Postgres holds Dagster's storage (database `dagster`, created by the image)
-- and the warehouse.
CREATE DATABASE warehouse OWNER starvit;
