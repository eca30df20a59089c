-- PostgreSQL, SQLite >= 3.24, DuckDB: the scratch rows into the audit table, one row per key.
-- New key: inserted with created_at = updated_at = :now and run_attempts = attempts.
-- Existing key: updated, unless a dry run would overwrite a real outcome (the DO UPDATE's WHERE);
-- attempts add up across runs, and the same run's audit retried replaces that run's share
-- (run_attempts, 0 when NULL) instead of adding it twice. run_attempts becomes the run's attempts.
-- DO UPDATE SET's right-hand sides read the row as it was (tgt) and the inserted one (excluded).
INSERT INTO {audit} AS tgt
    (dag_id, window_start, window_end, user_key, run_id, customer_id, email, status,
     http_status, attempts, run_attempts, error, created_at, updated_at)
SELECT dag_id, window_start, window_end, user_key, run_id, customer_id, email, status,
       http_status, attempts, attempts, error, :now, :now
FROM {scratch}
-- SQLite needs a WHERE before ON CONFLICT: without one it reads ON CONFLICT as a join's ON.
WHERE 1 = 1
ON CONFLICT (dag_id, window_start, window_end, user_key) DO UPDATE SET
    run_id = excluded.run_id,
    customer_id = excluded.customer_id,
    email = excluded.email,
    status = excluded.status,
    http_status = excluded.http_status,
    attempts = CASE
        WHEN tgt.run_id = excluded.run_id
            THEN tgt.attempts - COALESCE(tgt.run_attempts, 0) + excluded.attempts
        ELSE tgt.attempts + excluded.attempts END,
    run_attempts = excluded.attempts,
    error = excluded.error,
    updated_at = excluded.updated_at
WHERE tgt.status = 'dry_run' OR excluded.status <> 'dry_run'
