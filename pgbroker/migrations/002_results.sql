-- 002_results: the Celery result backend's tables.
--
-- Design notes
-- * One row per task in task_result, with everything Celery knows about the
--   task as columns, so results can be queried with plain SQL, e.g. the tasks
--   that failed in the last hour:
--       SELECT task_id, name, worker, traceback FROM pgbroker.task_result
--       WHERE state = 'FAILURE' AND date_done > now() - interval '1 hour';
-- * Values Celery serializes (result, args, kwargs, children, extra) are
--   stored encoded with the backend's serializer; content_type and
--   content_encoding say how to decode each row, so results written with
--   json stay readable after switching to another serializer.
-- * A SUCCESS row is final: the upsert that stores a result leaves it alone
--   (see store_result in sql/backend.sql).
-- * A chord row counts its distinct header parts; the statement whose part
--   completes the count flips fired, so the body is sent exactly once.

CREATE TABLE {schema}.task_result (
    task_id           text PRIMARY KEY,
    -- PENDING is never stored (a missing row means PENDING); RECEIVED,
    -- STARTED, RETRY, SUCCESS, FAILURE, REVOKED or a custom state.
    state             text NOT NULL,
    -- result_extended fields (NULL unless result_extended is on).
    name              text,
    args              bytea,
    kwargs            bytea,
    worker            text,
    retries           integer,
    queue             text,
    -- Canvas links.
    parent_id         text,
    root_id           text,
    group_id          text,
    -- The return value, the exception (FAILURE, RETRY, REVOKED) or the
    -- meta of a custom state, encoded.
    result            bytea,
    content_type      text NOT NULL,
    content_encoding  text NOT NULL,
    traceback         text,
    -- Encoded list of the result tuples of the subtasks this task sent.
    children          bytea,
    -- Encoded dict of any other meta (e.g. stamps), or NULL.
    extra             bytea,
    -- Set when the task reaches a ready state (SUCCESS, FAILURE, REVOKED).
    date_done         timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- "Which tasks failed in the last hour", state dashboards.
CREATE INDEX task_result_state_done ON {schema}.task_result (state, date_done);
-- Expiry (result_expires) deletes by age.
CREATE INDEX task_result_updated ON {schema}.task_result (updated_at);
CREATE INDEX task_result_group ON {schema}.task_result (group_id) WHERE group_id IS NOT NULL;

-- GroupResult.save() / restore() / delete().
CREATE TABLE {schema}.group_result (
    group_id          text PRIMARY KEY,
    -- Encoded GroupResult.as_tuple().
    result            bytea NOT NULL,
    content_type      text NOT NULL,
    content_encoding  text NOT NULL,
    date_done         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX group_result_done ON {schema}.group_result (date_done);

-- A native chord: created by apply_chord before the header is sent.
CREATE TABLE {schema}.chord (
    group_id    text PRIMARY KEY,
    -- Number of header parts; set by set_chord_size just before the last
    -- header task is sent, so NULL means "not known yet, never complete".
    size        integer,
    -- Parts added by Task.add_to_chord.
    extra       integer NOT NULL DEFAULT 0,
    -- Distinct parts recorded so far.
    done        integer NOT NULL DEFAULT 0,
    fired       boolean NOT NULL DEFAULT false,
    -- Encoded GroupResult tuple when the header holds groups (joined
    -- natively when the chord completes), else NULL.
    header      bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX chord_updated ON {schema}.chord (updated_at);

-- One row per distinct header part: (task id, index in the header), so a
-- redelivered header task is counted once.
CREATE TABLE {schema}.chord_part (
    group_id          text NOT NULL REFERENCES {schema}.chord ON DELETE CASCADE,
    task_id           text NOT NULL,
    position          integer NOT NULL,
    state             text NOT NULL,
    result            bytea,
    content_type      text NOT NULL,
    content_encoding  text NOT NULL,
    PRIMARY KEY (group_id, position, task_id)
);
