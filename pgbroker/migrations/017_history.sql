-- 017_history: what the dashboard shows over time (pgbroker/dashboard/).
--
-- Design notes
-- * publish_sample: the message id sequence (every message ever stored,
--   once per queue it was routed to) read at the first sweep of each
--   minute, by whichever process sweeps first (`sweep` in queries.sql: one
--   more row in a statement every worker already runs, never a statement
--   of its own, and nothing on the publish path). The messages stored in a
--   minute are the difference between its sample and the next one; a
--   minute without a sweep (no worker running) has no sample and its count
--   is unknown, not zero. The sweep also removes samples older than a day.
--   Samples are taken up to a sweep interval (10 s) into their minute, so
--   a minute's count is off by at most that much at either end.
-- * Privileges: a worker's role granted the tables before this migration
--   (GRANT ... ON ALL TABLES covers only the tables then) must go on
--   sweeping, and identity sequences need no grant to insert, so the
--   worker may not be able to read the sequence either. The sweep calls
--   sample_publishes(), which runs as its owner (as 015's trigger does);
--   the samples, counters, are readable by anyone who may use the schema.
-- * task_result.received_at and started_at: when the worker's consumer
--   claimed the message of the run that stored the row (the server's
--   clock: message.claimed_at, carried to the worker in the delivery
--   property pgbroker_received_at) and when the task body started (the
--   worker's clock, at Celery's task_prerun). Celery keeps only a task's
--   latest state, which a finished task has long overwritten; these two
--   keep the times of its last run, as its date_done (the worker's clock
--   too) keeps the end. NULL where the row was written by anyone else
--   (a client, the sweeper, another broker). Nullable with no default:
--   adding them rewrites nothing.
-- * task_result.retry_log: a JSON array with one object per RETRY state
--   stored, which the next state would otherwise overwrite: at, reason,
--   received_at, started_at (when it was stored, the exception's type and
--   message cut at 500 characters, and that run's two times; times in Unix
--   seconds). Only a RETRY writes it, and the last 50 are kept (a task
--   retried forever keeps a bounded row).

CREATE TABLE IF NOT EXISTS {schema}.publish_sample (
    minute       timestamptz PRIMARY KEY,
    sampled_at   timestamptz NOT NULL,
    stored_total bigint NOT NULL
);

GRANT SELECT ON {schema}.publish_sample TO PUBLIC;

-- This minute's sample if it has none yet (then also removes samples older
-- than a day, a few rows locked by no other sweep): 1 if taken, else 0.
-- Two sweeps at once may both find none; ON CONFLICT keeps one.
CREATE FUNCTION {schema}.sample_publishes() RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    this_minute timestamptz := date_trunc('minute', now());
    taken integer;
BEGIN
    IF EXISTS (SELECT 1 FROM {schema}.publish_sample s WHERE s.minute = this_minute) THEN
        RETURN 0;
    END IF;
    INSERT INTO {schema}.publish_sample (minute, sampled_at, stored_total)
    VALUES (this_minute, now(),
            coalesce(pg_sequence_last_value(pg_get_serial_sequence(
                pg_typeof(NULL::{schema}.message)::text, 'id')::regclass), 0))
    ON CONFLICT (minute) DO NOTHING;
    GET DIAGNOSTICS taken = ROW_COUNT;
    DELETE FROM {schema}.publish_sample s
    WHERE s.minute = ANY (ARRAY (
        SELECT o.minute FROM {schema}.publish_sample o
        WHERE o.minute < now() - interval '1 day'
        FOR UPDATE SKIP LOCKED));
    RETURN taken;
END
$$;

ALTER TABLE {schema}.task_result
    ADD COLUMN IF NOT EXISTS received_at timestamptz,
    ADD COLUMN IF NOT EXISTS started_at timestamptz,
    ADD COLUMN IF NOT EXISTS retry_log jsonb;
