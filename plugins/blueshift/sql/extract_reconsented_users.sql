-- Re-consented users of one window, consented_at in UTC, window_start <= consented_at < window_end.
-- Point BLUESHIFT_EXTRACT_SQL at your own copy to read a view or another table. It must return the
-- columns customer_id and email (either may be NULL) and filter with the two bound parameters
-- below; never format values into the text.
SELECT customer_id, email
FROM reconsented_users
WHERE consented_at >= :window_start
  AND consented_at < :window_end
