-- A run's outcomes, batch-loaded before the one upsert into the audit table: the audit's columns
-- less created_at and updated_at, which the upsert sets. Same types as the audit table.
{create} {scratch} (
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
    error         {text}{primary_key}
)
