-- The audit table: exactly one row per (dag_id, window_start, window_end, user_key).
-- {create} is "CREATE TABLE IF NOT EXISTS" (or SQL Server's IF OBJECT_ID(...) IS NULL CREATE TABLE);
-- {primary_key} is the PRIMARY KEY clause on engines that enforce one, empty on the others (there
-- the upsert's MERGE keeps the key unique).
-- attempts counts every run's sends for the key; run_attempts is the share of the run that last
-- wrote the row (its run_id), so a retry of that run's audit replaces that share and no other.
-- run_attempts is nullable: an audit table of an older version gets it by ALTER TABLE (see
-- dialects.add_column_hint), and the rows written before read NULL.
{create} {audit} (
    dag_id        {name}    NOT NULL,
    window_start  {ts}      NOT NULL,
    window_end    {ts}      NOT NULL,
    user_key      {hash}    NOT NULL,
    run_id        {name}    NOT NULL,
    customer_id   {text},
    email         {text},
    status        {status}  NOT NULL,
    http_status   {int},
    attempts      {int}     NOT NULL,
    run_attempts  {int},
    error         {text},
    created_at    {ts}      NOT NULL,
    updated_at    {ts}      NOT NULL{primary_key}
)
