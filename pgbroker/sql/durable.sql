-- Every query of durable steps (pgbroker/durable.py), by name. `{schema}` is
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
