-- One outcome into the scratch table (run with executemany: one parameter set per user).
INSERT INTO {scratch}
    (dag_id, window_start, window_end, user_key, run_id, customer_id, email, status,
     http_status, attempts, error)
VALUES
    (:dag_id, :window_start, :window_end, :user_key, :run_id, :customer_id, :email, :status,
     :http_status, :attempts, :error)
