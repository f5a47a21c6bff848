-- The operator commands' queries (pgbroker.operations.admin), by name. `{schema}` is
-- replaced by the quoted schema identifier; values are always bound.

-- name: queue_stats
-- One row per queue: declared queues, plus any name that still has messages
-- or dead letters (NULL: dead letters that never reached a queue). The
-- queue_stats view (008_operations.sql) computes them, for Grafana and
-- `pgbroker metrics` too.
SELECT queue, ready, reserved, delayed, dead_letters, oldest_ready_age, consumers, declared
FROM {schema}.queue_stats
ORDER BY queue NULLS LAST;

-- name: consumers
-- A consumer is alive while its session holds the advisory lock (schema
-- oid, consumer id), as the transport's sweep checks (consumer_alive,
-- 014_shared_predicates.sql); a row whose lock is free belongs to a dead
-- session the next sweep removes.
SELECT c.id, c.hostname, c.pid, c.backend_pid, c.started_at, a.alive,
       coalesce(array_agg(cq.queue ORDER BY cq.queue) FILTER (WHERE cq.queue IS NOT NULL),
                '{{}}') AS queues,
       (SELECT count(*) FROM {schema}.message m
        WHERE m.state = 'reserved' AND m.consumer_id = c.id) AS reserved
FROM {schema}.consumer c
-- (The schema oid joined, not a sub-select argument: see consumer_alive.)
CROSS JOIN (SELECT t.typnamespace AS oid FROM pg_type t
            WHERE t.oid = pg_typeof(NULL::{schema}.consumer)::oid) ns
CROSS JOIN LATERAL {schema}.consumer_alive(ns.oid, c.id) a
LEFT JOIN {schema}.consumer_queue cq ON cq.consumer_id = c.id
GROUP BY c.id, a.alive
ORDER BY c.id;

-- name: broker_activity
-- What the broker records about the past: redeliveries and dead letters
-- are logged with a time; acked messages are deleted and leave no trace
-- except the message id sequence, which counts every message ever stored.
SELECT (SELECT count(*) FROM {schema}.redelivery WHERE at > now() - interval '1 hour'),
       (SELECT coalesce(jsonb_object_agg(reason, n), '{{}}')
        FROM (SELECT reason, count(*) AS n FROM {schema}.redelivery
              WHERE at > now() - interval '1 hour' GROUP BY reason) r),
       (SELECT count(*) FROM {schema}.dead_letter WHERE died_at > now() - interval '1 hour'),
       pg_sequence_last_value(
           pg_get_serial_sequence(format('%%I.message', %(schema)s::text), 'id')::regclass),
       (SELECT count(*) FROM {schema}.message);

-- name: result_tables_exist
SELECT to_regclass(format('%%I.task_result', %(schema)s::text)) IS NOT NULL;

-- name: result_activity
-- Results stored with a completion time (SUCCESS, FAILURE, REVOKED), per
-- state, over the last minute, five minutes and hour.
SELECT state,
       count(*) FILTER (WHERE date_done > now() - interval '1 minute'),
       count(*) FILTER (WHERE date_done > now() - interval '5 minutes'),
       count(*)
FROM {schema}.task_result
WHERE date_done > now() - interval '1 hour'
GROUP BY state
ORDER BY state;

-- name: queue_declared
SELECT EXISTS (SELECT 1 FROM {schema}.queue WHERE name = %(queue)s);

-- name: count_ready
SELECT count(*) FROM {schema}.message WHERE queue = %(queue)s AND state = 'ready';

-- name: purge_ready
-- Ready messages only: a reserved message belongs to a consumer that is
-- working on it, a delayed one is not due yet.
DELETE FROM {schema}.message WHERE queue = %(queue)s AND state = 'ready';

-- name: list_dead_letters
-- Newest first; `total` counts every match, not just the page.
SELECT id, died_at, reason, queue, delivery_count, exchange, routing_key, task_id,
       task_name, priority, published_at, octet_length(body), count(*) OVER ()
FROM {schema}.dead_letter
WHERE (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(reason)s::text IS NULL OR reason = %(reason)s)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: count_dead_letters
SELECT count(*) FROM {schema}.dead_letter
WHERE (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
  AND (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(reason)s::text IS NULL OR reason = %(reason)s);

-- name: select_dead_letters
-- The next batch of dead letters to act on, in id order (keyset paging, so
-- rows kept back by an earlier batch are not read again).
SELECT id FROM {schema}.dead_letter
WHERE id > %(after)s
  AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
  AND (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(reason)s::text IS NULL OR reason = %(reason)s)
ORDER BY id
LIMIT %(limit)s;

-- name: replay_dead_letters
-- Move dead letters back into the message table, in one statement so each
-- one is either back on its queue or still dead-lettered, never both:
-- 1. target: a dead letter with a queue goes back to that queue if it is
--    still declared; one without (unroutable at publish time) is routed
--    again by its exchange and routing key, as publish does;
-- 2. moved: the dead letters that have a target are deleted (a concurrent
--    replay of the same row finds it gone and moves nothing);
-- 3. stored: each is inserted as a new ready message with its body, headers,
--    properties and priority unchanged, delivery count reset, TTL counted
--    from now, in dead-letter order;
-- 4. consumers of each queue are woken by NOTIFY (sent at commit).
WITH picked AS (
    SELECT * FROM {schema}.dead_letter WHERE id = ANY(%(ids)s::bigint[])
), target AS (
    SELECT p.id, q.name AS queue, q.message_ttl
    FROM picked p JOIN {schema}.queue q ON q.name = p.queue
    UNION
    SELECT p.id, q.name, q.message_ttl
    FROM picked p JOIN {schema}.queue q ON q.name = p.routing_key
    WHERE p.queue IS NULL AND p.exchange = ''
    UNION
    SELECT p.id, q.name, q.message_ttl
    FROM picked p
    JOIN {schema}.binding b ON b.exchange = p.exchange
    JOIN {schema}.exchange e ON e.name = b.exchange
    JOIN {schema}.queue q ON q.name = b.queue
    WHERE p.queue IS NULL AND p.exchange <> ''
      AND (e.type = 'fanout'
           OR (e.type = 'direct' AND b.routing_key = p.routing_key)
           OR (e.type = 'topic' AND ('.' || p.routing_key) ~ b.pattern))
), moved AS (
    DELETE FROM {schema}.dead_letter d
    WHERE d.id IN (SELECT id FROM target)
    RETURNING d.*
), stored AS (
    INSERT INTO {schema}.message (
        queue, priority, expires_at, exchange, routing_key, task_id, task_name,
        content_type, content_encoding, headers, properties, body)
    SELECT t.queue, least(greatest(m.priority, 0), 9),
           now() + least(
               CASE WHEN m.properties->>'expiration' ~ '^[0-9]+(\.[0-9]*)?$'
                    THEN make_interval(secs => (m.properties->>'expiration')::float8 / 1000)
               END,
               t.message_ttl),
           m.exchange, m.routing_key, m.task_id, m.task_name,
           m.content_type, m.content_encoding, m.headers, m.properties, m.body
    FROM moved m JOIN target t ON t.id = m.id
    ORDER BY m.id, t.queue
    RETURNING queue
), per_queue AS (
    SELECT queue, count(*) AS n FROM stored GROUP BY queue
)
SELECT (SELECT count(*) FROM moved) AS replayed,
       (SELECT coalesce(jsonb_object_agg(queue, n), '{{}}') FROM per_queue) AS per_queue,
       (SELECT count(pg_notify(%(channel)s, queue)) FROM per_queue) AS notified;

-- name: dead_letters_left
-- Those of `ids` still dead-lettered after a replay: no queue to go to.
SELECT id, queue, exchange, routing_key FROM {schema}.dead_letter
WHERE id = ANY(%(ids)s::bigint[])
ORDER BY id;

-- name: drop_dead_letters
DELETE FROM {schema}.dead_letter WHERE id = ANY(%(ids)s::bigint[]);

-- name: list_tasks
-- Newest change first; `total` counts every match, not just the page.
SELECT task_id, name, state, worker, queue, retries, created_at, updated_at, date_done,
       count(*) OVER ()
FROM {schema}.task_result
WHERE (%(name)s::text IS NULL OR name LIKE %(name)s)
  AND (%(state)s::text IS NULL OR state = %(state)s)
  AND (%(since)s::interval IS NULL OR updated_at >= now() - %(since)s::interval)
ORDER BY updated_at DESC, task_id
LIMIT %(limit)s;

-- name: task_result
SELECT task_id, state, name, worker, queue, retries, parent_id, root_id, group_id,
       result, content_type, content_encoding, traceback, args, kwargs, children, extra,
       date_done, created_at, updated_at, received_at, started_at, retry_log
FROM {schema}.task_result
WHERE task_id = %(task_id)s;

-- name: task_messages
-- (No index on message.task_id: this scans the table, fine for one
-- operator lookup.)
SELECT id, queue, state, priority, delivery_count, consumer_id, published_at, claimed_at,
       visible_at, expires_at, exchange, routing_key, headers
FROM {schema}.message
WHERE task_id = %(task_id)s
ORDER BY id;

-- name: task_dead_letters
SELECT id, reason, died_at, queue, delivery_count, exchange, routing_key, published_at
FROM {schema}.dead_letter
WHERE task_id = %(task_id)s
ORDER BY id;

-- name: task_redeliveries
SELECT at, reason, message_id, queue, consumer_id, delivery_count
FROM {schema}.redelivery
WHERE task_id = %(task_id)s
ORDER BY at, id;

-- name: metrics
-- Everything `pgbroker metrics` exports, in one statement over the views of
-- migration 008 (the ones Grafana reads too): per-queue rows, the broker's
-- counters, results completed per state, table sizes.
SELECT (SELECT coalesce(json_agg(q), '[]') FROM {schema}.queue_stats q),
       (SELECT row_to_json(b) FROM {schema}.broker_stats b),
       (SELECT coalesce(json_agg(r), '[]') FROM {schema}.result_stats r),
       (SELECT coalesce(json_agg(t), '[]') FROM {schema}.table_sizes t);

-- name: cutoff
-- The server's clock decides what is old, not the client's.
SELECT now() - %(age)s::interval;

-- The retention queries (pgbroker.operations.retention): for each kind of record, a
-- count for --dry-run and a delete of one batch, oldest first, so a large
-- backlog is removed in short transactions that never hold long locks.

-- name: count_redeliveries
SELECT count(*) FROM {schema}.redelivery WHERE at < %(cutoff)s;

-- name: prune_redeliveries
DELETE FROM {schema}.redelivery WHERE id IN (
    SELECT id FROM {schema}.redelivery WHERE at < %(cutoff)s ORDER BY at LIMIT %(batch)s);

-- name: count_old_dead_letters
SELECT count(*) FROM {schema}.dead_letter WHERE died_at < %(cutoff)s;

-- name: prune_dead_letters
DELETE FROM {schema}.dead_letter WHERE id IN (
    SELECT id FROM {schema}.dead_letter WHERE died_at < %(cutoff)s ORDER BY died_at
    LIMIT %(batch)s);

-- name: count_results
SELECT count(*) FROM {schema}.task_result WHERE updated_at < %(cutoff)s;

-- name: count_groups
SELECT count(*) FROM {schema}.group_result WHERE date_done < %(cutoff)s;

-- name: count_chords
SELECT count(*) FROM {schema}.chord WHERE updated_at < %(cutoff)s;

-- name: count_durable_expired
-- Steps of succeeded tasks whose keep time has passed (durable.sql
-- prune_expired deletes them).
SELECT count(*) FROM {schema}.durable_step WHERE expires_at <= now();

-- name: count_durable_idle
-- Steps of tasks none of whose steps changed since the cutoff (durable.sql
-- prune_idle deletes them).
-- Rows counted above are left out: they go first.
SELECT count(*) FROM {schema}.durable_step o
WHERE (o.expires_at IS NULL OR o.expires_at > now())
  AND NOT EXISTS (
    SELECT FROM {schema}.durable_step n
    WHERE n.task_id = o.task_id AND n.updated_at >= %(cutoff)s);

-- name: count_durable_events
-- Events sent before the cutoff (durable.sql prune_events, 006).
SELECT count(*) FROM {schema}.durable_event WHERE sent_at < %(cutoff)s;

-- name: count_durable_waits
-- Waits whose deadline, or start without one, is before the cutoff
-- (durable.sql prune_idle_waits, 006).
SELECT count(*) FROM {schema}.durable_wait WHERE coalesce(deadline, since) < %(cutoff)s;

-- name: count_durable_runs
-- Runs started before the cutoff whose session is gone (durable.sql
-- prune_idle_runs, 006).
SELECT count(*) FROM {schema}.durable_run r
WHERE r.started_at < %(cutoff)s
  AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = r.backend_pid);
