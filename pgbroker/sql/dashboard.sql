-- The web dashboard's own queries (pgbroker/dashboard/), by name. `{schema}` is
-- replaced by the quoted schema identifier; values are always bound. What
-- the operator commands already ask (queue counts, consumers, one task, dead
-- letters) comes from admin.sql through pgbroker.operations.admin.
--
-- Every statement here runs unprepared (prepare=False), so PostgreSQL plans
-- it with the values given: a filter left empty (`%(x)s IS NULL` is true)
-- drops out of the plan, and the one given picks its index
-- (016_dashboard.sql). A generic plan would keep every OR and scan.

-- name: search_tasks
-- One page of task history, newest change first, with the task id as the
-- tiebreak. Keyset paging: the next page starts after the (updated_at,
-- task_id) of the last row shown (`after_at`, `after_id`), so page 1000 is
-- as cheap as page 1. An exact name, state, queue or worker reads its
-- index of 016 in order and stops after `limit` rows; a name with a
-- wildcard (`name_like`) walks task_result_recent and filters.
SELECT task_id, name, state, worker, queue, retries, created_at, updated_at, date_done
FROM {schema}.task_result
WHERE (%(task_id)s::text IS NULL OR task_id = %(task_id)s::text)
  AND (%(name)s::text IS NULL OR name = %(name)s::text)
  AND (%(name_like)s::text IS NULL OR name LIKE %(name_like)s::text)
  AND (%(state)s::text IS NULL OR state = %(state)s::text)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(worker)s::text IS NULL OR worker = %(worker)s::text)
  AND (%(since)s::timestamptz IS NULL OR updated_at >= %(since)s::timestamptz)
  AND (%(until)s::timestamptz IS NULL OR updated_at < %(until)s::timestamptz)
  AND (%(after_at)s::timestamptz IS NULL
       OR (updated_at, task_id) < (%(after_at)s::timestamptz, %(after_id)s::text))
ORDER BY updated_at DESC, task_id DESC
LIMIT %(limit)s;

-- name: in_flight
-- Messages of tasks not finished yet (ready, reserved or delayed), newest
-- first, for the Tasks page: a task has no task_result row until a worker
-- stores its first state. The message table holds only what is in flight,
-- so this reads it whole; `limit` bounds what is shown.
SELECT id, task_id, task_name, queue, state, delivery_count, published_at, claimed_at,
       visible_at
FROM {schema}.message
WHERE task_id IS NOT NULL
  AND (%(task_id)s::text IS NULL OR task_id = %(task_id)s::text)
  AND (%(name)s::text IS NULL OR task_name = %(name)s::text)
  AND (%(name_like)s::text IS NULL OR task_name LIKE %(name_like)s::text)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: throughput
-- The last hour, a row per minute (the current one last): tasks completed,
-- and of those the failures: task_result rows whose date_done falls in the
-- minute (SUCCESS, FAILURE, REVOKED), that is results stored by pgbroker's
-- backend; and messages stored, from the samples of the message id
-- sequence that sweeps take each minute (publish_sample, 017_history.sql):
-- a minute's sample to the next one's, or to the sequence as it stands now
-- for the current minute (and the last one, until the current minute has a
-- sample). NULL where a minute has no sample: no worker swept then.
WITH minutes AS (
    SELECT generate_series(date_trunc('minute', now()) - interval '59 minutes',
                           date_trunc('minute', now()), interval '1 minute') AS minute
), done AS (
    SELECT date_trunc('minute', date_done) AS minute, count(*) AS n,
           count(*) FILTER (WHERE state = 'FAILURE') AS failed
    FROM {schema}.task_result
    WHERE date_done >= date_trunc('minute', now()) - interval '59 minutes'
    GROUP BY 1
), samples AS (
    SELECT minute, stored_total FROM {schema}.publish_sample
    WHERE minute >= date_trunc('minute', now()) - interval '59 minutes'
), live AS (
    SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence(
               pg_typeof(NULL::{schema}.message)::text, 'id')::regclass), 0) AS total
)
SELECT m.minute, coalesce(d.n, 0), coalesce(d.failed, 0),
       CASE WHEN s.minute IS NULL THEN NULL  -- (greatest() would take NULL for 0)
            WHEN n.minute IS NOT NULL THEN greatest(0, n.stored_total - s.stored_total)
            WHEN m.minute >= date_trunc('minute', now()) - interval '1 minute'
                THEN greatest(0, live.total - s.stored_total)
       END
FROM minutes m
CROSS JOIN live
LEFT JOIN done d ON d.minute = m.minute
LEFT JOIN samples s ON s.minute = m.minute
LEFT JOIN samples n ON n.minute = m.minute + interval '1 minute'
ORDER BY m.minute;

-- name: sweeper
-- The sessions holding the sweeper's and the standby's locks
-- (sweeper_sessions, 016_dashboard.sql), named pgbroker-sweeper:<host>:<pid>.
-- No row: no process runs the fast sweeper (no worker, or fast_recovery
-- off), and consumers sweep on their own.
SELECT s.role, a.application_name, a.backend_start
FROM {schema}.sweeper_sessions() s
LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = s.pid
ORDER BY s.role = 'standby';

-- name: canvas
-- The tasks around one task in its workflow: its root and everything under
-- that root, its children and the members of its group (each found by an
-- index: the primary key, task_result_root, task_result_parent,
-- task_result_group). At most `limit` rows: a huge group is cut.
SELECT task_id, name, state, parent_id, root_id, group_id, date_done
FROM {schema}.task_result
WHERE task_id = %(task_id)s::text
   OR task_id = %(root_id)s::text
   OR task_id = %(parent_id)s::text
   OR root_id = %(root_id)s::text
   OR parent_id = %(task_id)s::text
   OR group_id = %(group_id)s::text
ORDER BY created_at, task_id
LIMIT %(limit)s;

-- name: task_waits
-- A durable task's waits (durable_wait) with the event that ended each, if
-- it was sent.
SELECT w.step_index, w.kind, w.name, w.since, w.deadline, w.woken_at, e.sent_at
FROM {schema}.durable_wait w
LEFT JOIN {schema}.durable_event e ON w.kind = 'event' AND e.name = w.name
WHERE w.task_id = %(task_id)s
ORDER BY w.step_index;

-- name: task_run
-- A durable task's run, if one holds (or held) its lock; `alive`: its
-- session is still connected.
SELECT r.task_id, r.task_name, r.hostname, r.pid, r.exclusive_key, r.started_at,
       EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = r.backend_pid)
FROM {schema}.durable_run r
WHERE r.task_id = %(task_id)s;

-- name: dead_letter_reasons
-- The Dead letters page's reason filter: every reason with its count.
SELECT reason, count(*) FROM {schema}.dead_letter GROUP BY reason ORDER BY reason;

-- name: dead_letter
-- One dead letter whole, to inspect it (the list is admin.sql's).
SELECT id, died_at, reason, queue, delivery_count, exchange, routing_key, task_id,
       task_name, priority, published_at, content_type, content_encoding,
       headers::text, properties::text, body
FROM {schema}.dead_letter
WHERE id = %(id)s;

-- name: redeliveries_by_reason
-- The recovery log (redelivery, one row per message handed back) grouped
-- by reason: all time (since the last prune), the last day, the last hour.
SELECT reason, count(*),
       count(*) FILTER (WHERE at > now() - interval '1 day'),
       count(*) FILTER (WHERE at > now() - interval '1 hour'),
       max(at)
FROM {schema}.redelivery
GROUP BY reason
ORDER BY max(at) DESC;

-- name: recent_redeliveries
-- The newest redeliveries, of one reason or all (redelivery_at index).
SELECT at, reason, message_id, queue, task_id, consumer_id, delivery_count
FROM {schema}.redelivery
WHERE (%(reason)s::text IS NULL OR reason = %(reason)s::text)
ORDER BY at DESC, id DESC
LIMIT %(limit)s;

-- name: durable_runs
-- Durable tasks holding (or that held) their run lock; `alive`: the run's
-- session is still connected (a run whose worker died keeps its row until
-- the next run of that task, or pruning).
SELECT r.task_id, r.task_name, r.hostname, r.pid, r.exclusive_key, r.started_at,
       EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = r.backend_pid)
FROM {schema}.durable_run r
ORDER BY r.started_at DESC
LIMIT %(limit)s;
