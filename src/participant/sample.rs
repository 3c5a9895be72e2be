//! The three example services of the sample flow, each with its own database: stock
//! (`reserve_stock`, `release_stock`), payments (`charge_card`, `refund_card`) and
//! shipping (`create_shipment`). `examples/*_service.rs` and `skald participant sample
//! <service>` run them; the tests reuse their handlers.
//!
//! Business refusals (no such SKU, not enough stock, unknown account, insufficient
//! funds, a bad parameter) are [`HandlerError::Fatal`]: the saga compensates.
//! Everything a handler writes is keyed by the message id where it creates a row, so
//! even outside the participant's guarantees a repeat would not create a second one.

use std::process::ExitCode;

use serde_json::{Map, Value};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::builder::{ParticipantBuilder, ParticipantError, connect_pool};
use super::consumer::Participant;
use super::faults::ParticipantFaults;
use super::handler::{HandlerError, HandlerFuture, Incoming};
use crate::config::Config;
use crate::transport::Endpoint;

/// One of the sample services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sample {
    /// `reserve_stock` {order_id, sku, qty} → {reservation_id}; `release_stock`
    /// {reservation_id} → {reservation_id, released}.
    Stock,
    /// `charge_card` {order_id, account, amount} → {payment_id}; `refund_card`
    /// {payment_id} → {payment_id, refunded}.
    Payments,
    /// `create_shipment` {order_id, sku, qty} → {shipment_id}.
    Shipping,
}

/// The variable naming a sample service's database (default
/// `postgres://postgres@127.0.0.1:5432/skald_<service>`).
pub const DATABASE_URL_VAR: &str = "SERVICE_DATABASE_URL";

const STOCK_SETUP: &str = r"
CREATE SCHEMA IF NOT EXISTS stock;
CREATE TABLE IF NOT EXISTS stock.items (
    sku       text PRIMARY KEY,
    available int  NOT NULL CHECK (available >= 0)
);
CREATE TABLE IF NOT EXISTS stock.reservations (
    reservation_id uuid        PRIMARY KEY,
    order_id       text        NOT NULL,
    sku            text        NOT NULL,
    qty            int         NOT NULL,
    released       boolean     NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now()
);
INSERT INTO stock.items (sku, available)
VALUES ('SKU-1', 1000000000), ('SKU-2', 1000000000), ('SKU-3', 1000000000)
ON CONFLICT DO NOTHING;
";

const PAYMENTS_SETUP: &str = r"
CREATE SCHEMA IF NOT EXISTS payments;
CREATE TABLE IF NOT EXISTS payments.accounts (
    account text          PRIMARY KEY,
    balance numeric(14,2) NOT NULL CHECK (balance >= 0)
);
CREATE TABLE IF NOT EXISTS payments.payments (
    payment_id uuid          PRIMARY KEY,
    order_id   text          NOT NULL,
    account    text          NOT NULL,
    amount     numeric(14,2) NOT NULL,
    refunded   boolean       NOT NULL DEFAULT false,
    created_at timestamptz   NOT NULL DEFAULT now()
);
INSERT INTO payments.accounts (account, balance)
VALUES ('alice', 1000000000), ('bob', 1000000000)
ON CONFLICT DO NOTHING;
";

const SHIPPING_SETUP: &str = r"
CREATE SCHEMA IF NOT EXISTS shipping;
CREATE TABLE IF NOT EXISTS shipping.shipments (
    shipment_id uuid        PRIMARY KEY,
    order_id    text        UNIQUE NOT NULL,
    sku         text        NOT NULL,
    qty         int         NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
";

impl Sample {
    /// The service's name (its endpoint).
    pub fn name(self) -> &'static str {
        match self {
            Sample::Stock => "stock",
            Sample::Payments => "payments",
            Sample::Shipping => "shipping",
        }
    }

    /// The database it uses unless told otherwise.
    pub fn default_database_url(self) -> String {
        format!("postgres://postgres@127.0.0.1:5432/skald_{}", self.name())
    }

    /// Creates the service's own tables (idempotent; concurrent starts wait for each
    /// other) and seeds them: SKU-1..3 with 10⁹ items; accounts alice and bob with 10⁹.
    pub async fn setup(self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let sql = match self {
            Sample::Stock => STOCK_SETUP,
            Sample::Payments => PAYMENTS_SETUP,
            Sample::Shipping => SHIPPING_SETUP,
        };
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('skald_sample_' || $1))")
            .bind(self.name())
            .execute(&mut *tx)
            .await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    /// Registers the service's handlers.
    pub fn register(self, builder: ParticipantBuilder) -> ParticipantBuilder {
        match self {
            Sample::Stock => builder
                .handler("reserve_stock", reserve_stock)
                .handler("release_stock", release_stock),
            Sample::Payments => builder
                .handler("charge_card", charge_card)
                .handler("refund_card", refund_card),
            Sample::Shipping => builder.handler("create_shipment", create_shipment),
        }
    }

    /// Runs the service until `shutdown`: its database (created if missing), tables,
    /// transport on its endpoint, handlers.
    pub async fn run(
        self,
        database_url: &str,
        config: &Config,
        faults: ParticipantFaults,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), ParticipantError> {
        let pool = connect_pool(database_url, 5).await?;
        self.setup(&pool).await?;
        let transport =
            crate::transport::connect(config, Endpoint::Service(self.name().into())).await?;
        let builder = Participant::builder(self.name())
            .pool(pool)
            .transport(transport)
            .faults(faults)
            .shutdown_timeout(config.shutdown_timeout);
        self.register(builder).build().await?.run(shutdown).await
    }
}

/// The `main` of `examples/<service>_service.rs`: reads `SERVICE_DATABASE_URL`,
/// `AMQP_URL`, `SKALD_NAMESPACE`, `SKALD_PARTITIONS` (and the other `SKALD_*` broker
/// settings), `SKALD_PARTICIPANT_CRASH_AT`; runs until Ctrl-C or SIGTERM.
pub fn main(sample: Sample) -> ExitCode {
    // Kept to the end of `main`: dropping it flushes the spans not yet exported.
    let _telemetry = match crate::telemetry::init(sample.name()) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let run = async {
        let config = Config::from_env().map_err(|e| ParticipantError::Config(e.to_string()))?;
        let faults = ParticipantFaults::from_env().map_err(ParticipantError::Config)?;
        let url = std::env::var(DATABASE_URL_VAR).unwrap_or_else(|_| sample.default_database_url());
        sample
            .run(&url, &config, faults, crate::app::shutdown_signal())
            .await
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn field<'a>(payload: &'a Map<String, Value>, name: &str) -> Result<&'a Value, HandlerError> {
    payload
        .get(name)
        .ok_or_else(|| HandlerError::Fatal(format!("payload.{name} is missing")))
}

fn text<'a>(payload: &'a Map<String, Value>, name: &str) -> Result<&'a str, HandlerError> {
    field(payload, name)?
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| HandlerError::Fatal(format!("payload.{name} must be non-empty text")))
}

fn quantity(payload: &Map<String, Value>) -> Result<i32, HandlerError> {
    field(payload, "qty")?
        .as_i64()
        .and_then(|q| i32::try_from(q).ok())
        .filter(|q| *q > 0)
        .ok_or_else(|| {
            HandlerError::Fatal("payload.qty must be an integer from 1 to 2^31-1".into())
        })
}

fn uuid_field(payload: &Map<String, Value>, name: &str) -> Result<Uuid, HandlerError> {
    text(payload, name)?
        .parse()
        .map_err(|_| HandlerError::Fatal(format!("payload.{name} must be a UUID")))
}

/// The amount as exact decimal text: a positive JSON number or decimal string.
fn amount(payload: &Map<String, Value>) -> Result<String, HandlerError> {
    let text = match field(payload, "amount")? {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        _ => String::new(),
    };
    let valid = text.parse::<f64>().is_ok_and(|a| a > 0.0 && a.is_finite());
    if valid {
        Ok(text)
    } else {
        Err(HandlerError::Fatal(
            "payload.amount must be a number greater than 0".into(),
        ))
    }
}

fn output(name: &str, value: impl Into<Value>) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert(name.into(), value.into());
    out
}

/// `reserve_stock` {order_id, sku, qty}: takes `qty` of `sku` out of stock.
pub fn reserve_stock<'a>(conn: &'a mut PgConnection, msg: Incoming) -> HandlerFuture<'a> {
    Box::pin(async move {
        let order_id = text(&msg.payload, "order_id")?;
        let sku = text(&msg.payload, "sku")?;
        let qty = quantity(&msg.payload)?;
        let available: Option<i32> = sqlx::query_scalar(
            "UPDATE stock.items SET available = available - $2 \
             WHERE sku = $1 AND available >= $2 RETURNING available",
        )
        .bind(sku)
        .bind(qty)
        .fetch_optional(&mut *conn)
        .await?;
        if available.is_none() {
            let have: Option<i32> =
                sqlx::query_scalar("SELECT available FROM stock.items WHERE sku = $1")
                    .bind(sku)
                    .fetch_optional(&mut *conn)
                    .await?;
            return Err(HandlerError::Fatal(match have {
                None => format!("unknown sku {sku:?}"),
                Some(n) => format!("insufficient stock: {sku} has {n}, {qty} requested"),
            }));
        }
        let reservation_id = Uuid::new_v5(&msg.message_id, b"reservation");
        sqlx::query(
            "INSERT INTO stock.reservations (reservation_id, order_id, sku, qty) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(reservation_id)
        .bind(order_id)
        .bind(sku)
        .bind(qty)
        .execute(&mut *conn)
        .await?;
        Ok(output("reservation_id", reservation_id.to_string()))
    })
}

/// `release_stock` {reservation_id}: puts a reservation's items back (once; releasing
/// a released reservation changes nothing).
pub fn release_stock<'a>(conn: &'a mut PgConnection, msg: Incoming) -> HandlerFuture<'a> {
    Box::pin(async move {
        let id = uuid_field(&msg.payload, "reservation_id")?;
        let undo = Undo {
            mark: "UPDATE stock.reservations SET released = true \
                   WHERE reservation_id = $1 AND NOT released RETURNING sku, qty::text",
            put_back: "UPDATE stock.items SET available = available + $2::int WHERE sku = $1",
            exists: "SELECT EXISTS (SELECT 1 FROM stock.reservations WHERE reservation_id = $1)",
            what: "reservation",
        };
        undo.run(conn, id).await?;
        let mut out = output("reservation_id", id.to_string());
        out.insert("released".into(), Value::Bool(true));
        Ok(out)
    })
}

/// A compensation that undoes a row once: `mark` flags row `$1` undone and returns
/// what to give back (a key and an amount as text) to `put_back`; when nothing was
/// marked, the row was undone already (fine) or never existed (fatal).
struct Undo {
    mark: &'static str,
    put_back: &'static str,
    exists: &'static str,
    what: &'static str,
}

impl Undo {
    async fn run(&self, conn: &mut PgConnection, id: Uuid) -> Result<(), HandlerError> {
        let marked: Option<(String, String)> = sqlx::query_as(self.mark)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
        if let Some((key, amount)) = marked {
            sqlx::query(self.put_back)
                .bind(key)
                .bind(amount)
                .execute(&mut *conn)
                .await?;
            return Ok(());
        }
        let exists: bool = sqlx::query_scalar(self.exists)
            .bind(id)
            .fetch_one(&mut *conn)
            .await?;
        if exists {
            Ok(())
        } else {
            Err(HandlerError::Fatal(format!("no {} {id}", self.what)))
        }
    }
}

/// `charge_card` {order_id, account, amount}: debits `amount` from `account`.
pub fn charge_card<'a>(conn: &'a mut PgConnection, msg: Incoming) -> HandlerFuture<'a> {
    Box::pin(async move {
        let order_id = text(&msg.payload, "order_id")?;
        let account = text(&msg.payload, "account")?;
        let amount = amount(&msg.payload)?;
        let charged: Option<String> = sqlx::query_scalar(
            "UPDATE payments.accounts SET balance = balance - $2::text::numeric(14,2) \
             WHERE account = $1 AND balance >= $2::text::numeric(14,2) RETURNING account",
        )
        .bind(account)
        .bind(&amount)
        .fetch_optional(&mut *conn)
        .await?;
        if charged.is_none() {
            let known: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM payments.accounts WHERE account = $1)",
            )
            .bind(account)
            .fetch_one(&mut *conn)
            .await?;
            return Err(HandlerError::Fatal(if known {
                format!("insufficient funds: account {account} cannot pay {amount}")
            } else {
                format!("unknown account {account:?}")
            }));
        }
        let payment_id = Uuid::new_v5(&msg.message_id, b"payment");
        sqlx::query(
            "INSERT INTO payments.payments (payment_id, order_id, account, amount) \
             VALUES ($1, $2, $3, $4::text::numeric(14,2))",
        )
        .bind(payment_id)
        .bind(order_id)
        .bind(account)
        .bind(&amount)
        .execute(&mut *conn)
        .await?;
        Ok(output("payment_id", payment_id.to_string()))
    })
}

/// `refund_card` {payment_id}: gives a payment back (once).
pub fn refund_card<'a>(conn: &'a mut PgConnection, msg: Incoming) -> HandlerFuture<'a> {
    Box::pin(async move {
        let id = uuid_field(&msg.payload, "payment_id")?;
        let undo = Undo {
            mark: "UPDATE payments.payments SET refunded = true \
                   WHERE payment_id = $1 AND NOT refunded RETURNING account, amount::text",
            put_back: "UPDATE payments.accounts SET balance = balance + $2::numeric \
                       WHERE account = $1",
            exists: "SELECT EXISTS (SELECT 1 FROM payments.payments WHERE payment_id = $1)",
            what: "payment",
        };
        undo.run(conn, id).await?;
        let mut out = output("payment_id", id.to_string());
        out.insert("refunded".into(), Value::Bool(true));
        Ok(out)
    })
}

/// `create_shipment` {order_id, sku, qty}: hands the order to the warehouse (one
/// shipment per order: a second command for the order answers with the first's id).
pub fn create_shipment<'a>(conn: &'a mut PgConnection, msg: Incoming) -> HandlerFuture<'a> {
    Box::pin(async move {
        let order_id = text(&msg.payload, "order_id")?;
        let sku = text(&msg.payload, "sku")?;
        let qty = quantity(&msg.payload)?;
        let shipment_id: Uuid = sqlx::query_scalar(
            "INSERT INTO shipping.shipments (shipment_id, order_id, sku, qty) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (order_id) DO UPDATE SET order_id = EXCLUDED.order_id \
             RETURNING shipment_id",
        )
        .bind(Uuid::new_v5(&msg.message_id, b"shipment"))
        .bind(order_id)
        .bind(sku)
        .bind(qty)
        .fetch_one(&mut *conn)
        .await?;
        Ok(output("shipment_id", shipment_id.to_string()))
    })
}
