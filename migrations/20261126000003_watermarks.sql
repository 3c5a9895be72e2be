-- Per saga and aggregate: the highest start `sequence` applied. Moved forward in the
-- same transaction as the start it belongs to; a start at or below it is stale.
CREATE TABLE skald.watermarks (
    saga         text        NOT NULL,
    aggregate_id text        NOT NULL,
    sequence     bigint      NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (saga, aggregate_id)
);

ALTER TABLE skald.inbox DROP CONSTRAINT inbox_disposition_check;
ALTER TABLE skald.inbox ADD CONSTRAINT inbox_disposition_check
    CHECK (disposition IN ('applied', 'skipped', 'stale'));
