-- 004_beat: the periodic task schedule of celery beat (pgbroker/operations/beat.py).
--
-- Design notes
-- * One row per schedule entry. Entries of the app's beat_schedule are
--   written by the beat process that becomes the leader (config_hash is set
--   on them); entries added at runtime (pgbroker.operations.beat.add_entry) have none.
-- * A schedule is either an interval (interval_seconds) or a crontab (its
--   five fields, as written in crontab(), evaluated in the app's timezone).
-- * last_run_at is the last *slot* claimed, not the time a message was sent:
--   the next slot is computed from it, so every process computes the same
--   slots and a new leader continues where the old one stopped. Claiming a
--   slot is one UPDATE ... WHERE last_run_at < slot, so a slot is claimed
--   once.
-- * version changes with every change of the definition; a claim names
--   the version it was computed from, so a slot computed from an old
--   definition is not claimed.
-- * args, kwargs and options hold Kombu's JSON (datetimes, UUIDs and
--   Decimals round-trip).

CREATE TABLE {schema}.beat_entry (
    name                 text PRIMARY KEY,
    task                 text NOT NULL,
    interval_seconds     double precision CHECK (interval_seconds > 0),
    cron_minute          text,
    cron_hour            text,
    cron_day_of_week     text,
    cron_day_of_month    text,
    cron_month_of_year   text,
    args                 jsonb NOT NULL DEFAULT '[]',
    kwargs               jsonb NOT NULL DEFAULT jsonb_build_object(),
    -- apply_async() options: queue, priority, expires...
    options              jsonb NOT NULL DEFAULT jsonb_build_object(),
    enabled              boolean NOT NULL DEFAULT true,
    last_run_at          timestamptz NOT NULL DEFAULT now(),
    total_run_count      bigint NOT NULL DEFAULT 0,
    version              bigint NOT NULL DEFAULT 1,
    -- Hash of the beat_schedule definition last written; NULL: added at runtime.
    config_hash          text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    -- Exactly one kind of schedule; a crontab has all five fields.
    CHECK ((interval_seconds IS NULL) <> (cron_minute IS NULL)),
    CHECK ((cron_minute IS NULL) = (cron_hour IS NULL)
           AND (cron_minute IS NULL) = (cron_day_of_week IS NULL)
           AND (cron_minute IS NULL) = (cron_day_of_month IS NULL)
           AND (cron_minute IS NULL) = (cron_month_of_year IS NULL))
);
