-- Every query of the beat scheduler (pgbroker/operations/beat.py), by name. `{schema}`
-- is replaced by the quoted schema identifier; values are bound parameters.

-- name: try_lead
-- The leader's session advisory lock, one per schema. Held until the
-- session ends: Postgres releases it when the leader's connection closes or
-- its process dies, and a standby's next try takes it.
SELECT pg_try_advisory_lock(hashtext('pgbroker.operations.beat'), hashtext(%(schema)s));

-- name: resign
-- A leader that stops releases the lock at once (closing the session would
-- too, but the server ends a closed session a moment later).
SELECT pg_advisory_unlock(hashtext('pgbroker.operations.beat'), hashtext(%(schema)s));

-- name: now
SELECT now();

-- name: load_entries
SELECT name, task, interval_seconds, cron_minute, cron_hour, cron_day_of_week,
       cron_day_of_month, cron_month_of_year, args::text, kwargs::text,
       options::text, enabled, last_run_at, total_run_count, version,
       config_hash IS NOT NULL
FROM {schema}.beat_entry
ORDER BY name;

-- name: get_entry_for_update
SELECT name, task, interval_seconds, cron_minute, cron_hour, cron_day_of_week,
       cron_day_of_month, cron_month_of_year, args::text, kwargs::text,
       options::text, enabled, last_run_at, total_run_count, version,
       config_hash IS NOT NULL
FROM {schema}.beat_entry
WHERE name = %(name)s
FOR UPDATE;

-- name: claim_slot
-- Claim one run: the slot becomes last_run_at. At most one claim of a slot
-- succeeds (last_run_at only moves forward, and a concurrent claim waits
-- for this row and then re-checks the WHERE), and none succeeds for a
-- disabled entry or one changed since the slot was computed. Returns the
-- definition to send.
UPDATE {schema}.beat_entry
SET last_run_at = %(slot)s,
    total_run_count = total_run_count + 1
WHERE name = %(name)s
  AND enabled
  AND version = %(version)s
  AND last_run_at < %(slot)s
RETURNING task, args::text, kwargs::text, options::text, total_run_count;

-- name: unclaim_slot
-- Give a slot back after its message could not be sent (when the claim
-- committed on its own, see the module docstring).
UPDATE {schema}.beat_entry
SET last_run_at = %(previous)s,
    total_run_count = total_run_count - 1
WHERE name = %(name)s AND last_run_at = %(slot)s;

-- name: skip_to
-- Missed slots older than the catch-up window are skipped: last_run_at
-- moves past them without a run (once: later ticks start from there).
UPDATE {schema}.beat_entry
SET last_run_at = %(skip_to)s
WHERE name = %(name)s AND enabled AND version = %(version)s AND last_run_at < %(skip_to)s;

-- name: upsert_config_entry
-- An entry of beat_schedule. Its definition is written when it differs from
-- what beat_schedule said last time (config_hash), so a runtime change to it
-- lasts until beat_schedule itself changes; enabled, last_run_at and the run
-- count are kept.
INSERT INTO {schema}.beat_entry AS e (
    name, task, interval_seconds, cron_minute, cron_hour, cron_day_of_week,
    cron_day_of_month, cron_month_of_year, args, kwargs, options, config_hash)
VALUES (
    %(name)s, %(task)s, %(interval_seconds)s, %(cron_minute)s, %(cron_hour)s,
    %(cron_day_of_week)s, %(cron_day_of_month)s, %(cron_month_of_year)s,
    %(args)s::jsonb, %(kwargs)s::jsonb, %(options)s::jsonb, %(config_hash)s)
ON CONFLICT (name) DO UPDATE SET
    task = EXCLUDED.task,
    interval_seconds = EXCLUDED.interval_seconds,
    cron_minute = EXCLUDED.cron_minute,
    cron_hour = EXCLUDED.cron_hour,
    cron_day_of_week = EXCLUDED.cron_day_of_week,
    cron_day_of_month = EXCLUDED.cron_day_of_month,
    cron_month_of_year = EXCLUDED.cron_month_of_year,
    args = EXCLUDED.args,
    kwargs = EXCLUDED.kwargs,
    options = EXCLUDED.options,
    config_hash = EXCLUDED.config_hash,
    version = e.version + 1,
    updated_at = now()
WHERE e.config_hash IS DISTINCT FROM EXCLUDED.config_hash;

-- name: delete_stale_config_entries
-- Entries that came from beat_schedule and are no longer in it.
DELETE FROM {schema}.beat_entry
WHERE config_hash IS NOT NULL AND NOT (name = ANY(%(names)s::text[]));

-- name: add_entry
INSERT INTO {schema}.beat_entry (
    name, task, interval_seconds, cron_minute, cron_hour, cron_day_of_week,
    cron_day_of_month, cron_month_of_year, args, kwargs, options, enabled)
VALUES (
    %(name)s, %(task)s, %(interval_seconds)s, %(cron_minute)s, %(cron_hour)s,
    %(cron_day_of_week)s, %(cron_day_of_month)s, %(cron_month_of_year)s,
    %(args)s::jsonb, %(kwargs)s::jsonb, %(options)s::jsonb, %(enabled)s)
ON CONFLICT (name) DO NOTHING
RETURNING name;

-- name: set_entry
-- A runtime change. Enabling a disabled entry restarts its schedule from
-- now: the runs missed while it was disabled are not sent.
UPDATE {schema}.beat_entry
SET task = %(task)s,
    interval_seconds = %(interval_seconds)s,
    cron_minute = %(cron_minute)s,
    cron_hour = %(cron_hour)s,
    cron_day_of_week = %(cron_day_of_week)s,
    cron_day_of_month = %(cron_day_of_month)s,
    cron_month_of_year = %(cron_month_of_year)s,
    args = %(args)s::jsonb,
    kwargs = %(kwargs)s::jsonb,
    options = %(options)s::jsonb,
    last_run_at = CASE WHEN %(enabled)s AND NOT enabled
                       THEN greatest(last_run_at, now()) ELSE last_run_at END,
    enabled = %(enabled)s,
    version = version + 1,
    updated_at = now()
WHERE name = %(name)s;

-- name: remove_entry
DELETE FROM {schema}.beat_entry WHERE name = %(name)s RETURNING name;
