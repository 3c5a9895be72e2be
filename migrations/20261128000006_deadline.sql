-- The saga's deadline (start + timeout_ms), kept with the instance so that operator
-- actions (retry, cancel, resume) and dead-letter replays, which send new messages,
-- keep it. NULL: the saga has no timeout.
ALTER TABLE skald.instances ADD COLUMN deadline timestamptz;
