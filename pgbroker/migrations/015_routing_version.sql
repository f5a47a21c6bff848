-- 015_routing_version: a version number for the routing tables, so that a
-- publishing process can route from a cache instead of joining binding,
-- exchange and queue for every message (docs/delivery.md, "Routing from a
-- cache").
--
-- Design notes
-- * routing_version holds one row. Every change that can change where a
--   message goes bumps it, in the transaction that makes the change: a
--   queue created or removed (the anonymous exchange routes by queue name),
--   its message_ttl or name changed; an exchange created or removed, its
--   type, durability or name changed; a binding added, removed or changed.
--   Triggers do it, so that every writer is covered: the transport's
--   declarations, the sweep (expired queues), drop_unused_queues,
--   foreign-key cascades, and an operator's own SQL.
-- * What does not route is left alone: a redeclaration that inserts nothing
--   (ON CONFLICT), last_used_at, consumed, exclusive_to. INSERT and DELETE
--   triggers are per statement and look at the rows changed (transition
--   tables), so a statement that changed nothing bumps nothing; an UPDATE
--   trigger is per row, with a WHEN clause on the routing columns.
-- * The publish statement reads the version in the same snapshot as it
--   inserts: when the caller's cached version is still current, its cached
--   targets are exactly what the tables say (sql/queries.sql, `publish`).
-- * A bump also NOTIFYs 'pgbr_' || md5(schema) (payload empty, so that
--   several bumps of one transaction make one notification): a session that
--   LISTENs drops its cache then (pgbroker.broker.routing).
-- * Publishers only read the row, and take no lock on it; writers of the
--   routing tables queue on it (one short statement each, autocommit).
-- * Privileges: a role granted what it needs before this migration (an
--   application publishing with enqueue_in: SELECT, INSERT, UPDATE on the
--   tables then in the schema) must keep working. The version is readable
--   by anyone who may use the schema (it is a counter), and the trigger
--   function runs as its owner, so a role that may declare a queue need not
--   be granted UPDATE on routing_version.

CREATE TABLE {schema}.routing_version (
    one      boolean PRIMARY KEY DEFAULT true CHECK (one),
    version  bigint NOT NULL
);
INSERT INTO {schema}.routing_version (one, version) VALUES (true, 1);

GRANT SELECT ON {schema}.routing_version TO PUBLIC;

CREATE FUNCTION {schema}.routing_changed() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- Statement triggers pass 'rows': the transition table `changed` says
    -- whether the statement changed any row at all.
    IF TG_NARGS > 0 THEN
        IF NOT EXISTS (SELECT 1 FROM changed) THEN
            RETURN NULL;
        END IF;
    END IF;
    UPDATE {schema}.routing_version SET version = version + 1;
    PERFORM pg_catalog.pg_notify('pgbr_' || pg_catalog.md5(TG_TABLE_SCHEMA), '');
    RETURN NULL;
END
$$;

CREATE TRIGGER routing_queue_inserted AFTER INSERT ON {schema}.queue
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.routing_changed('rows');
CREATE TRIGGER routing_queue_deleted AFTER DELETE ON {schema}.queue
    REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.routing_changed('rows');
CREATE TRIGGER routing_queue_updated AFTER UPDATE ON {schema}.queue
    FOR EACH ROW
    WHEN ((OLD.name, OLD.message_ttl) IS DISTINCT FROM (NEW.name, NEW.message_ttl))
    EXECUTE FUNCTION {schema}.routing_changed();
CREATE TRIGGER routing_queue_truncated AFTER TRUNCATE ON {schema}.queue
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.routing_changed();

CREATE TRIGGER routing_exchange_inserted AFTER INSERT ON {schema}.exchange
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.routing_changed('rows');
CREATE TRIGGER routing_exchange_deleted AFTER DELETE ON {schema}.exchange
    REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.routing_changed('rows');
CREATE TRIGGER routing_exchange_updated AFTER UPDATE ON {schema}.exchange
    FOR EACH ROW
    WHEN ((OLD.name, OLD.type, OLD.durable) IS DISTINCT FROM (NEW.name, NEW.type, NEW.durable))
    EXECUTE FUNCTION {schema}.routing_changed();
CREATE TRIGGER routing_exchange_truncated AFTER TRUNCATE ON {schema}.exchange
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.routing_changed();

CREATE TRIGGER routing_binding_inserted AFTER INSERT ON {schema}.binding
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.routing_changed('rows');
CREATE TRIGGER routing_binding_deleted AFTER DELETE ON {schema}.binding
    REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.routing_changed('rows');
CREATE TRIGGER routing_binding_updated AFTER UPDATE ON {schema}.binding
    FOR EACH ROW
    WHEN ((OLD.*) IS DISTINCT FROM (NEW.*))
    EXECUTE FUNCTION {schema}.routing_changed();
CREATE TRIGGER routing_binding_truncated AFTER TRUNCATE ON {schema}.binding
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.routing_changed();
