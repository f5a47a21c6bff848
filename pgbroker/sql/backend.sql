
-- Every query the result backend runs, by name. `{schema}` is replaced by the
-- quoted schema identifier; values are always bound parameters.

-- name: store_result
-- Upsert a task's state and wake its waiters. A SUCCESS row is final: the
-- WHERE of DO UPDATE skips it atomically (the conflicting row is locked
-- while the condition is checked), so a late duplicate execution changes
-- nothing and notifies nobody. Extended fields a later write does not know
-- (e.g. REVOKED stored by a client) keep their earlier values.
--
-- The notification carries the stored row (the payload of get_results_json)
-- when it fits in a NOTIFY payload (under 8000 bytes with the default
-- block size), so a waiting get() needs no query to read it; a larger row
-- is announced as [task_id, state] and read by the waiter. NOTIFY is
-- delivered at commit, so the row is durable before anyone hears of it.
WITH stored AS (
    INSERT INTO {schema}.task_result AS r (
        task_id, state, name, args, kwargs, worker, retries, queue,
        parent_id, root_id, group_id, result, content_type, content_encoding,
        traceback, children, extra, date_done, received_at, started_at, retry_log,
        expires_at)
    VALUES (
        %(task_id)s, %(state)s, %(name)s, %(args)s, %(kwargs)s, %(worker)s,
        %(retries)s, %(queue)s, %(parent_id)s, %(root_id)s, %(group_id)s,
        %(result)s, %(content_type)s, %(content_encoding)s, %(traceback)s,
        %(children)s, %(extra)s, %(date_done)s, %(received_at)s, %(started_at)s,
        -- This retry, to append to the log (017_history.sql; times as Unix
        -- seconds).
        CASE WHEN %(state)s::text = 'RETRY' THEN jsonb_build_array(jsonb_build_object(
            'at', extract(epoch FROM now()), 'reason', %(retry_reason)s::text,
            'received_at', extract(epoch FROM %(received_at)s::timestamptz),
            'started_at', extract(epoch FROM %(started_at)s::timestamptz)))
        END,
        -- result_expires (NULL: kept until pruned).
        now() + make_interval(secs => %(expires)s))
    ON CONFLICT (task_id) DO UPDATE SET
        state = EXCLUDED.state,
        name = coalesce(EXCLUDED.name, r.name),
        args = coalesce(EXCLUDED.args, r.args),
        kwargs = coalesce(EXCLUDED.kwargs, r.kwargs),
        worker = coalesce(EXCLUDED.worker, r.worker),
        retries = coalesce(EXCLUDED.retries, r.retries),
        queue = coalesce(EXCLUDED.queue, r.queue),
        parent_id = coalesce(EXCLUDED.parent_id, r.parent_id),
        root_id = coalesce(EXCLUDED.root_id, r.root_id),
        group_id = coalesce(EXCLUDED.group_id, r.group_id),
        result = EXCLUDED.result,
        content_type = EXCLUDED.content_type,
        content_encoding = EXCLUDED.content_encoding,
        traceback = EXCLUDED.traceback,
        children = coalesce(EXCLUDED.children, r.children),
        extra = coalesce(EXCLUDED.extra, r.extra),
        date_done = EXCLUDED.date_done,
        -- Of the run that stored this state (017_history.sql).
        received_at = coalesce(EXCLUDED.received_at, r.received_at),
        started_at = coalesce(EXCLUDED.started_at, r.started_at),
        retry_log = CASE
            WHEN EXCLUDED.retry_log IS NULL THEN r.retry_log
            WHEN jsonb_array_length(coalesce(r.retry_log, '[]')) >= 50
                THEN (r.retry_log - 0) || EXCLUDED.retry_log
            ELSE coalesce(r.retry_log, '[]') || EXCLUDED.retry_log
        END,
        updated_at = now(),
        expires_at = EXCLUDED.expires_at
    -- (An expired row is gone for readers: a new run may write it again.)
    WHERE r.state <> 'SUCCESS' OR r.expires_at <= now()
    RETURNING r.task_id, r.state,
        -- Only rows that can fit are encoded (base64 grows them by 4/3).
        CASE WHEN coalesce(octet_length(r.result), 0) + coalesce(octet_length(r.args), 0)
                  + coalesce(octet_length(r.kwargs), 0) + coalesce(octet_length(r.children), 0)
                  + coalesce(octet_length(r.extra), 0) + coalesce(octet_length(r.traceback), 0)
                  < 5600
        THEN json_build_array(
            r.task_id, r.state, encode(r.result, 'base64'), r.content_type,
            r.content_encoding, r.traceback, encode(r.children, 'base64'), r.date_done,
            r.name, encode(r.args, 'base64'), encode(r.kwargs, 'base64'), r.worker,
            r.retries, r.queue, r.parent_id, r.root_id, r.group_id,
            encode(r.extra, 'base64'))::text
        END AS payload
)
SELECT count(pg_notify(%(channel)s,
           CASE WHEN octet_length(s.payload) < current_setting('block_size')::int - 200
                THEN s.payload
                ELSE json_build_array(s.task_id, s.state)::text
           END))
FROM stored s;

-- name: get_results_json
-- The rows of the given tasks, each as one JSON array (the store_result
-- payload, whatever its size); tasks without a row are left out. Sent by
-- the result consumer through libpq's pipeline right after the LISTENs of
-- the tasks a wait starts on, one read for them all (hence the positional
-- text[] parameter).
SELECT r.task_id, json_build_array(
    r.task_id, r.state, encode(r.result, 'base64'), r.content_type,
    r.content_encoding, r.traceback, encode(r.children, 'base64'), r.date_done,
    r.name, encode(r.args, 'base64'), encode(r.kwargs, 'base64'), r.worker,
    r.retries, r.queue, r.parent_id, r.root_id, r.group_id,
    encode(r.extra, 'base64'))::text
FROM {schema}.task_result r
WHERE r.task_id = ANY($1)
  AND (r.expires_at IS NULL OR r.expires_at > now());

-- name: get_result
SELECT task_id, state, result, content_type, content_encoding, traceback,
       children, date_done, name, args, kwargs, worker, retries, queue,
       parent_id, root_id, group_id, extra
FROM {schema}.task_result
-- A row past its expires_at reads as missing (PENDING), deleted or not.
WHERE task_id = %(task_id)s AND (expires_at IS NULL OR expires_at > now());

-- name: get_results
SELECT task_id, state, result, content_type, content_encoding, traceback,
       children, date_done, name, args, kwargs, worker, retries, queue,
       parent_id, root_id, group_id, extra
FROM {schema}.task_result
WHERE task_id = ANY(%(task_ids)s) AND (expires_at IS NULL OR expires_at > now());

-- name: result_exists
SELECT EXISTS (SELECT 1 FROM {schema}.task_result
               WHERE task_id = %(task_id)s AND (expires_at IS NULL OR expires_at > now()));

-- name: forget_result
DELETE FROM {schema}.task_result WHERE task_id = %(task_id)s;

-- name: save_group
INSERT INTO {schema}.group_result AS g (
    group_id, result, content_type, content_encoding, expires_at)
VALUES (%(group_id)s, %(result)s, %(content_type)s, %(content_encoding)s,
        now() + make_interval(secs => %(expires)s))
ON CONFLICT (group_id) DO UPDATE SET
    result = EXCLUDED.result,
    content_type = EXCLUDED.content_type,
    content_encoding = EXCLUDED.content_encoding,
    date_done = now(),
    expires_at = EXCLUDED.expires_at;

-- name: get_group
SELECT result, content_type, content_encoding, date_done
FROM {schema}.group_result
WHERE group_id = %(group_id)s AND (expires_at IS NULL OR expires_at > now());

-- name: delete_group
DELETE FROM {schema}.group_result WHERE group_id = %(group_id)s;

-- name: chord_start
-- apply_chord, before the header is sent. Re-applying a frozen chord reuses
-- its group id but is a new run: start the count again.
WITH chord AS (
    INSERT INTO {schema}.chord AS c (group_id, header)
    VALUES (%(group_id)s, %(header)s)
    ON CONFLICT (group_id) DO UPDATE SET
        size = NULL, extra = 0, done = 0, fired = false,
        header = EXCLUDED.header, updated_at = now()
    RETURNING c.group_id
)
DELETE FROM {schema}.chord_part p
WHERE p.group_id IN (SELECT group_id FROM chord);

-- name: chord_set_size
UPDATE {schema}.chord SET size = %(size)s, updated_at = now()
WHERE group_id = %(group_id)s;

-- name: chord_add
-- Task.add_to_chord: one more part to wait for.
UPDATE {schema}.chord SET extra = extra + 1, updated_at = now()
WHERE group_id = %(group_id)s;

-- name: chord_part_return
-- Record one header part and count it, in one statement:
--   part:    the part, unless this (position, task id) was recorded before
--            (a redelivered header task) or the chord already fired;
--   UPDATE:  add it to the count under the chord's row lock, and flip fired
--            when the count is complete. Concurrent parts queue on the row
--            lock and re-read the row, so exactly one statement flips fired
--            and gets fired = true back.
WITH part AS (
    INSERT INTO {schema}.chord_part (
        group_id, task_id, position, state, result, content_type, content_encoding)
    SELECT c.group_id, %(task_id)s, %(position)s, %(state)s, %(result)s,
           %(content_type)s, %(content_encoding)s
    FROM {schema}.chord c
    WHERE c.group_id = %(group_id)s AND NOT c.fired
    ON CONFLICT DO NOTHING
    RETURNING 1
)
UPDATE {schema}.chord c SET
    done = c.done + (SELECT count(*) FROM part),
    fired = c.size IS NOT NULL
            AND c.done + (SELECT count(*) FROM part) >= c.size + c.extra,
    updated_at = now()
WHERE c.group_id = %(group_id)s AND NOT c.fired
RETURNING c.fired, c.header, c.done, c.size + c.extra AS total;

-- name: chord_parts
SELECT task_id, state, result, content_type, content_encoding
FROM {schema}.chord_part
WHERE group_id = %(group_id)s
ORDER BY position, task_id;

-- name: chord_finish
-- The body is sent: the parts are no longer needed. The chord row stays
-- (fired = true) so a late duplicate part is ignored, until it expires.
DELETE FROM {schema}.chord_part WHERE group_id = %(group_id)s;

-- name: cleanup_results
-- result_expires: remove rows last written before the cutoff, a batch at a
-- time so a large backlog never holds long locks.
WITH old AS (
    SELECT task_id FROM {schema}.task_result
    WHERE updated_at < %(cutoff)s
    ORDER BY updated_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {schema}.task_result r USING old WHERE r.task_id = old.task_id;

-- name: cleanup_groups
WITH old AS (
    SELECT group_id FROM {schema}.group_result
    WHERE date_done < %(cutoff)s
    ORDER BY date_done
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {schema}.group_result g USING old WHERE g.group_id = old.group_id;

-- name: cleanup_chords
WITH old AS (
    SELECT group_id FROM {schema}.chord
    WHERE updated_at < %(cutoff)s
    ORDER BY updated_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {schema}.chord c USING old WHERE c.group_id = old.group_id;
