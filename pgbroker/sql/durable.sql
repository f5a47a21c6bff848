-- Every query of durable steps (pgbroker/durable/), by name. `{schema}` is
-- replaced by the quoted schema identifier; values are bound parameters.

-- name: get_step
SELECT name, state, output, content_type, content_encoding
FROM {schema}.durable_step
WHERE task_id = %(task_id)s AND step_index = %(step_index)s;

-- name: record_done
-- The checkpoint of a step that returned. A 'done' row is final: the WHERE
-- of DO UPDATE skips it (the conflicting row is locked while the condition
-- is checked), so when two runs of one task race, the first to commit wins,
-- nothing is returned to the other, and that one uses the recorded output.
-- Attempts add up over runs: a step that failed in an earlier run counts
-- those attempts too.
INSERT INTO {schema}.durable_step AS s (
    task_id, step_index, name, task_name, state, output, content_type,
    content_encoding, attempts, error)
VALUES (
    %(task_id)s, %(step_index)s, %(name)s, %(task_name)s, 'done', %(output)s,
    %(content_type)s, %(content_encoding)s, %(attempts)s, %(error)s)
ON CONFLICT (task_id, step_index) DO UPDATE SET
    name = EXCLUDED.name,
    task_name = EXCLUDED.task_name,
    state = 'done',
    output = EXCLUDED.output,
    content_type = EXCLUDED.content_type,
    content_encoding = EXCLUDED.content_encoding,
    attempts = s.attempts + EXCLUDED.attempts,
    error = coalesce(EXCLUDED.error, s.error),
    updated_at = now()
WHERE s.state <> 'done'
RETURNING s.attempts;

-- name: record_failed
-- Every attempt of a step failed in this run: say so (a later run of the
-- task runs the step again and overwrites this row). Never touches 'done'.
INSERT INTO {schema}.durable_step AS s (
    task_id, step_index, name, task_name, state, attempts, error)
VALUES (
    %(task_id)s, %(step_index)s, %(name)s, %(task_name)s, 'failed',
    %(attempts)s, %(error)s)
ON CONFLICT (task_id, step_index) DO UPDATE SET
    name = EXCLUDED.name,
    task_name = EXCLUDED.task_name,
    state = 'failed',
    attempts = s.attempts + EXCLUDED.attempts,
    error = EXCLUDED.error,
    updated_at = now()
WHERE s.state <> 'done';

-- name: finish_task
-- The task succeeded: keep its steps `keep` seconds more, for inspection
-- (and so that a crash between success and ack replays rather than re-runs).
UPDATE {schema}.durable_step
SET expires_at = now() + make_interval(secs => %(keep)s)
WHERE task_id = %(task_id)s;

-- name: delete_task
DELETE FROM {schema}.durable_step WHERE task_id = %(task_id)s;

-- name: task_steps
SELECT step_index, name, task_name, state, output, content_type,
       content_encoding, attempts, error, created_at, updated_at, expires_at
FROM {schema}.durable_step
WHERE task_id = %(task_id)s
ORDER BY step_index;

-- name: prune_expired
-- One batch of steps whose task succeeded more than `keep` seconds ago.
DELETE FROM {schema}.durable_step
WHERE (task_id, step_index) IN (
    SELECT task_id, step_index FROM {schema}.durable_step
    WHERE expires_at <= now()
    LIMIT %(batch)s);

-- name: prune_idle
-- One batch of tasks none of whose steps changed since the cutoff: failed
-- or abandoned workflows. A task with one recent step keeps all its steps.
DELETE FROM {schema}.durable_step d
USING (
    SELECT DISTINCT o.task_id FROM {schema}.durable_step o
    WHERE o.updated_at < %(cutoff)s
      AND NOT EXISTS (
          SELECT FROM {schema}.durable_step n
          WHERE n.task_id = o.task_id AND n.updated_at >= %(cutoff)s)
    LIMIT %(batch)s
) idle
WHERE d.task_id = idle.task_id;

-- --- exclusive runs (006_durable_waits) -----------------------------------------
--
-- Advisory lock keys: a bigint hash of "<schema>:task:<task id>" or
-- "<schema>:key:<exclusive key>", so that two schemas in one database never
-- share a lock. (pgbroker's other advisory locks use the two-integer form,
-- a separate key space.)

-- name: try_lock
SELECT pg_try_advisory_lock(hashtextextended(%(lock)s, 0));

-- name: lock
SELECT pg_advisory_lock(hashtextextended(%(lock)s, 0));

-- name: lock_holder
-- Who holds a lock, for the log line of a run that waits for it.
SELECT a.pid, a.application_name, r.task_id
FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
LEFT JOIN {schema}.durable_run r ON r.backend_pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended(%(lock)s, 0)
LIMIT 1;

-- name: begin_run
-- Take the task's lock if it is free and, if so, record this run as the
-- task's owner (returns a row only then). A new run_id fences the
-- checkpoints of any earlier run that lost its lock (see check_fence); the
-- conflicting row may be share-locked by such a run's open checkpoint
-- transaction, in which case this waits for it to end. The row is
-- bookkeeping, not a checkpoint: its commit need not wait for the disk (it
-- is visible to other sessions at once all the same; a server crash ends
-- every run with it), hence synchronous_commit off for this transaction.
WITH async AS (
    SELECT set_config('synchronous_commit', 'off', true)
)
INSERT INTO {schema}.durable_run AS r (
    task_id, run_id, task_name, hostname, pid, exclusive_key)
SELECT %(task_id)s, %(run_id)s, %(task_name)s, %(hostname)s, %(pid)s, NULL
FROM async
WHERE %(locked)s OR pg_try_advisory_lock(hashtextextended(%(lock)s, 0))
ON CONFLICT (task_id) DO UPDATE SET
    run_id = EXCLUDED.run_id,
    task_name = EXCLUDED.task_name,
    hostname = EXCLUDED.hostname,
    pid = EXCLUDED.pid,
    backend_pid = pg_backend_pid(),
    exclusive_key = NULL,
    started_at = now()
RETURNING 1;

-- name: end_run
-- The run is over: its row goes (unless a checkpoint transaction still
-- share-locks it: then it stays until the next run or prune) and the
-- session's locks are released. Bookkeeping: no wait for the disk (see
-- begin_run).
WITH async AS (
    SELECT set_config('synchronous_commit', 'off', true)
), gone AS (
    DELETE FROM {schema}.durable_run
    WHERE task_id = (SELECT task_id FROM {schema}.durable_run, async
                     WHERE task_id = %(task_id)s AND run_id = %(run_id)s
                     FOR UPDATE OF durable_run SKIP LOCKED)
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone), pg_advisory_unlock_all();

-- name: check_fence
-- In the transaction of a step(conn=...) checkpoint: this run still owns the
-- task. The share lock makes a new owner's begin_run wait until the
-- transaction ends, so the checkpoint either commits before the new owner
-- starts (which then replays it) or sees that it lost the task.
SELECT 1 FROM {schema}.durable_run
WHERE task_id = %(task_id)s AND run_id = %(run_id)s
FOR SHARE;

-- name: key_holder
SELECT task_id FROM {schema}.durable_run
WHERE exclusive_key = %(exclusive_key)s AND task_id <> %(task_id)s
ORDER BY started_at DESC
LIMIT 1;

-- name: set_exclusive_key
UPDATE {schema}.durable_run SET exclusive_key = %(exclusive_key)s
WHERE task_id = %(task_id)s AND run_id = %(run_id)s;

-- --- durable waits and events ----------------------------------------------------

-- name: begin_wait
-- A wait (event or sleep) reached by a run: recorded the first time (its
-- deadline counts from then), kept as is by later runs. Returns whether the
-- event is there (and its payload), whether the deadline passed, and how
-- many seconds are left, by the database's clock.
WITH wait AS (
    INSERT INTO {schema}.durable_wait AS w (
        task_id, step_index, task_name, kind, name, deadline)
    VALUES (%(task_id)s, %(step_index)s, %(task_name)s, %(kind)s, %(name)s,
            now() + make_interval(secs => %(seconds)s))
    ON CONFLICT (task_id, step_index) DO UPDATE SET
        -- The same wait (a replay): keep its start and deadline.
        kind = EXCLUDED.kind,
        name = EXCLUDED.name,
        deadline = CASE WHEN (w.kind, w.name) = (EXCLUDED.kind, EXCLUDED.name)
                        THEN w.deadline ELSE EXCLUDED.deadline END,
        since = CASE WHEN (w.kind, w.name) = (EXCLUDED.kind, EXCLUDED.name)
                     THEN w.since ELSE now() END,
        woken_at = NULL
    RETURNING deadline
)
SELECT e.name IS NOT NULL AS arrived, e.payload, e.content_type, e.content_encoding,
       wait.deadline IS NOT NULL AND wait.deadline <= now() AS due,
       extract(epoch FROM wait.deadline - now())::float8 AS seconds_left
FROM wait
LEFT JOIN {schema}.durable_event e ON %(kind)s = 'event' AND e.name = %(name)s;

-- name: end_wait
DELETE FROM {schema}.durable_wait
WHERE task_id = %(task_id)s AND step_index = %(step_index)s;

-- name: event_lock
-- send_event and a parking task serialise on the event's name (transaction
-- lock), so that one of them always sees the other (see wake_self).
SELECT pg_advisory_xact_lock(hashtextextended(%(lock)s, 0));

-- name: record_event
-- The first payload sent for a name is kept; sending it again is a no-op.
INSERT INTO {schema}.durable_event (name, payload, content_type, content_encoding)
VALUES (%(name)s, %(payload)s, %(content_type)s, %(content_encoding)s)
ON CONFLICT (name) DO NOTHING
RETURNING 1;

-- name: wake_waiters
-- The delayed messages (parked runs) of the tasks waiting on an event become
-- ready now, and their queues are NOTIFYed. Celery holds a message whose
-- `eta` header is in the future, so the header's eta is cleared (the jsonb
-- round trip cannot hold U+0000, which a json header may: then the text is
-- edited instead).
WITH waiting AS (
    UPDATE {schema}.durable_wait SET woken_at = now()
    WHERE kind = 'event' AND name = %(name)s
    RETURNING task_id
), woken AS (
    UPDATE {schema}.message m
    SET state = 'ready', visible_at = NULL,
        headers = CASE
            WHEN position('\u0000' IN m.headers::text) = 0
            THEN (m.headers::jsonb || jsonb_build_object('eta', NULL))::json
            ELSE regexp_replace(m.headers::text, '"eta": *"[^"]*"', '"eta": null')::json
        END
    WHERE m.state = 'delayed' AND m.task_id IN (SELECT task_id FROM waiting)
    RETURNING m.queue, m.task_id
)
SELECT (SELECT count(*) FROM waiting) AS waiting,
       array(SELECT task_id FROM woken) AS woken,
       (SELECT count(pg_notify(%(channel)s, q.queue))
        FROM (SELECT DISTINCT queue FROM woken) q) AS notified;

-- name: wake_self
-- A run that just parked (published its delayed message) on an event that
-- arrived meanwhile: send_event may have looked for the message before it
-- was committed, so the run wakes it itself.
WITH woken AS (
    UPDATE {schema}.message m
    SET state = 'ready', visible_at = NULL,
        headers = CASE
            WHEN position('\u0000' IN m.headers::text) = 0
            THEN (m.headers::jsonb || jsonb_build_object('eta', NULL))::json
            ELSE regexp_replace(m.headers::text, '"eta": *"[^"]*"', '"eta": null')::json
        END
    WHERE m.state = 'delayed' AND m.task_id = %(task_id)s
      AND EXISTS (SELECT 1 FROM {schema}.durable_event WHERE name = %(name)s)
    RETURNING m.queue
)
SELECT count(pg_notify(%(channel)s, q.queue)) FROM (SELECT DISTINCT queue FROM woken) q;

-- name: waits
SELECT task_id, step_index, task_name, kind, name, since, deadline, woken_at
FROM {schema}.durable_wait
ORDER BY since;

-- name: prune_events
-- Events sent before the cutoff, a batch at a time.
DELETE FROM {schema}.durable_event
WHERE name IN (SELECT name FROM {schema}.durable_event WHERE sent_at < %(cutoff)s
               LIMIT %(batch)s);

-- name: prune_idle_runs
-- Rows of runs that died without cleaning up, started before the cutoff and
-- whose lock nobody holds any more.
DELETE FROM {schema}.durable_run
WHERE task_id IN (
    SELECT r.task_id FROM {schema}.durable_run r
    WHERE r.started_at < %(cutoff)s
      AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = r.backend_pid)
    LIMIT %(batch)s);

-- name: prune_idle_waits
-- Waits of tasks that never came back (their deadline passed long ago, or
-- they started waiting before the cutoff without a deadline).
DELETE FROM {schema}.durable_wait
WHERE (task_id, step_index) IN (
    SELECT task_id, step_index FROM {schema}.durable_wait
    WHERE coalesce(deadline, since) < %(cutoff)s
    LIMIT %(batch)s);

-- name: set_lock_timeout
-- For a run waiting for its exclusive key (exclusive_timeout), or for
-- another run of its task id ('0': no limit), in the transaction that
-- takes the lock. The wait lasts as long as the other run, so a role's
-- statement_timeout must not cut it short either.
SELECT set_config('lock_timeout', %(timeout)s, true),
       set_config('statement_timeout', '0', true);
