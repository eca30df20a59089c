-- Snowflake, BigQuery, Redshift, Databricks, SQL Server: the scratch rows into the audit table,
-- one row per key (the MERGE keeps it unique where no primary key is enforced).
-- New key: inserted with created_at = updated_at = :now and run_attempts = attempts.
-- Existing key: every column keeps its value when a dry run would overwrite a real outcome
-- (src.status = 'dry_run' AND tgt.status <> 'dry_run'); attempts add up across runs, and the same
-- run's audit retried replaces that run's share (run_attempts, 0 when NULL) instead of adding it
-- twice. run_attempts becomes the run's attempts.
-- The conditions are CASEs inside SET, never WHEN MATCHED AND ...: Redshift has no such clause.
-- SET's right-hand sides all read the row as it was, so the order of the assignments is free.
-- {terminator} is the ";" that SQL Server requires after a MERGE, empty elsewhere.
MERGE INTO {audit} AS tgt
USING {scratch} AS src
ON tgt.dag_id = src.dag_id
   AND tgt.window_start = src.window_start
   AND tgt.window_end = src.window_end
   AND tgt.user_key = src.user_key
WHEN MATCHED THEN UPDATE SET
    run_id = CASE
        WHEN src.status = 'dry_run' AND tgt.status <> 'dry_run' THEN tgt.run_id
        ELSE src.run_id END,
    customer_id = CASE
        WHEN src.status = 'dry_run' AND tgt.status <> 'dry_run' THEN tgt.customer_id
        ELSE src.customer_id END,
    email = CASE
        WHEN src.status = 'dry_run' AND tgt.status <> 'dry_run' THEN tgt.email
        ELSE src.email END,
    status = CASE
        WHEN src.status = 'dry_run' AND tgt.status <> 'dry_run' THEN tgt.status
        ELSE src.status END,
    http_status = CASE
        WHEN src.status = 'dry_run' AND tgt.status <> 'dry_run' THEN tgt.http_status
        ELSE src.http_status END,
    attempts = CASE
        WHEN src.status = 'dry_run' AND tgt.status <> 'dry_run' THEN tgt.attempts
        WHEN tgt.run_id = src.run_id THEN tgt.attempts - COALESCE(tgt.run_attempts, 0) + src.attempts
        ELSE tgt.attempts + src.attempts END,
    run_attempts = CASE
        WHEN src.status = 'dry_run' AND tgt.status <> 'dry_run' THEN tgt.run_attempts
        ELSE src.attempts END,
    error = CASE
        WHEN src.status = 'dry_run' AND tgt.status <> 'dry_run' THEN tgt.error
        ELSE src.error END,
    updated_at = CASE
        WHEN src.status = 'dry_run' AND tgt.status <> 'dry_run' THEN tgt.updated_at
        ELSE :now END
WHEN NOT MATCHED THEN INSERT
    (dag_id, window_start, window_end, user_key, run_id, customer_id, email, status,
     http_status, attempts, run_attempts, error, created_at, updated_at)
VALUES
    (src.dag_id, src.window_start, src.window_end, src.user_key, src.run_id, src.customer_id,
     src.email, src.status, src.http_status, src.attempts, src.attempts, src.error, :now, :now){terminator}
