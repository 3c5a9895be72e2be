//! The consuming side of the Redis transport: the partition leases this process
//! holds (renewed by a keeper task), the reader that turns their streams into
//! deliveries (a dead owner's pending entries first), and the fenced ack.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::keys::{GROUP, Keys};
use super::leases::Leases;
use super::scripts::{ACK, LEASE, MOVE_DUE};
use super::writer::Writer;
use crate::transport::{Acknowledge, Delivery, TransportError};

/// How long one blocking read waits for new entries; also the delay mover's period.
pub(super) const POLL: Duration = Duration::from_millis(100);
/// Time allowed for a blocking read to reach the server, on top of its block.
const READ_MARGIN: Duration = Duration::from_millis(50);
/// Entries read or claimed at once, at most.
const BATCH: usize = 64;

/// What the keeper, the reader and the transport share.
pub(super) struct Shared {
    pub keys: Keys,
    /// This process's consumer name in the group and its lease token.
    pub token: String,
    pub lease: Duration,
    pub stagger: Duration,
    leases: std::sync::Mutex<Leases>,
    /// A consume session runs: take free partitions and read.
    pub consuming: AtomicBool,
    /// Bumped by every `consume`, so that an older reader stops.
    pub session: AtomicU64,
    /// Unacknowledged deliveries this process may hold (the prefetch).
    pub permits: Arc<Semaphore>,
}

impl Shared {
    pub fn new(
        keys: Keys,
        token: String,
        lease: Duration,
        stagger: Duration,
        prefetch: u16,
    ) -> Self {
        Shared {
            keys,
            token,
            lease,
            stagger,
            leases: Default::default(),
            consuming: AtomicBool::new(false),
            session: AtomicU64::new(0),
            permits: Arc::new(Semaphore::new(usize::from(prefetch.max(1)))),
        }
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.leases.lock().expect("leases lock")
    }

    /// The partitions whose lease this process holds.
    pub fn held_partitions(&self) -> Vec<u16> {
        self.leases().held()
    }

    /// Forgets every lease (after releasing them, or when abandoning them).
    pub fn forget_all(&self) {
        self.leases().forget_all();
    }

    /// A new session re-claims what the previous one left pending.
    pub fn reclaim_all(&self) {
        self.leases().claim_all_again();
    }

    fn renewed(&self, i: u16, at: Instant, acquired: bool) {
        // Measured from before the request: the server's expiry is later than this.
        let valid_until = at + self.lease - self.lease / 10;
        self.leases().renewed(i, valid_until, acquired);
    }

    fn readable(&self) -> Vec<u16> {
        // A blocking read ends before the lease could expire: what it takes is never
        // taken after another consumer claimed the partition's pending entries.
        self.leases().readable(Instant::now() + POLL + READ_MARGIN)
    }
}

/// A pause of `base` ±50%, so that processes started together take turns.
fn jitter(base: Duration) -> Duration {
    base.mul_f64(0.5 + fastrand::f64())
}

/// Renews the leases this process holds and, while it consumes, takes free ones (one
/// per `stagger` when that is not zero, so that processes started together share the
/// partitions). Runs until aborted by `close`.
pub(super) async fn keep_leases(shared: Arc<Shared>, mut conn: ConnectionManager) {
    let n = shared.keys.partitions();
    let lease_ms = shared.lease.as_millis() as u64;
    let tick = if shared.stagger.is_zero() {
        shared.lease / 3
    } else {
        (shared.lease / 3).min(shared.stagger)
    };
    let mut last_acquired: Option<Instant> = None;
    let mut gap = jitter(shared.stagger);
    loop {
        let first = fastrand::u16(..n);
        for j in 0..n {
            let i = (first + j) % n;
            let held = shared.leases().holds(i);
            let may_acquire = shared.consuming.load(Ordering::SeqCst)
                && (shared.stagger.is_zero() || last_acquired.is_none_or(|t| t.elapsed() >= gap));
            if !held && !may_acquire {
                continue;
            }
            let at = Instant::now();
            let result: redis::RedisResult<i64> = LEASE
                .key(shared.keys.lease(i))
                .arg(&shared.token)
                .arg(lease_ms)
                .arg(if may_acquire { "1" } else { "0" })
                .invoke_async(&mut conn)
                .await;
            match result {
                Ok(1) => shared.renewed(i, at, false),
                Ok(2) => {
                    shared.renewed(i, at, true);
                    last_acquired = Some(Instant::now());
                    gap = jitter(shared.stagger);
                    tracing::info!(partition = i, "took the lease of a Redis partition");
                }
                Ok(_) => {
                    if held {
                        shared.leases().lost(i);
                        tracing::warn!(
                            partition = i,
                            "lost the lease of a Redis partition to another consumer"
                        );
                    }
                }
                Err(e) => {
                    // Not renewed: the partition stops being read once the lease may
                    // have expired (`valid_until`), and its acks are fenced.
                    tracing::warn!(error = %e, "cannot renew Redis partition leases; retrying");
                    break;
                }
            }
        }
        tokio::time::sleep(tick).await;
    }
}

/// Reads the partitions this process holds for one consume session and sends their
/// entries on `tx`: first a partition's pending entries (a previous owner's unacked
/// deliveries, in order), then new ones. Ends when the session stops, nobody listens,
/// or a Redis command fails (the connection was lost).
pub(super) struct Reader {
    pub shared: Arc<Shared>,
    pub session: u64,
    /// Blocking reads only: a blocked connection would hold up other commands.
    pub reading: MultiplexedConnection,
    /// Claims, delay moves.
    pub conn: ConnectionManager,
    /// Acks (which wait for replicas when configured).
    pub writer: Writer,
    pub tx: mpsc::UnboundedSender<Delivery>,
}

impl Reader {
    fn active(&self) -> bool {
        self.shared.consuming.load(Ordering::SeqCst)
            && self.shared.session.load(Ordering::SeqCst) == self.session
            && !self.tx.is_closed()
    }

    pub async fn run(mut self) {
        while self.active() {
            if let Err(e) = self.step().await {
                tracing::warn!(error = %e, "reading Redis failed; the delivery stream ends");
                break;
            }
        }
    }

    async fn step(&mut self) -> redis::RedisResult<()> {
        let to_claim = self.shared.leases().to_claim(Instant::now());
        for (i, ticket) in to_claim {
            self.claim(i, ticket).await?;
        }
        let moved: i64 = MOVE_DUE
            .key(self.shared.keys.delayed())
            .arg(self.shared.keys.stream_prefix())
            .arg(BATCH)
            .invoke_async(&mut self.conn)
            .await?;
        if moved > 0 {
            tracing::debug!(moved, "delayed messages due");
        }
        let readable = self.shared.readable();
        if readable.is_empty() {
            tokio::time::sleep(POLL).await;
            return Ok(());
        }
        let Some(mut permits) = self.permits(BATCH).await else {
            return Ok(());
        };
        let streams: Vec<String> = readable
            .iter()
            .map(|&i| self.shared.keys.stream(i))
            .collect();
        // COUNT bounds each stream's entries, not the reply's: share the permits out;
        // an entry beyond them waits for one below.
        let count = (permits.len() / streams.len()).max(1);
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.shared.token)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(POLL.as_millis() as u64)
            .arg("STREAMS")
            .arg(&streams)
            .arg(vec![">"; streams.len()])
            .query_async(&mut self.reading)
            .await?;
        for stream in reply.map(|r| r.keys).unwrap_or_default() {
            let Some(pos) = streams.iter().position(|s| *s == stream.key) else {
                continue;
            };
            for entry in stream.ids {
                let permit = match permits.pop() {
                    Some(p) => p,
                    // Read, so pending to this consumer: if the session ends first,
                    // the next one claims it again.
                    None => match self.one_permit().await {
                        Some(p) => p,
                        None => return Ok(()),
                    },
                };
                self.deliver(readable[pos], entry, false, permit);
            }
        }
        Ok(())
    }

    /// Takes over every entry pending in partition `i`'s group — whoever it was
    /// delivered to: holding the lease proves that consumer is gone or fenced — and
    /// hands out, in stream order and flagged redelivered, those not in hand here
    /// already. `ticket` is the claim's, from [`Leases::to_claim`].
    async fn claim(&mut self, i: u16, ticket: u64) -> redis::RedisResult<()> {
        let stream = self.shared.keys.stream(i);
        let mut cursor = "0-0".to_string();
        loop {
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&stream)
                .arg(GROUP)
                .arg(&self.shared.token)
                .arg(0)
                .arg(&cursor)
                .arg("COUNT")
                .arg(BATCH)
                .query_async(&mut self.conn)
                .await?;
            for entry in reply.claimed {
                if self.shared.leases().in_hand(i, &entry.id) {
                    // Its delivery lives here and settles it: acked, or claimed again.
                    continue;
                }
                let Some(permit) = self.one_permit().await else {
                    return Ok(());
                };
                self.deliver(i, entry, true, permit);
            }
            if reply.next_stream_id == "0-0" {
                break;
            }
            cursor = reply.next_stream_id;
        }
        self.shared.leases().claimed(i, ticket);
        Ok(())
    }

    /// One delivery permit, waiting as long as the session lasts.
    async fn one_permit(&self) -> Option<OwnedSemaphorePermit> {
        while self.active() {
            if let Some(mut p) = self.permits(1).await {
                return p.pop();
            }
        }
        None
    }

    /// Up to `n` delivery permits, waiting at most one poll for the first.
    async fn permits(&self, n: usize) -> Option<Vec<OwnedSemaphorePermit>> {
        let first = tokio::time::timeout(POLL, self.shared.permits.clone().acquire_owned())
            .await
            .ok()?
            .ok()?;
        let mut permits = vec![first];
        while permits.len() < n {
            match self.shared.permits.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        Some(permits)
    }

    fn deliver(&self, i: u16, entry: StreamId, redelivered: bool, permit: OwnedSemaphorePermit) {
        // An entry skald did not write has no body field: delivered empty, it is
        // dead-lettered as malformed rather than left pending.
        let body: Vec<u8> = entry.get("b").unwrap_or_default();
        self.shared.leases().handed_out(i, &entry.id);
        let acker = RedisAcker {
            writer: self.writer.clone(),
            lease: self.shared.keys.lease(i),
            stream: self.shared.keys.stream(i),
            token: self.shared.token.clone(),
            in_hand: InHand {
                shared: self.shared.clone(),
                partition: i,
                id: entry.id,
                acked: false,
                _permit: permit,
            },
        };
        let _ = self
            .tx
            .send(Delivery::new(body, redelivered, Box::new(acker)));
    }
}

/// An entry handed out: holds a prefetch permit until settled, and settles it when
/// dropped — acked, or not, and then its partition is claimed again so that the entry,
/// still pending, is delivered again.
struct InHand {
    shared: Arc<Shared>,
    partition: u16,
    id: String,
    acked: bool,
    _permit: OwnedSemaphorePermit,
}

impl Drop for InHand {
    fn drop(&mut self) {
        self.shared
            .leases()
            .settled(self.partition, &self.id, self.acked);
    }
}

/// Acks one stream entry, fenced by its partition's lease (see [`ACK`]).
struct RedisAcker {
    writer: Writer,
    lease: String,
    stream: String,
    token: String,
    in_hand: InHand,
}

impl Acknowledge for RedisAcker {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async move {
            let mut this = *self;
            let mut invocation = ACK.prepare_invoke();
            invocation
                .key(&this.lease)
                .key(&this.stream)
                .arg(&this.token)
                .arg(GROUP)
                .arg(&this.in_hand.id);
            let acked: i64 = this.writer.script(&ACK, &invocation).await?;
            if acked == 1 {
                this.in_hand.acked = true;
                return Ok(());
            }
            Err(TransportError::NotAccepted(format!(
                "{} is not this process's now: its lease is held by another consumer or \
                 lapsed, so entry {} stays pending and is delivered again",
                this.stream, this.in_hand.id
            )))
        })
    }
}
