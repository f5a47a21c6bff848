-- 011_auto_delete: auto-delete and exclusive queues go, as in AMQP.
--
-- Design notes
-- * queue.auto_delete was stored but never acted on: every
--   kombu.common.Broadcast consumer (a Celery worker with a Broadcast queue
--   in task_queues, at every start) left its bcast.<uuid> queue and binding
--   behind, and every later fanout publish stored a copy there for good.
-- * An auto-delete queue now goes when its last consumer goes: cancelled,
--   its connection closed, or dead (once the sweep has removed the dead
--   consumer). consumed says it has had a consumer (set when one attaches):
--   as in AMQP, an auto-delete queue that was declared but never consumed
--   stays.
-- * An exclusive queue goes with the connection that declared it:
--   exclusive_to is that session's consumer id (the session registers as a
--   consumer to declare one, so that its death is seen by the sweep). No
--   foreign key: the queue's messages must go with it, which
--   drop_unused_queues in sql/queries.sql does.
-- * Queues are dropped, with their bindings (foreign key) and messages, by
--   drop_unused_queues: after a cancel, after a close, and after a sweep
--   that removed dead consumers.
-- * Auto-delete queues without a consumer now, left behind before this
--   migration, go here, with their messages.

ALTER TABLE {schema}.queue
    ADD COLUMN consumed boolean NOT NULL DEFAULT false,
    ADD COLUMN exclusive_to integer;

WITH gone AS (
    DELETE FROM {schema}.queue q
    WHERE q.auto_delete
      AND NOT EXISTS (SELECT 1 FROM {schema}.consumer_queue cq WHERE cq.queue = q.name)
    RETURNING q.name
)
DELETE FROM {schema}.message m WHERE m.queue IN (SELECT name FROM gone);
