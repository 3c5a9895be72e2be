-- Order checkout as the legacy application ran it: one database transaction.
--
-- This is the flow that sagas/order_checkout.yaml replaces. Everything happens between
-- BEGIN and COMMIT, so a failure anywhere is undone by ROLLBACK and nothing needs
-- compensating. The price: the stock row and the account row stay locked until the
-- whole checkout commits, and all three tables (in practice: stock, billing and the
-- warehouse) must live in the same database and be reachable at the same moment.
--
-- The saga keeps the same statements but gives each step its own short transaction:
--   reserve_stock   = statements 1 + 2
--   charge_account  = statements 3 + 4 (the payment id becomes the step's output)
--   create_shipment = statement 5 (the pivot)
-- and replaces ROLLBACK with compensations (release the reservation, refund the
-- payment) for the steps that already committed.
--
-- Runnable with psql against the tables created by the saga's `setup:`:
--   psql -v order_id=order-1 -v sku=SKU-1 -v qty=3 -v account=alice -v amount=25.50 \
--        -f sagas/order_checkout.legacy.sql
-- The application checked each statement's row count; the `\if` blocks below do the same.

\set ON_ERROR_STOP on

BEGIN;

-- 1. Take the items out of stock, only if enough are available.
UPDATE shop.stock
   SET available = available - :qty
 WHERE sku = :'sku'
   AND available >= :qty;
SELECT :ROW_COUNT = 1 AS reserved \gset
\if :reserved
\else
  \echo 'out of stock: rolling back'
  ROLLBACK;
  \quit
\endif

-- 2. Remember the reservation for the order (released = false).
INSERT INTO shop.reservations (order_id, sku, qty)
VALUES (:'order_id', :'sku', :qty);

-- 3. Debit the customer's account, only if the balance covers the amount.
UPDATE shop.accounts
   SET balance = balance - :amount
 WHERE account_id = :'account'
   AND balance >= :amount;
SELECT :ROW_COUNT = 1 AS charged \gset
\if :charged
\else
  \echo 'insufficient funds: rolling back'
  ROLLBACK;
  \quit
\endif

-- 4. Record the payment; its id went on the invoice.
INSERT INTO shop.payments (order_id, account_id, amount)
VALUES (:'order_id', :'account', :amount)
RETURNING payment_id;

-- 5. Hand the order to the warehouse.
INSERT INTO shop.shipments (order_id, sku, qty)
VALUES (:'order_id', :'sku', :qty);

COMMIT;
