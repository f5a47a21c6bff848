-- 019_claim_settings: a claim in one statement.
--
-- Design notes
-- * A claim, with the acks that ride on it, was a transaction of six
--   statements (BEGIN, SET CONSTRAINTS, SET LOCAL, the acks, the claim,
--   COMMIT). Now it is one statement (`claim` in queries.sql), in the
--   implicit transaction that its Sync commits, and this function does at
--   the claim's first candidate row what the other statements did. An
--   empty claim (an idle consumer woken for a message another one takes)
--   cost the server about a third less CPU, and its round trip a quarter
--   less time, measured in a loop.
-- * SET CONSTRAINTS ALL IMMEDIATE: a deferred constraint or constraint
--   trigger on the message table fails the claiming statement itself, not
--   its commit, which comes after its rows were handed to the application.
--   Run inside a function, where SET CONSTRAINTS needs no transaction block.
-- * synchronous_commit off for this transaction when the acks that rode on
--   the claim removed no message: such a claim, lost in a crash, only makes
--   its messages ready again, as recovery does anyway.
-- * Not called when the queue has no ready message (the claim's scan finds
--   no row to test it on): an empty claim writes nothing, so it has no
--   commit to speed up and no row to hand over; acks it carried are then
--   flushed as configured, and a deferred check of theirs fails the commit,
--   with no row handed over.
-- * No SET clause (search_path): a function with one saves and restores the
--   settings at every call, and this one runs at every claim that meets a
--   ready row. It names nothing that a search_path could redirect: the one
--   function it calls is named with its schema.

CREATE OR REPLACE FUNCTION {schema}.claim_settings(acked boolean) RETURNS boolean
LANGUAGE plpgsql
AS $$
BEGIN
    SET CONSTRAINTS ALL IMMEDIATE;
    IF NOT acked THEN
        PERFORM pg_catalog.set_config('synchronous_commit', 'off', true);
    END IF;
    RETURN true;
END
$$;
