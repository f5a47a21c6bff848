-- 008_operations: views for monitoring (docs/operations.md).
--
-- Design notes
-- * Views, not tables: they compute what `pgbroker status` shows at the
--   moment they are read, from the tables the broker already keeps. Point
--   Grafana's PostgreSQL data source (or any SQL client) at them; the
--   Prometheus exporter (`pgbroker metrics`) reads the same views, so a
--   dashboard and an alert never disagree.
-- * Nothing here is written by the hot path: reading a view costs one scan
--   of the message table per read (it holds only the backlog, since acked
--   messages are deleted), so scrape every 15 s or more, not in a loop.
-- * The schema's oid (the advisory lock class of consumers) and the tables'
--   sequences are found from the tables' own types (pg_typeof), so no schema
--   name is written into the views as a string.
-- * A later migration that drops or changes a column these views read must
--   drop and re-create them.

-- One row per queue: declared queues, plus any name that still has messages
-- or dead letters (NULL: dead letters that never reached a queue). The same
-- figures as `pgbroker status`.
CREATE VIEW {schema}.queue_stats AS
WITH counts AS (
    SELECT queue,
           count(*) FILTER (WHERE state = 'ready') AS ready,
           count(*) FILTER (WHERE state = 'reserved') AS reserved,
           count(*) FILTER (WHERE state = 'delayed') AS delayed,
           min(published_at) FILTER (WHERE state = 'ready') AS oldest_ready_at
    FROM {schema}.message
    GROUP BY queue
), dead AS (
    SELECT queue, count(*) AS dead FROM {schema}.dead_letter GROUP BY queue
), attached AS (
    SELECT queue, count(*) AS consumers FROM {schema}.consumer_queue GROUP BY queue
), names AS (
    SELECT name FROM {schema}.queue
    UNION SELECT queue FROM counts
    UNION SELECT queue FROM dead
)
SELECT n.name AS queue,
       coalesce(c.ready, 0) AS ready,
       coalesce(c.reserved, 0) AS reserved,
       coalesce(c.delayed, 0) AS delayed,
       coalesce(d.dead, 0) AS dead_letters,
       -- The queue's latency: how long the message next in line has waited.
       extract(epoch FROM now() - c.oldest_ready_at)::float8 AS oldest_ready_age,
       coalesce(a.consumers, 0) AS consumers,
       q.name IS NOT NULL AS declared
FROM names n
LEFT JOIN counts c ON c.queue = n.name
LEFT JOIN dead d ON d.queue IS NOT DISTINCT FROM n.name
LEFT JOIN attached a ON a.queue = n.name
LEFT JOIN {schema}.queue q ON q.name = n.name;

-- One row: consumers, and counters that only grow. The *_total columns are
-- the last values of the tables' id sequences, so they count every message
-- stored, dead-lettered or redelivered since the schema was created, and
-- pruning the redelivery log or dropping dead letters does not lower them
-- (rate() over them in Prometheus gives throughput). messages_removed_total
-- counts messages that left the message table for any reason: acked (by far
-- the most), purged, expired, rejected or deleted with their queue.
CREATE VIEW {schema}.broker_stats AS
WITH ns AS (
    SELECT typnamespace AS oid FROM pg_type
    WHERE oid = pg_typeof(NULL::{schema}.consumer)::oid
), alive AS (
    -- A consumer is alive while its session holds the advisory lock
    -- (schema oid, consumer id), as the transport's sweep checks.
    SELECT c.id, EXISTS (
        SELECT 1 FROM pg_locks l
        WHERE l.locktype = 'advisory'
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid = (SELECT oid FROM ns)
          AND l.objid = c.id::oid AND l.objsubid = 2 AND l.granted) AS alive
    FROM {schema}.consumer c
), present AS (
    SELECT count(*) AS n FROM {schema}.message
), stored AS (
    SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence(
               pg_typeof(NULL::{schema}.message)::text, 'id')::regclass), 0) AS n
)
SELECT (SELECT count(*) FROM alive WHERE alive) AS consumers_alive,
       (SELECT count(*) FROM alive WHERE NOT alive) AS consumers_dead,
       (SELECT n FROM present) AS messages_present,
       (SELECT n FROM stored) AS messages_stored_total,
       (SELECT n FROM stored) - (SELECT n FROM present) AS messages_removed_total,
       coalesce(pg_sequence_last_value(pg_get_serial_sequence(
           pg_typeof(NULL::{schema}.dead_letter)::text, 'id')::regclass), 0)
           AS dead_lettered_total,
       coalesce(pg_sequence_last_value(pg_get_serial_sequence(
           pg_typeof(NULL::{schema}.redelivery)::text, 'id')::regclass), 0)
           AS redeliveries_total,
       (SELECT count(*) FROM {schema}.dead_letter) AS dead_letters,
       (SELECT count(*) FROM {schema}.redelivery WHERE at > now() - interval '1 hour')
           AS redeliveries_last_hour;

-- Results completed (task_result.date_done) per state over the last minute,
-- five minutes and hour: the result backend's throughput, by outcome.
CREATE VIEW {schema}.result_stats AS
SELECT state,
       count(*) FILTER (WHERE date_done > now() - interval '1 minute') AS last_minute,
       count(*) FILTER (WHERE date_done > now() - interval '5 minutes') AS last_5_minutes,
       count(*) AS last_hour
FROM {schema}.task_result
WHERE date_done > now() - interval '1 hour'
GROUP BY state;

-- Disk used by each of the schema's tables, indexes and TOAST included:
-- what retention (`pgbroker prune`) and autovacuum keep bounded.
CREATE VIEW {schema}.table_sizes AS
SELECT c.relname::text AS "table",
       pg_total_relation_size(c.oid) AS total_bytes,
       pg_relation_size(c.oid) AS table_bytes,
       pg_indexes_size(c.oid) AS index_bytes,
       s.n_live_tup AS live_rows,
       s.n_dead_tup AS dead_rows,
       greatest(s.last_vacuum, s.last_autovacuum) AS last_vacuum
FROM pg_class c
LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid
WHERE c.relkind = 'r'
  AND c.relnamespace = (SELECT typnamespace FROM pg_type
                        WHERE oid = pg_typeof(NULL::{schema}.message)::oid);
