-- Carry-over: a customer left 'failed' by an earlier window of this DAG (since :since) who was sent
-- successfully by this run closes those rows too: it was sent once, for all of them.
-- The same statement on every family (its IN subquery reads the scratch table, not the target).
UPDATE {audit}
SET status = 'succeeded',
    run_id = :run_id,
    http_status = 200,
    error = NULL,
    updated_at = :now
WHERE dag_id = :dag_id
  AND status = 'failed'
  AND window_start >= :since
  AND user_key IN (
    SELECT user_key FROM {scratch}
    WHERE dag_id = :dag_id AND status = 'succeeded'
  )
