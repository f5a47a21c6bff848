-- 016_dashboard: indexes for `pgbroker dashboard` (pgbroker/dashboard/,
-- statements in sql/dashboard.sql).
--
-- Design notes
-- * The Tasks page lists task_result newest change first (updated_at DESC,
--   task_id DESC as the tiebreak) and pages by keyset: the next page starts
--   after the (updated_at, task_id) of the last row shown, never with
--   OFFSET. Each filter has an index that starts with the filtered column
--   and then holds the sort order, so a page is read from the index in
--   order and the scan stops after one page, whatever the table's size
--   (tests/test_dashboard_plans.py checks the plans on a million rows).
-- * task_result_recent replaces task_result_updated (002), a prefix of it:
--   what used that one (retention by updated_at) uses this one as well, and
--   with both the planner may take the shorter and sort each run of equal
--   times again.
-- * name, worker and queue are filled only when the Celery app sets
--   result_extended=True; the indexes on them are partial (NOT NULL), so
--   apps without it pay for them with nothing but the empty index.
-- * parent_id and root_id find a task's children and the rest of its
--   canvas on the task page (group_id already has task_result_group).
-- * date_done: the overview's completions per minute over the last hour.
-- * sweeper_sessions(): which sessions hold the fast sweeper's lock (schema
--   oid, 0) and the standby's (schema oid, -1, that is 4294967295 as an
--   oid), see 007_sweeper.sql. Like consumer_alive (014), the pg_locks test
--   lives here, once, not in the statements that use it.
-- * Plain CREATE INDEX, not CONCURRENTLY: migrations run in a transaction.
--   On a large task_result this locks writes to the table while the indexes
--   build; `pgbroker migrate --sql` prints the statements for a DBA who
--   prefers to build them CONCURRENTLY first (CREATE INDEX IF NOT EXISTS
--   then finds them done).

CREATE INDEX IF NOT EXISTS task_result_recent
    ON {schema}.task_result (updated_at, task_id);
DROP INDEX IF EXISTS {schema}.task_result_updated;
CREATE INDEX IF NOT EXISTS task_result_name_recent
    ON {schema}.task_result (name, updated_at, task_id) WHERE name IS NOT NULL;
CREATE INDEX IF NOT EXISTS task_result_state_recent
    ON {schema}.task_result (state, updated_at, task_id);
CREATE INDEX IF NOT EXISTS task_result_queue_recent
    ON {schema}.task_result (queue, updated_at, task_id) WHERE queue IS NOT NULL;
CREATE INDEX IF NOT EXISTS task_result_worker_recent
    ON {schema}.task_result (worker, updated_at, task_id) WHERE worker IS NOT NULL;
CREATE INDEX IF NOT EXISTS task_result_parent
    ON {schema}.task_result (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS task_result_root
    ON {schema}.task_result (root_id) WHERE root_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS task_result_done
    ON {schema}.task_result (date_done) WHERE date_done IS NOT NULL;

CREATE FUNCTION {schema}.sweeper_sessions()
RETURNS TABLE (role text, pid integer)
LANGUAGE sql STABLE
AS $$
    SELECT CASE WHEN l.objid = 0 THEN 'sweeper' ELSE 'standby' END, l.pid
    FROM pg_catalog.pg_locks l
    WHERE l.locktype = 'advisory'
      AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d
                        WHERE d.datname = pg_catalog.current_database())
      AND l.objsubid = 2  -- the two-int4 form of the advisory lock functions
      AND l.classid = (SELECT t.typnamespace FROM pg_catalog.pg_type t
                       WHERE t.oid = pg_catalog.pg_typeof(NULL::{schema}.consumer)::oid)
      AND l.objid IN (0, 4294967295)
      AND l.granted
    ORDER BY l.objid
$$;
