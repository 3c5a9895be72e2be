//! Participant services: the library a service uses to take part in sagas (and to
//! consume plain events) with skald's guarantees, and the wire protocol it shares with
//! skald ([`wire`]).

pub mod wire;
