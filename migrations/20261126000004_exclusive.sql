-- `isolation: exclusive`: a start that finds another live instance of its saga on the
-- same aggregate is recorded as `waiting`, and promoted when that one is terminal.
ALTER TABLE skald.instances DROP CONSTRAINT instances_status_check;
ALTER TABLE skald.instances ADD CONSTRAINT instances_status_check
    CHECK (status IN ('waiting', 'running', 'compensating', 'completed', 'compensated', 'failed'));
CREATE INDEX instances_waiting ON skald.instances (saga, aggregate_id, created_at)
    WHERE status = 'waiting';

ALTER TABLE skald.inbox DROP CONSTRAINT inbox_disposition_check;
ALTER TABLE skald.inbox ADD CONSTRAINT inbox_disposition_check
    CHECK (disposition IN ('applied', 'skipped', 'stale', 'queued'));
