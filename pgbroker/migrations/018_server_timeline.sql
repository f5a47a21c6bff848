-- 018_server_timeline: which history of commits a session's server is on.
--
-- Design notes
-- * A consumer's acks that its session lost before writing them are
--   written by the process's next session (`ack_orphaned` in queries.sql).
--   That is right on the same server, even after a crash restart: the work
--   an ack acknowledges committed before it, and a crash undoes no flushed
--   commit. It is wrong after an asynchronous standby was promoted: the old
--   primary's last commits are lost, among them maybe the very work the ack
--   acknowledges (a task's steps, its result), and the ack would remove the
--   message of work that no longer exists. Promotion starts a new timeline
--   (as does a restore to a point in time), so a consumer records the
--   timeline its session registered on (and gives it to each delivery, the
--   property pgbroker_timeline), and acks are written only on the same
--   timeline; the others' messages are delivered again. So is a task's
--   one-transaction finish (`finish_ack` in queries.sql): on another
--   timeline it writes nothing.
-- * The timeline is the first eight hex digits of the current WAL file's
--   name. Services that keep WAL functions to themselves (Aurora, which
--   loses no commit on failover) raise an error for them: NULL then, and
--   NULL on both sides counts as the same history, as before.
-- * Called once per consumer session (register_consumer), and by a finish
--   whose message is still there (finish_ack): the exception block costs a
--   subtransaction, which writes nothing and so takes no transaction id.

CREATE OR REPLACE FUNCTION {schema}.server_timeline() RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN ('x' || left(pg_walfile_name(pg_current_wal_lsn()), 8))::bit(32)::integer;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END
$$;
