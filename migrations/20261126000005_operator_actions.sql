-- Every operator action on an instance (retry now, cancel, resume): who, when, what.
CREATE TABLE skald.operator_actions (
    id           bigserial PRIMARY KEY,
    instance_id  uuid        NOT NULL,
    action       text        NOT NULL CHECK (action IN ('retry', 'cancel', 'resume')),
    actor        text        NOT NULL,
    detail       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX operator_actions_instance ON skald.operator_actions (instance_id, at);
