//! An in-memory transport with the promises of [`Transport`], for unit tests and for
//! `skald explore`. Never a stand-in for a real broker in integration tests.
//!
//! - One FIFO of ready messages: per-key order is publish order, and one consumer at
//!   a time takes them ([`MemoryTransport::next`]).
//! - A taken delivery stays *unacked* until acked; [`MemoryTransport::crash`] (the
//!   consumer died) puts every unacked delivery back at the head of the queue, in
//!   the order they were taken, flagged redelivered.
//! - Delayed messages wait in a list of their own and become ready when their delay has
//!   passed, never earlier ([`MemoryTransport::new`]); or, in *logical time*
//!   ([`MemoryTransport::logical_time`], for `explore`), as soon as nothing else is
//!   ready, shortest delay first — time is not what `explore` tests, order is.
//! - Dead letters are kept with their reason.
//!
//! - Endpoints: every clone shares one in-memory broker; [`MemoryTransport::endpoint`]
//!   gives the transport of another endpoint (a participant service's queues), and
//!   [`Transport::send_to`] publishes to it.
//!
//! Faults can be injected on purpose: lose the next publish confirm (the message does
//! go out, the publisher hears an error), deliver the next message twice, or let the
//! previous delivery come again after the next one (an old message overtaking).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use tokio::sync::Notify;

use super::{Acknowledge, Delivery, Endpoint, Transport, TransportError};

/// A message that cannot be processed, kept with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The body.
    pub body: Vec<u8>,
    /// The reason code.
    pub code: String,
    /// The reason, for a person.
    pub reason: String,
}

#[derive(Debug, Clone)]
struct Queued {
    body: Vec<u8>,
    redelivered: bool,
}

#[derive(Debug, Default)]
struct State {
    ready: VecDeque<Queued>,
    /// Delayed messages by (when due, arrival): in real time, milliseconds since
    /// `epoch`; in logical time, the delay itself (shorter delays first).
    delayed: BTreeMap<(u64, u64), Queued>,
    /// Time starts here (for due times); `None`: logical time.
    epoch: Option<Instant>,
    unacked: BTreeMap<u64, Queued>,
    dead: Vec<DeadLetter>,
    next_tag: u64,
    /// The body of the last delivery taken, for [`MemoryTransport::overtake_next`].
    last_taken: Option<Vec<u8>>,
    lose_next_confirm: bool,
    duplicate_next: bool,
    overtake_next: bool,
    stopped: bool,
}

/// The in-memory transport of one endpoint. Cheap to clone; clones share the queues.
#[derive(Debug, Clone)]
pub struct MemoryTransport {
    state: Arc<Mutex<State>>,
    arrived: Arc<Notify>,
    /// Every endpoint's queues on this in-memory broker, this one's included.
    endpoints: Arc<Mutex<Registry>>,
    home: Endpoint,
}

/// The queues (and their wake-up) of each endpoint of one in-memory broker.
type Registry = std::collections::HashMap<Endpoint, (Arc<Mutex<State>>, Arc<Notify>)>;

struct MemoryAck {
    state: Arc<Mutex<State>>,
    tag: u64,
}

impl Acknowledge for MemoryAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async move {
            self.state
                .lock()
                .expect("transport lock")
                .unacked
                .remove(&self.tag);
            Ok(())
        })
    }
}

impl Default for MemoryTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryTransport {
    /// An empty transport on the real clock: a delayed message is delivered once its
    /// delay has passed.
    pub fn new() -> Self {
        Self::with_epoch(Some(Instant::now()))
    }

    /// An empty transport in logical time: a delayed message is delivered as soon as
    /// nothing else is ready (shortest delay first), without waiting.
    pub fn logical_time() -> Self {
        Self::with_epoch(None)
    }

    fn with_epoch(epoch: Option<Instant>) -> Self {
        let queues = Self::queues(epoch);
        let endpoints = Arc::new(Mutex::new(Registry::from([(
            Endpoint::Orchestrator,
            queues.clone(),
        )])));
        MemoryTransport {
            state: queues.0,
            arrived: queues.1,
            endpoints,
            home: Endpoint::Orchestrator,
        }
    }

    fn queues(epoch: Option<Instant>) -> (Arc<Mutex<State>>, Arc<Notify>) {
        let state = State {
            epoch,
            ..State::default()
        };
        (Arc::new(Mutex::new(state)), Arc::new(Notify::new()))
    }

    /// The transport of endpoint `to` on the same in-memory broker (its queues are
    /// created empty, on the same clock, the first time it is asked for).
    pub fn endpoint(&self, to: &Endpoint) -> MemoryTransport {
        let epoch = self.lock().epoch;
        let (state, arrived) = self
            .endpoints
            .lock()
            .expect("endpoints lock")
            .entry(to.clone())
            .or_insert_with(|| Self::queues(epoch))
            .clone();
        MemoryTransport {
            state,
            arrived,
            endpoints: self.endpoints.clone(),
            home: to.clone(),
        }
    }

    /// The endpoint this transport consumes.
    pub fn home(&self) -> &Endpoint {
        &self.home
    }

    /// Milliseconds since the epoch (0 in logical time).
    fn now_ms(s: &State) -> u64 {
        s.epoch.map_or(0, |e| e.elapsed().as_millis() as u64)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("transport lock")
    }

    fn enqueue(&self, body: Vec<u8>, delay_ms: u64) {
        {
            let mut s = self.lock();
            let q = Queued {
                body,
                redelivered: false,
            };
            if delay_ms > 0 {
                s.next_tag += 1;
                let order = s.next_tag;
                // Real time: due at now + delay, rounded up so never early.
                let due = Self::now_ms(&s) + delay_ms + u64::from(s.epoch.is_some());
                s.delayed.insert((due, order), q);
            } else {
                s.ready.push_back(q);
            }
        }
        self.arrived.notify_waiters();
    }

    /// Takes the next delivery: the head of the ready queue (delayed messages join it
    /// when due; in logical time, when nothing else is ready). `None` when nothing is
    /// ready now (unacked and not-yet-due ones excepted).
    pub fn next(&self) -> Option<Delivery> {
        let mut s = self.lock();
        match s.epoch {
            Some(_) => {
                let now = Self::now_ms(&s);
                while let Some(entry) = s.delayed.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    let q = entry.remove();
                    s.ready.push_back(q);
                }
            }
            None => {
                if s.ready.is_empty()
                    && let Some((_, q)) = s.delayed.pop_first()
                {
                    s.ready.push_back(q);
                }
            }
        }
        let mut q = s.ready.pop_front()?;
        if std::mem::take(&mut s.duplicate_next) {
            s.ready.push_front(Queued {
                body: q.body.clone(),
                redelivered: false,
            });
        }
        if std::mem::take(&mut s.overtake_next)
            && let Some(old) = s.last_taken.clone()
        {
            // The previous message comes again right after this one.
            s.ready.push_front(Queued {
                body: old,
                redelivered: true,
            });
        }
        s.last_taken = Some(q.body.clone());
        s.next_tag += 1;
        let tag = s.next_tag;
        let redelivered = std::mem::take(&mut q.redelivered);
        s.unacked.insert(
            tag,
            Queued {
                body: q.body.clone(),
                redelivered: true,
            },
        );
        drop(s);
        Some(Delivery::new(
            q.body,
            redelivered,
            Box::new(MemoryAck {
                state: self.state.clone(),
                tag,
            }),
        ))
    }

    /// The consumer died: every unacked delivery goes back to the head of the queue,
    /// in the order it was taken, flagged redelivered.
    pub fn crash(&self) {
        let mut s = self.lock();
        let unacked = std::mem::take(&mut s.unacked);
        for (_, q) in unacked.into_iter().rev() {
            s.ready.push_front(q);
        }
    }

    /// The next publish confirm is lost: the message goes out, the publisher gets an
    /// error.
    pub fn lose_next_confirm(&self) {
        self.lock().lose_next_confirm = true;
    }

    /// The next delivery is delivered twice.
    pub fn duplicate_next(&self) {
        self.lock().duplicate_next = true;
    }

    /// After the next delivery, the one before it comes again (an old message arriving
    /// after a newer one of the same aggregate).
    pub fn overtake_next(&self) {
        self.lock().overtake_next = true;
    }

    /// Messages ready, delayed and unacked.
    pub fn pending(&self) -> (usize, usize, usize) {
        let s = self.lock();
        (s.ready.len(), s.delayed.len(), s.unacked.len())
    }

    /// The dead letters so far.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.lock().dead.clone()
    }
}

impl Transport for MemoryTransport {
    /// One FIFO holds every key, so per-key order is publish order.
    fn publish<'a>(
        &'a self,
        _key: &'a str,
        body: &'a [u8],
        delay_ms: u64,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            self.enqueue(body.to_vec(), delay_ms);
            if std::mem::take(&mut self.lock().lose_next_confirm) {
                return Err(TransportError::Connection("confirm lost (injected)".into()));
            }
            Ok(())
        })
    }

    fn send_to<'a>(
        &'a self,
        to: &'a Endpoint,
        _key: &'a str,
        body: &'a [u8],
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let target = self.endpoint(to);
            target.enqueue(body.to_vec(), 0);
            if std::mem::take(&mut self.lock().lose_next_confirm) {
                return Err(TransportError::Connection("confirm lost (injected)".into()));
            }
            Ok(())
        })
    }

    fn dead_letter<'a>(
        &'a self,
        body: &'a [u8],
        reason_code: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            self.lock().dead.push(DeadLetter {
                body: body.to_vec(),
                code: reason_code.to_string(),
                reason: reason.to_string(),
            });
            Ok(())
        })
    }

    fn consume(&self) -> BoxFuture<'_, Result<BoxStream<'static, Delivery>, TransportError>> {
        Box::pin(async move {
            self.lock().stopped = false;
            let this = self.clone();
            let stream = futures_util::stream::unfold(this, |t| async move {
                let notify = t.arrived.clone();
                loop {
                    let arrived = notify.notified();
                    if t.lock().stopped {
                        return None;
                    }
                    if let Some(d) = t.next() {
                        return Some((d, t));
                    }
                    // Wake for a new message, or when the earliest delayed one is due.
                    let due_in = {
                        let s = t.lock();
                        let now = Self::now_ms(&s);
                        s.delayed
                            .keys()
                            .next()
                            .map(|(due, _)| Duration::from_millis(due.saturating_sub(now)))
                    };
                    match due_in {
                        Some(wait) => {
                            let _ = tokio::time::timeout(wait, arrived).await;
                        }
                        None => arrived.await,
                    }
                }
            });
            Ok(Box::pin(stream) as BoxStream<'static, Delivery>)
        })
    }

    fn stop_consuming(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.lock().stopped = true;
            self.arrived.notify_waiters();
        })
    }

    fn queue_depths(&self) -> BoxFuture<'_, Result<Vec<(String, u32)>, TransportError>> {
        Box::pin(async move {
            let s = self.lock();
            Ok(vec![
                ("ready".to_string(), s.ready.len() as u32),
                ("delayed".to_string(), s.delayed.len() as u32),
                ("dead".to_string(), s.dead.len() as u32),
            ])
        })
    }

    fn healthy(&self) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.crash();
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Envelope, Outgoing};
    use serde_json::json;

    fn msg(n: u32) -> Outgoing {
        Outgoing::to_intake(Envelope::start("s", Some("k".into()), json!({ "n": n })), 0)
    }

    impl MemoryTransport {
        async fn send(&self, m: &Outgoing) -> Result<(), TransportError> {
            m.send(self).await
        }
    }

    fn n(d: &Delivery) -> u64 {
        let env = Envelope::parse(&d.body).unwrap();
        env.payload["n"].as_u64().unwrap()
    }

    #[tokio::test]
    async fn delivers_in_publish_order_and_forgets_acked_ones() {
        let t = MemoryTransport::new();
        for i in 0..3 {
            t.send(&msg(i)).await.unwrap();
        }
        let mut seen = Vec::new();
        while let Some(d) = t.next() {
            seen.push(n(&d));
            d.ack().await.unwrap();
        }
        assert_eq!(seen, [0, 1, 2]);
        assert_eq!(t.pending(), (0, 0, 0));
    }

    #[tokio::test]
    async fn send_to_reaches_only_the_named_endpoint_and_back() {
        let skald = MemoryTransport::new();
        let stock = Endpoint::Service("stock".into());
        skald.send_to(&stock, "k", b"command").await.unwrap();
        assert!(skald.next().is_none(), "not in skald's own intake");
        let service = skald.endpoint(&stock);
        assert_eq!(service.home(), &stock);
        assert_eq!(service.next().unwrap().body, b"command");
        service
            .send_to(&Endpoint::Orchestrator, "k", b"reply")
            .await
            .unwrap();
        assert_eq!(skald.next().unwrap().body, b"reply");
    }

    #[tokio::test]
    async fn a_crash_redelivers_unacked_deliveries_first_in_order() {
        let t = MemoryTransport::new();
        for i in 0..3 {
            t.send(&msg(i)).await.unwrap();
        }
        let a = t.next().unwrap();
        let b = t.next().unwrap();
        assert!(!a.redelivered);
        drop((a, b));
        t.crash();
        let again: Vec<(u64, bool)> = std::iter::from_fn(|| t.next())
            .map(|d| (n(&d), d.redelivered))
            .collect();
        assert_eq!(again, [(0, true), (1, true), (2, false)]);
    }

    #[tokio::test]
    async fn in_logical_time_delayed_messages_wait_until_nothing_else_is_ready() {
        let t = MemoryTransport::logical_time();
        let mut late = msg(9);
        late.delay_ms = 500;
        t.send(&late).await.unwrap();
        t.send(&msg(1)).await.unwrap();
        let order: Vec<u64> = std::iter::from_fn(|| t.next()).map(|d| n(&d)).collect();
        assert_eq!(order, [1, 9]);
    }

    #[tokio::test]
    async fn on_the_real_clock_a_delayed_message_is_never_early() {
        let t = MemoryTransport::new();
        let mut late = msg(9);
        late.delay_ms = 200;
        let sent = Instant::now();
        t.send(&late).await.unwrap();
        assert!(t.next().is_none(), "not before its delay");
        let mut stream = t.consume().await.unwrap();
        use futures_util::StreamExt;
        let d = stream.next().await.unwrap();
        assert_eq!(n(&d), 9);
        assert!(sent.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn injected_faults_lose_a_confirm_duplicate_and_overtake() {
        let t = MemoryTransport::new();
        t.lose_next_confirm();
        assert!(
            t.send(&msg(0)).await.is_err(),
            "the publisher hears an error"
        );
        assert_eq!(t.pending().0, 1, "but the message went out");
        t.send(&msg(1)).await.unwrap();
        t.duplicate_next();
        let order: Vec<u64> = std::iter::from_fn(|| t.next()).map(|d| n(&d)).collect();
        assert_eq!(order, [0, 0, 1]);

        t.send(&msg(2)).await.unwrap();
        t.send(&msg(3)).await.unwrap();
        assert_eq!(n(&t.next().unwrap()), 2);
        t.overtake_next();
        let order: Vec<u64> = std::iter::from_fn(|| t.next()).map(|d| n(&d)).collect();
        assert_eq!(
            order,
            [3, 2],
            "the older message comes again after the newer"
        );
    }

    #[tokio::test]
    async fn dead_letters_are_kept_with_their_reason() {
        let t = MemoryTransport::new();
        t.dead_letter(b"x", "malformed", "not json").await.unwrap();
        assert_eq!(t.dead_letters()[0].code, "malformed");
    }
}
