-- A transfer between two accounts, as the core-banking application ran it: one
-- database transaction.
--
-- This is the flow that sagas/transfer_funds.yaml replaces. The two accounts belong to
-- different branches: as long as every branch's accounts lived in one database, the
-- transfer could lock both rows and commit once. Once the branches run their own
-- databases (or services), there is no transaction spanning both, and the flow becomes
-- a saga: debit the source branch, credit the destination branch, record the ledger
-- entry both branches reconcile against.
--
-- `skald scaffold sagas/transfer_funds.legacy.sql --name transfer_funds` drafts the
-- saga from this file (README, "Migrating a legacy transaction").
--
-- Runnable with psql against the tables created by the saga's `setup:`:
--   psql -v transfer_id=t-1 -v from_account=north-001 -v to_account=south-001 \
--        -v amount=250.00 -f sagas/transfer_funds.legacy.sql
-- The application checked row counts; the `\if` blocks below do the same.

\set ON_ERROR_STOP on

BEGIN;

-- Lock the source account; its balance must cover the amount, and today's withdrawals
-- with this one must stay within the account's daily limit.
SELECT 1
  FROM bank.accounts
 WHERE account_id = :'from_account'
   AND balance >= :amount
   AND withdrawn_today + :amount <= daily_limit
   FOR UPDATE;
SELECT :ROW_COUNT = 1 AS allowed \gset
\if :allowed
\else
  \echo 'insufficient funds or over the daily limit: rolling back'
  ROLLBACK;
  \quit
\endif

-- Debit the source account (its branch), counting the amount against today's limit.
UPDATE bank.accounts
   SET balance = balance - :amount,
       withdrawn_today = withdrawn_today + :amount
 WHERE account_id = :'from_account';

-- Credit the destination account (the other branch).
UPDATE bank.accounts
   SET balance = balance + :amount
 WHERE account_id = :'to_account';
SELECT :ROW_COUNT = 1 AS credited \gset
\if :credited
\else
  \echo 'unknown destination account: rolling back'
  ROLLBACK;
  \quit
\endif

-- The ledger entry both branches reconcile against.
INSERT INTO bank.ledger (transfer_id, from_account, to_account, amount)
VALUES (:'transfer_id', :'from_account', :'to_account', :amount)
RETURNING entry_id;

COMMIT;
