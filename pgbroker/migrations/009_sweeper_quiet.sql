-- 009_sweeper_quiet: the sweeper's session no longer LISTENs
-- (pgbroker/broker/sweeper.py, docs/fast-recovery.md).
--
-- Why: every NOTIFY committed in a database signals every backend of that
-- database that LISTENs, whatever its channel (up to PostgreSQL 18). A
-- lone sweeper that LISTENed (so that a new process's standby could wake
-- it) woke up for every publish and every result NOTIFY: under a Celery
-- load its backend used more CPU than any other, for nothing.
--
-- Instead, a sweeper alone (no other process has consumers) keeps its lock
-- and only runs the sweep every sweep_interval; the sweep says whether
-- other processes have consumers now (`others` in sql/queries.sql, sweep),
-- and the client then calls sweeper_wait again, which watches them. A new
-- process's standby also nudges it at once: a NOTIFY with payload
-- 'sweeper' on the schema's due channel ('pgbd_' || md5(schema name),
-- pgbroker.broker.delayed.due_channel_for), which the consumer sessions of
-- every consuming process LISTEN on anyway; the transport hands the nudge
-- to its process's sweeper thread. (A process without fast_recovery has
-- no standby: it is noticed at the next sweep, within one sweep_interval.)
--
-- The same procedure as in 007_sweeper.sql (see its comments), with the
-- sweeper's LISTEN removed and the standby's NOTIFY on the due channel;
-- same signature.
CREATE OR REPLACE PROCEDURE {schema}.sweeper_wait(
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
        -- A new process consumes: nudge a lone sweeper (see above).
        PERFORM pg_catalog.pg_notify('pgbd_' || pg_catalog.md5(
            (SELECT n.nspname FROM pg_catalog.pg_namespace n WHERE n.oid = lock_oid)),
            'sweeper');
    END IF;
    dead := {schema}.dead_consumers(lock_oid);
    waited := role = 'standby' OR (role = 'sweeper' AND (
        NOT dead <@ coalesce(known, ARRAY[]::integer[])
        OR EXISTS (SELECT 1 FROM {schema}.consumer c
                   WHERE NOT (c.hostname = own_host AND c.pid = own_pid))));
    seen := dead;
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
