-- 003_durable_steps: checkpoints of DurableTask.step() (pgbroker/durable/steps.py).
--
-- Design notes
-- * One row per (task id, step index): the n-th step() call of a task run
--   has index n (from 0). A retry or redelivery of the same task id reads
--   the row back instead of running the step again, and refuses to go on
--   when the step at that index now has another name (non-deterministic
--   task code).
-- * The output is stored encoded with the app's result serializer;
--   content_type and content_encoding say how to decode each row.
-- * A step whose attempts all failed leaves a 'failed' row (no output), so
--   "what is stuck and why" is one query; a later run overwrites it.
-- * When its task succeeds, a task's rows get expires_at (now() + keep);
--   pruning deletes them after that, and deletes the rows of tasks left
--   idle for longer than the age given to prune().

CREATE TABLE {schema}.durable_step (
    task_id           text NOT NULL,
    step_index        integer NOT NULL CHECK (step_index >= 0),
    -- The name given to step(); compared on replay.
    name              text NOT NULL,
    -- The Celery task's name, for people reading the table.
    task_name         text,
    state             text NOT NULL CHECK (state IN ('done', 'failed')),
    -- The step's return value, encoded; NULL while the state is 'failed'.
    output            bytea,
    content_type      text,
    content_encoding  text,
    -- Attempts made over every run of the task, failed ones included.
    attempts          integer NOT NULL DEFAULT 1,
    -- The last failed attempt's exception, e.g. "TimeoutError('card api')".
    error             text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    -- Set when the task succeeds; the row may be pruned after this time.
    expires_at        timestamptz,
    PRIMARY KEY (task_id, step_index)
);

-- Pruning of succeeded tasks' steps.
CREATE INDEX durable_step_expires ON {schema}.durable_step (expires_at)
    WHERE expires_at IS NOT NULL;
-- Pruning of idle tasks' steps, by age.
CREATE INDEX durable_step_updated ON {schema}.durable_step (updated_at);
