-- 020_waiting_consumers: a publish wakes one waiting consumer, not all.
--
-- Design notes
-- * Every consumer of a queue hears every publish's NOTIFY (one channel per
--   schema), and each idle one claimed at once: all but one found nothing.
--   At 64 consumers that was most of the server's CPU per publish
--   (docs/benchmarks.md, "Wake-ups").
-- * waiting_since: set by the consumer's own claim (`claim` in queries.sql)
--   when that claim left the consumer with room and nothing more to take,
--   so that it would claim again at once when woken; NULL otherwise. A
--   publish names one waiting consumer of its queue in its NOTIFY
--   (`queue\n<priority> <id> <consumer>`), chosen at random, so that work
--   spreads over the idle consumers as RabbitMQ's round robin spreads it.
--   Random rather than the one waiting longest: that order needs a write
--   at every claim that takes something; the column only changes when its
--   consumer starts or stops waiting.
-- * Only the consumer's claim writes it, in the claim's transaction; a
--   publish only reads it, so it takes no lock a claim could wait on (a
--   publish inside a caller's long transaction, enqueue_in, holds none).
-- * A stale value costs a delay, never a message: a consumer named while it
--   cannot claim (stopped, killed before the sweep removed its row, busy)
--   leaves the message to the others, which claim it a fallback time after
--   they heard it named (pgbroker/broker/cursor.py, WAKE_FALLBACK).
-- * Not indexed: it changes at claims, and an indexed column would make
--   those updates non-HOT; a queue's consumers are found by
--   consumer_queue_queue.
-- * Privileges: every publish reads the view waiting_consumer, and an
--   application role granted the tables before this migration (GRANT ...
--   ON ALL TABLES covers only the tables and views then) must go on
--   publishing. The view reads consumer_queue as its owner; which consumer
--   of a queue waits is readable by anyone who may use the schema.

ALTER TABLE {schema}.consumer_queue ADD COLUMN waiting_since timestamptz;

-- One consumer of each queue that waits for a wake-up, at random: the one
-- a publish names. Read with the queue given (`publish` in queries.sql),
-- the condition reaches the scan of consumer_queue_queue.
CREATE VIEW {schema}.waiting_consumer AS
SELECT DISTINCT ON (queue) queue, consumer_id
FROM {schema}.consumer_queue
WHERE waiting_since IS NOT NULL
ORDER BY queue, random();

GRANT SELECT ON {schema}.waiting_consumer TO PUBLIC;
