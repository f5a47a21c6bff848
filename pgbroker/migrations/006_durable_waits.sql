-- 006_durable_waits: exclusive runs, durable waits and events of DurableTask
-- (pgbroker/durable/runs.py, pgbroker/durable/waits.py).
--
-- Design notes
-- * A run of a durable task holds a session advisory lock keyed on its task
--   id, on a connection of its own, for as long as it runs: a second run of
--   the same id waits for the first to end. durable_run has one row per
--   task id that is running (or whose run died without cleaning up), with a
--   random run_id that a new run replaces when it takes the lock: a
--   checkpoint written on another connection (step(conn=...)) share-locks
--   the row and commits only while it still holds its own run's run_id, so
--   a run that lost its lock cannot record steps behind the new owner's back.
-- * A task waiting for an event or a timer does not hold a worker: it
--   records its wait in durable_wait and ends its run with a Celery retry
--   whose ETA is the deadline (a delayed message). send_event() records the
--   event in durable_event and, in the same transaction, makes the delayed
--   messages of the tasks waiting on it ready and NOTIFYs their queues.
-- * An event is kept by name: a task that starts waiting after the event
--   was sent gets it at once. The first payload sent for a name is kept.

CREATE TABLE {schema}.durable_run (
    task_id        text PRIMARY KEY,
    -- Replaced by every run that takes the task's lock (the fencing token).
    run_id         uuid NOT NULL,
    task_name      text,
    -- Where the run is: the worker's host name and process id, and the
    -- PostgreSQL session holding the task's advisory lock.
    hostname       text,
    pid            integer,
    backend_pid    integer NOT NULL DEFAULT pg_backend_pid(),
    -- The run's exclusive key (exclusive_key=...), if the task has one.
    exclusive_key  text,
    started_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX durable_run_exclusive_key ON {schema}.durable_run (exclusive_key)
    WHERE exclusive_key IS NOT NULL;
CREATE INDEX durable_run_started ON {schema}.durable_run (started_at);

CREATE TABLE {schema}.durable_wait (
    task_id     text NOT NULL,
    -- The index of the wait among the task's steps.
    step_index  integer NOT NULL CHECK (step_index >= 0),
    task_name   text,
    kind        text NOT NULL CHECK (kind IN ('event', 'sleep')),
    -- The event waited for (kind 'event'), or the sleep's name.
    name        text NOT NULL,
    since       timestamptz NOT NULL DEFAULT now(),
    -- When the wait times out (or the sleep ends); NULL: never.
    deadline    timestamptz,
    -- Set by send_event when it made the task's message ready.
    woken_at    timestamptz,
    PRIMARY KEY (task_id, step_index)
);
-- send_event: the tasks waiting on one event.
CREATE INDEX durable_wait_event ON {schema}.durable_wait (name) WHERE kind = 'event';

CREATE TABLE {schema}.durable_event (
    name              text PRIMARY KEY,
    -- The payload, encoded like step outputs.
    payload           bytea,
    content_type      text NOT NULL,
    content_encoding  text NOT NULL,
    sent_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX durable_event_sent ON {schema}.durable_event (sent_at);

-- send_event finds the delayed messages of the waiting tasks by task id.
CREATE INDEX message_delayed_task ON {schema}.message (task_id)
    WHERE state = 'delayed' AND task_id IS NOT NULL;
