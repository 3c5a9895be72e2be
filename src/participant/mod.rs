//! Participant services: the library a service uses to take part in sagas (and to
//! consume plain events) with skald's guarantees, and the wire protocol it shares with
//! skald ([`wire`]).
//!
//! - [`wire`]: the service message and the reply on the wire, their ids, how a body is read;
//! - [`builder`]: [`Participant::builder`] — name, database, transport, handlers, policy;
//! - [`handler`]: the handler contract ([`Incoming`], [`HandlerError`], [`HandlerFuture`]);
//! - [`consumer`]: a running participant: consume, handle, reply, ack, drain;
//! - [`decide`]: the pure rules (stale or not, the outcome, the reply);
//! - [`policy`]: the retry policy and what a failed try leads to (pure);
//! - [`lanes`]: one message per aggregate at a time in a process;
//! - [`store`]: the `skald_participant` schema and the SQL of handling a message;
//! - [`dead_letters`]: the operator's actions on a service's dead letters;
//! - [`faults`]: `SKALD_PARTICIPANT_CRASH_AT`, for crash tests;
//! - [`sample`]: the three example services (stock, payments, shipping).

pub mod builder;
pub mod consumer;
pub mod dead_letters;
pub mod decide;
pub mod faults;
pub mod handler;
pub mod lanes;
pub mod policy;
pub mod sample;
pub mod store;
pub mod wire;

pub use builder::{ParticipantBuilder, ParticipantError, connect_pool};
pub use consumer::Participant;
pub use handler::{HandlerError, HandlerFuture, Incoming, MessageHandler};
pub use policy::RetryPolicy;
