-- Queries of transactional enqueue (pgbroker/broker/enqueue.py).

-- name: database_fingerprint
-- What identifies "the same pgbroker schema in the same database on the same
-- server", readable by any role: the server's start time, the database's
-- oid and the schema's oid. Run on the broker's connection and on the
-- connection given to enqueue_in; messages may be written through the latter
-- only when both agree. Returned as text so that no type loader installed on
-- the caller's connection (Django's, SQLAlchemy's) changes the comparison.
SELECT concat_ws(':', extract(epoch FROM pg_postmaster_start_time()), d.oid, n.oid)
           AS fingerprint,
       n.oid IS NOT NULL AS has_schema
FROM pg_database d
LEFT JOIN pg_namespace n ON n.nspname = %(schema)s
WHERE d.datname = current_database();
