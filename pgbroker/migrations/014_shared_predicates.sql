-- 014_shared_predicates: "is this consumer alive" and "copy a message to
-- dead_letter" are written once, as SQL functions, and every statement,
-- view and function that needs them calls them (docs/architecture.md,
-- "Where SQL lives").
--
-- Before, the pg_locks test was written out in dead_consumers (007), the
-- broker_stats view (008), the sweep and the operators' `consumers` query
-- (sql/*.sql), and the dead_letter INSERT's column list in publish,
-- requeue, reject and the sweep: a change to one copy (a column, the lock
-- key) could miss the others. Behaviour is unchanged.

-- consumer_alive(lock_oid, key): whether some session holds the session
-- advisory lock (lock_oid, key) in this database, lock_oid being the
-- schema's oid (the consumers' lock class, see 001_broker.sql). For a
-- consumer id: the consumer's session lives. For a process key (negative,
-- 012_sessions_lost.sql): a session of that process lives. (The int4 key
-- is the lock's objid as oid: int4 -> oid keeps the bits, so -1 is
-- 4294967295, as pg_advisory_lock(int4, int4) stores it.)
--
-- A set-returning function of one row, called in FROM (usually CROSS JOIN
-- LATERAL, one call per consumer row), so that PostgreSQL inlines it: the
-- lock table (pg_lock_status(), which takes every lock-manager partition
-- lock) is then read once per statement and hashed, whatever the number of
-- consumers. A scalar boolean function would not be inlined (its body is a
-- sub-select) and would read the lock table once per consumer row. Its
-- arguments must be plain columns or parameters, not sub-selects (which
-- also prevent inlining). SQL, STABLE, not STRICT: all three are needed to
-- inline. The sub-select takes no argument (the lock class is compared
-- outside it), so that it is hashed once even where lock_oid comes from a
-- joined row, which PostgreSQL treats as changing from row to row. Everything is schema-qualified: the sweeper's procedure calls it
-- without a search_path.
CREATE FUNCTION {schema}.consumer_alive(lock_oid oid, key integer)
RETURNS TABLE (alive boolean)
LANGUAGE sql STABLE
AS $$
    SELECT (consumer_alive.lock_oid, consumer_alive.key::oid) IN (
        SELECT l.classid, l.objid FROM pg_catalog.pg_locks l
        WHERE l.locktype = 'advisory'
          AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                            WHERE d.datname = pg_catalog.current_database())
          AND l.objsubid = 2  -- the two-int4 form of the advisory lock functions
          AND l.granted)
$$;

-- add_dead_letter(reason, ...): store one dead letter; returns its id. The
-- only INSERT into dead_letter (replays move rows out, see admin.sql).
-- Call it with named arguments (`queue => ...`) where no message row
-- exists (publish: a message routed nowhere); otherwise with the message
-- row, below. VOLATILE (it writes): a statement that calls it from a
-- WITH query must read that query's rows (count them), or PostgreSQL never
-- runs it; the callers return the count.
CREATE FUNCTION {schema}.add_dead_letter(
    reason text,
    queue text,
    delivery_count integer,
    published_at timestamptz,
    exchange text,
    routing_key text,
    task_id text,
    task_name text,
    priority smallint,
    content_type text,
    content_encoding text,
    headers json,
    properties json,
    body bytea
) RETURNS bigint
LANGUAGE sql VOLATILE
AS $$
    INSERT INTO {schema}.dead_letter (
        reason, queue, delivery_count, published_at, exchange, routing_key, task_id,
        task_name, priority, content_type, content_encoding, headers, properties, body)
    VALUES (
        reason, queue, delivery_count, published_at, exchange, routing_key, task_id,
        task_name, priority, content_type, content_encoding, headers, properties, body)
    RETURNING id
$$;

-- add_dead_letter(reason, m): a message (a row of the message table, or of
-- a DELETE ... RETURNING * on it) as a dead letter, with its queue,
-- delivery count, publication time, routing, Celery ids, priority and
-- content unchanged. (A single expression: PostgreSQL inlines it into the
-- call above.)
CREATE FUNCTION {schema}.add_dead_letter(reason text, m {schema}.message)
RETURNS bigint
LANGUAGE sql VOLATILE
AS $$
    SELECT {schema}.add_dead_letter(
        reason => reason,
        queue => m.queue,
        delivery_count => m.delivery_count,
        published_at => m.published_at,
        exchange => m.exchange,
        routing_key => m.routing_key,
        task_id => m.task_id,
        task_name => m.task_name,
        priority => m.priority,
        content_type => m.content_type,
        content_encoding => m.content_encoding,
        headers => m.headers,
        properties => m.properties,
        body => m.body)
$$;

-- 007_sweeper.sql's function (same signature and result), through
-- consumer_alive; sweeper_wait calls it, unchanged.
CREATE OR REPLACE FUNCTION {schema}.dead_consumers(lock_oid oid) RETURNS integer[]
LANGUAGE sql STABLE
AS $$
    SELECT ARRAY(
        SELECT c.id FROM {schema}.consumer c
        CROSS JOIN LATERAL {schema}.consumer_alive(lock_oid, c.id) a
        WHERE NOT a.alive
        ORDER BY c.id)
$$;

-- 008_operations.sql's view (same columns), through consumer_alive.
CREATE OR REPLACE VIEW {schema}.broker_stats AS
WITH ns AS (
    SELECT typnamespace AS oid FROM pg_type
    WHERE oid = pg_typeof(NULL::{schema}.consumer)::oid
), alive AS (
    -- (The schema oid joined, not a sub-select argument: see consumer_alive.)
    SELECT c.id, a.alive
    FROM ns
    CROSS JOIN {schema}.consumer c
    CROSS JOIN LATERAL {schema}.consumer_alive(ns.oid, c.id) a
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
