//! Per-aggregate actors (actix).
//!
//! The [`Router`] owns one [`AggregateActor`] per live aggregate and hands it that
//! aggregate's messages in arrival order. The actor is a thin shell over
//! [`crate::engine::Engine`]: it exists to run one message at a time. Its handler
//! returns an [`actix::AtomicResponse`], so the actor takes its next message only
//! after the previous one is committed, published and acked — a plain
//! `ResponseActFuture` would let messages of one aggregate interleave.
//!
//! Idle actors stop: after `idle` without work an actor reports to the router, which
//! removes it only if everything it dispatched to it was processed (so no message is
//! ever sent to a stopping actor), then tells it to stop. Memory therefore follows
//! the number of *active* aggregates, not of aggregates ever seen.
//!
//! Mailboxes are not bounded by actix here (`do_send`); the broker's prefetch
//! (`SKALD_PREFETCH`) bounds how many deliveries are in the process at all, and so
//! what every mailbox together can hold.

mod aggregate;
mod router;

pub use aggregate::AggregateActor;
pub use router::{Dispatch, Router};
