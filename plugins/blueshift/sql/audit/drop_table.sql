-- Drop a scratch table once its rows are in the audit table.
DROP TABLE IF EXISTS {table}
