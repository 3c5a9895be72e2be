-- Failure groups: an action on a whole group (retry its members, discard their dead
-- letters) is recorded once more as a group action, with no single instance.
ALTER TABLE skald.operator_actions ALTER COLUMN instance_id DROP NOT NULL;
ALTER TABLE skald.operator_actions DROP CONSTRAINT operator_actions_action_check;
ALTER TABLE skald.operator_actions ADD CONSTRAINT operator_actions_action_check
    CHECK (action IN ('retry', 'cancel', 'resume', 'retry_group', 'discard_group'));
