-- A new dead-letter kind: an instance parked at start-up because its saga version is
-- no longer loaded (`skald run --orphaned=park`); replaying it resumes the instance.
ALTER TABLE skald.dead_letters DROP CONSTRAINT dead_letters_kind_check;
ALTER TABLE skald.dead_letters ADD CONSTRAINT dead_letters_kind_check
    CHECK (kind IN ('malformed', 'unprocessable', 'exhausted', 'compensation_failed', 'orphaned'));
