-- What the business sees of one transfer: `skald explore` compares these after every
-- fault. Both balances, the source's withdrawals counted against its daily limit, and
-- the ledger entry (a reversed one is what compensation leaves behind, and does not
-- count). Parameters are the start payload's fields.
SELECT account_id, balance, withdrawn_today FROM bank.accounts WHERE account_id = :from_account;
SELECT account_id, balance FROM bank.accounts WHERE account_id = :to_account;
SELECT transfer_id, from_account, to_account, amount FROM bank.ledger WHERE transfer_id = :transfer_id AND NOT reversed;
