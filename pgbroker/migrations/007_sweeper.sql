-- 007_sweeper: the server side of fast crash recovery (pgbroker/broker/sweeper.py).
--
-- Every process that consumes runs a sweeper thread with a session of its
-- own, which calls sweeper_wait in a loop. Two session advisory locks,
-- keyed like the consumers' (schema oid as int4, consumer id >= 1), give
-- each session a role:
--
-- * (oid, 0), the sweeper: polls pg_locks inside the server every
--   poll_seconds and returns as soon as a consumer's lock is gone (its
--   session ended: its process was killed), so that the client sweeps at
--   once instead of at the next sweep_interval. When no other process has
--   consumers there is nothing to watch (our own consumers die with us):
--   it returns at once, and the client sleeps until the next call or until
--   a NOTIFY on pgbroker_sweeper_<schema oid> (LISTENed to here) says that
--   a standby came;
-- * (oid, -1), the standby: waits for the sweeper lock and takes it the
--   moment the sweeper's session ends. It also reports consumers that were
--   dead at the start and at the end of its wait: the sweeper is alive but
--   not sweeping, so the standby's client sweeps;
-- * any other session is idle: the call returns at once (the client
--   sleeps sweep_interval), after taking a free role.
--
-- Why the waits COMMIT about every second: a statement holds a snapshot for
-- as long as it runs (inside a procedure: from the first statement after a
-- COMMIT to the next COMMIT), and a snapshot's xmin holds back what VACUUM
-- and page pruning may remove, while the message table churns. A SELECT
-- that waited 10 s, or a standby blocked in pg_advisory_lock for hours,
-- would pin the horizon that long. Here the session's xmin is never older
-- than about a second. The price: about one empty, read-only transaction
-- per second in pg_stat_database.xact_commit, for the sweeper (while other
-- processes have consumers) and the standby only. (A procedure with a SET
-- clause could not COMMIT, hence the qualified names instead of a
-- search_path setting.)
--
-- "Dead" (dead_consumers) is the same test as in the sweep query
-- (sql/queries.sql, sweep): no granted advisory lock (schema oid, consumer
-- id) in this database.
CREATE FUNCTION {schema}.dead_consumers(lock_oid oid) RETURNS integer[]
LANGUAGE sql STABLE
AS $$
    SELECT ARRAY(
        SELECT c.id FROM {schema}.consumer c
        WHERE NOT EXISTS (
            SELECT 1 FROM pg_catalog.pg_locks l
            WHERE l.locktype = 'advisory'
              AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                                WHERE d.datname = pg_catalog.current_database())
              AND l.classid = lock_oid AND l.objid = c.id::oid
              AND l.objsubid = 2 AND l.granted)
        ORDER BY c.id)
$$;

-- Arguments: how long to wait at most; how often the sweeper polls; the
-- dead consumers the caller's last sweep handled (`known`: the sweeper
-- returns early only for others, so that one the sweep cannot remove does
-- not make a busy loop); the caller's host name and pid (its own
-- consumers need no watching); the application_name for the session.
-- Returns: the role; the schema oid (the sweep's lock_oid); the dead
-- consumers now; for a standby, those dead since the start of its wait;
-- the queues that have consumers (the sweep promotes their due delayed
-- messages); whether the call waited (if not, the client sleeps).
CREATE PROCEDURE {schema}.sweeper_wait(
    wait_seconds double precision,
    poll_seconds double precision,
    known integer[],
    own_host text,
    own_pid integer,
    session_name text,
    INOUT role text,
    INOUT lock_oid oid,
    INOUT dead integer[],
    INOUT stale integer[],
    INOUT queues text[],
    INOUT waited boolean
)
LANGUAGE plpgsql
AS $$
DECLARE
    deadline timestamptz := pg_catalog.clock_timestamp()
                            + pg_catalog.make_interval(secs => wait_seconds);
    lock_class integer;
    -- Lock waits end before deadlock_timeout: no deadlock check runs for
    -- them, and log_lock_waits has nothing to log.
    max_wait_ms integer := greatest(10, least(1000, pg_catalog.floor(900 * extract(
        epoch FROM pg_catalog.current_setting('deadlock_timeout')::interval))));
    seen integer[];
    tx_end timestamptz;
BEGIN
    -- This session only waits: a role's timeouts must not cut its waits
    -- short. From PostgreSQL 14 the server checks the client socket while
    -- a call runs, so that a SIGKILLed sweeper's session (and lock) ends at
    -- once (set here, in effect from the next call).
    PERFORM pg_catalog.set_config('application_name', session_name, false),
            pg_catalog.set_config('statement_timeout', '0', false),
            pg_catalog.set_config('lock_timeout', '0', false),
            pg_catalog.set_config('idle_in_transaction_session_timeout', '0', false);
    IF pg_catalog.current_setting('server_version_num')::integer >= 140000 THEN
        PERFORM pg_catalog.set_config('client_connection_check_interval', '250', false);
    END IF;
    lock_oid := (SELECT t.typnamespace FROM pg_catalog.pg_type t
                 WHERE t.oid = pg_catalog.pg_typeof(NULL::{schema}.consumer)::oid);
    -- pg_advisory_lock(int4, int4) takes the schema oid as a signed int4.
    lock_class := lock_oid::bigint
        - CASE WHEN lock_oid::bigint >= 2147483648 THEN 4294967296 ELSE 0 END;
    SELECT CASE WHEN bool_or(l.objid = 0) THEN 'sweeper'
                WHEN bool_or(l.objid = 4294967295) THEN 'standby' ELSE 'idle' END
    INTO role
    FROM pg_catalog.pg_locks l
    WHERE l.locktype = 'advisory' AND l.pid = pg_catalog.pg_backend_pid()
      AND l.classid = lock_oid AND l.objid IN (0, 4294967295) AND l.objsubid = 2
      AND l.granted;
    IF role <> 'sweeper' AND pg_catalog.pg_try_advisory_lock(lock_class, 0) THEN
        IF role = 'standby' THEN
            PERFORM pg_catalog.pg_advisory_unlock(lock_class, -1);
        END IF;
        role := 'sweeper';
    ELSIF role = 'idle' AND pg_catalog.pg_try_advisory_lock(lock_class, -1) THEN
        role := 'standby';
        -- A new process consumes: wake a sweeper that, alone until now,
        -- sleeps between calls (its client LISTENs on this channel).
        PERFORM pg_catalog.pg_notify('pgbroker_sweeper_' || lock_oid::text, '');
    END IF;
    dead := {schema}.dead_consumers(lock_oid);
    waited := role = 'standby' OR (role = 'sweeper' AND (
        NOT dead <@ coalesce(known, ARRAY[]::integer[])
        OR EXISTS (SELECT 1 FROM {schema}.consumer c
                   WHERE NOT (c.hostname = own_host AND c.pid = own_pid))));
    seen := dead;
    IF role = 'sweeper' AND NOT waited THEN
        -- Alone: the client sleeps between calls, woken by a new standby.
        EXECUTE pg_catalog.format('LISTEN %I', 'pgbroker_sweeper_' || lock_oid::text);
    END IF;
    WHILE waited LOOP
        -- A new transaction, so a new snapshot, about every second.
        COMMIT;
        EXIT WHEN pg_catalog.clock_timestamp() >= deadline;
        IF role = 'standby' THEN
            -- Wait for the sweeper lock; its holder's session ending wakes
            -- this wait at once.
            PERFORM pg_catalog.set_config('lock_timeout', greatest(1, least(
                max_wait_ms,
                pg_catalog.ceil(1000 * extract(epoch FROM deadline - pg_catalog.clock_timestamp()))
            ))::text, true);
            BEGIN
                PERFORM pg_catalog.pg_advisory_lock(lock_class, 0);
                PERFORM pg_catalog.pg_advisory_unlock(lock_class, -1);
                role := 'sweeper';
            EXCEPTION WHEN lock_not_available THEN
                NULL;
            END;
        END IF;
        IF role = 'sweeper' THEN
            tx_end := least(deadline, pg_catalog.clock_timestamp() + interval '1 second');
            LOOP
                dead := {schema}.dead_consumers(lock_oid);
                EXIT WHEN NOT dead <@ coalesce(known, ARRAY[]::integer[])
                          OR pg_catalog.clock_timestamp() >= tx_end;
                PERFORM pg_catalog.pg_sleep(least(
                    poll_seconds,
                    extract(epoch FROM tx_end - pg_catalog.clock_timestamp())));
            END LOOP;
            EXIT WHEN NOT dead <@ coalesce(known, ARRAY[]::integer[]);
        END IF;
    END LOOP;
    IF role = 'standby' THEN
        dead := {schema}.dead_consumers(lock_oid);
        -- Dead at the start of the wait and still dead: nobody swept them.
        stale := ARRAY(SELECT unnest(seen) INTERSECT SELECT unnest(dead) ORDER BY 1);
    END IF;
    IF role = 'sweeper' OR dead <> ARRAY[]::integer[] THEN
        queues := ARRAY(SELECT DISTINCT cq.queue FROM {schema}.consumer_queue cq ORDER BY 1);
    END IF;
END
$$;
