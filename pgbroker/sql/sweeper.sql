-- The sweeper's query (pgbroker/broker/sweeper.py). `{schema}` is replaced by the
-- quoted schema identifier; values are always bound parameters. The sweep
-- itself is `sweep` in queries.sql.

-- name: wait
-- One wait of up to wait_seconds, or none; see 007_sweeper.sql. It also
-- sets up the session (timeouts, application_name), so that the thread
-- sends nothing else.
CALL {schema}.sweeper_wait(
    %(wait_seconds)s::float8, %(poll_seconds)s::float8, %(known)s::integer[],
    %(own_host)s::text, %(own_pid)s::integer, %(session_name)s::text,
    NULL, NULL, NULL, NULL, NULL, NULL);
