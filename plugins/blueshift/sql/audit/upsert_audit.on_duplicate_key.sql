-- MySQL, MariaDB: the scratch rows into the audit table, one row per key (its primary key).
-- New key: inserted with created_at = updated_at = :now and run_attempts = attempts.
-- Existing key: every assignment keeps the old value when a dry run would overwrite a real outcome
-- (VALUES(status) = 'dry_run' AND status <> 'dry_run'); attempts add up across runs, and the same
-- run's audit retried replaces that run's share (run_attempts, 0 when NULL) instead of adding it
-- twice. run_attempts becomes the run's attempts.
--
-- The assignments apply left to right, and an assignment that reads a column sees the value an
-- earlier assignment gave it. So a column is assigned only after every assignment that reads it:
-- attempts (reads status, run_id and run_attempts) first, run_attempts (reads status) second,
-- run_id (reads status) next to last, status last.
-- Target columns are qualified with the table's name: unqualified, they would be ambiguous with
-- the scratch table's columns of the same names.
INSERT INTO {audit}
    (dag_id, window_start, window_end, user_key, run_id, customer_id, email, status,
     http_status, attempts, run_attempts, error, created_at, updated_at)
SELECT dag_id, window_start, window_end, user_key, run_id, customer_id, email, status,
       http_status, attempts, attempts, error, :now, :now
FROM {scratch}
ON DUPLICATE KEY UPDATE
    attempts = CASE
        WHEN VALUES(status) = 'dry_run' AND {audit}.status <> 'dry_run' THEN {audit}.attempts
        WHEN {audit}.run_id = VALUES(run_id)
            THEN {audit}.attempts - COALESCE({audit}.run_attempts, 0) + VALUES(attempts)
        ELSE {audit}.attempts + VALUES(attempts) END,
    run_attempts = CASE
        WHEN VALUES(status) = 'dry_run' AND {audit}.status <> 'dry_run' THEN {audit}.run_attempts
        ELSE VALUES(attempts) END,
    customer_id = CASE
        WHEN VALUES(status) = 'dry_run' AND {audit}.status <> 'dry_run' THEN {audit}.customer_id
        ELSE VALUES(customer_id) END,
    email = CASE
        WHEN VALUES(status) = 'dry_run' AND {audit}.status <> 'dry_run' THEN {audit}.email
        ELSE VALUES(email) END,
    http_status = CASE
        WHEN VALUES(status) = 'dry_run' AND {audit}.status <> 'dry_run' THEN {audit}.http_status
        ELSE VALUES(http_status) END,
    error = CASE
        WHEN VALUES(status) = 'dry_run' AND {audit}.status <> 'dry_run' THEN {audit}.error
        ELSE VALUES(error) END,
    updated_at = CASE
        WHEN VALUES(status) = 'dry_run' AND {audit}.status <> 'dry_run' THEN {audit}.updated_at
        ELSE VALUES(updated_at) END,
    run_id = CASE
        WHEN VALUES(status) = 'dry_run' AND {audit}.status <> 'dry_run' THEN {audit}.run_id
        ELSE VALUES(run_id) END,
    status = CASE
        WHEN VALUES(status) = 'dry_run' AND {audit}.status <> 'dry_run' THEN {audit}.status
        ELSE VALUES(status) END
