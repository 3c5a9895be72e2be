-- What the business sees of one checkout: `skald explore` compares these after every
-- fault. A completed saga must leave what the legacy transaction leaves when it
-- commits; a compensated one what it leaves when it rolls back (nothing). Released
-- reservations and refunded payments are what compensation leaves behind, and the
-- business does not count them, so they are filtered out. Parameters are the start
-- payload's fields.
SELECT sku, available FROM shop.stock WHERE sku = :sku;
SELECT account_id, balance FROM shop.accounts WHERE account_id = :account;
SELECT order_id, sku, qty FROM shop.reservations WHERE order_id = :order_id AND NOT released;
SELECT order_id, account_id, amount FROM shop.payments WHERE order_id = :order_id AND NOT refunded;
SELECT order_id, sku, qty FROM shop.shipments WHERE order_id = :order_id;
