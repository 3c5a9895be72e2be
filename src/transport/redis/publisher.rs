//! The publishing side of the Redis transport: one task per transport that sends
//! every waiting write — publish, delayed publish, send to another endpoint, dead
//! letter — in one pipeline.
//!
//! A write is queued at the call, before its future is first polled, and the queue is
//! sent in order, one batch at a time, so the entries of a stream follow the order of
//! the calls even when a caller has many publishes in flight at once and polls or
//! awaits them in any order. Sending each on its own would not keep it: the
//! connection's request queue is bounded, and a publish that has to wait for room in
//! it (or whose task ran out of its cooperative budget) is overtaken by a later one
//! that is polled first. A burst of publishes also costs one round trip, and with
//! `WAIT` one wait, instead of one each.

use std::collections::HashSet;

use futures_util::future::BoxFuture;
use redis::Cmd;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::create_group;
use super::keys::Keys;
use super::writer::{WriteError, Writer};
use crate::transport::TransportError;

/// At most this many writes go into one pipeline.
const MAX_BATCH: usize = 1_000;

/// One write waiting for its batch.
struct Pending {
    write: Write,
    done: oneshot::Sender<Result<(), WriteError>>,
}

/// What one write sends.
struct Write {
    /// `XADD`, or the `EVAL` that schedules a delayed message.
    cmd: Cmd,
    /// The queues the write goes to, when their consumer groups may not exist yet
    /// (another endpoint's, on [`Transport::send_to`](crate::transport::Transport::send_to)).
    groups: Option<Keys>,
}

/// Queues writes for the task that sends them.
pub(super) struct Publisher {
    /// `None` once closed.
    queue: std::sync::Mutex<Option<mpsc::UnboundedSender<Pending>>>,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Publisher {
    /// Starts the task on `writer`'s connection; the consumer groups of `ready` exist
    /// already. The task ends once the publisher is closed or dropped and what was
    /// queued before is answered.
    pub fn start(writer: Writer, ready: Keys) -> Publisher {
        let (queue, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(writer, HashSet::from([ready]), rx));
        Publisher {
            queue: std::sync::Mutex::new(Some(queue)),
            task: std::sync::Mutex::new(Some(task)),
        }
    }

    /// Queues `cmd` (at the call, so the order of calls is kept), after creating the
    /// consumer groups of `groups` if this transport has not yet, and resolves once
    /// its batch counts as done. Fails at once when the publisher is closed.
    pub fn write(
        &self,
        cmd: Cmd,
        groups: Option<Keys>,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        let (done, result) = oneshot::channel();
        let pending = Pending {
            write: Write { cmd, groups },
            done,
        };
        let queued = match self.queue.lock().expect("publisher lock").as_ref() {
            Some(queue) => queue.send(pending).is_ok(),
            None => false,
        };
        Box::pin(async move {
            if !queued {
                return Err(closed());
            }
            match result.await {
                Ok(answer) => answer.map_err(TransportError::from),
                Err(_) => Err(TransportError::Connection(
                    "the Redis publisher stopped before it answered".into(),
                )),
            }
        })
    }

    /// Takes no more writes and waits until those queued before are answered.
    pub async fn close(&self) {
        drop(self.queue.lock().expect("publisher lock").take());
        let task = self.task.lock().expect("publisher lock").take();
        if let Some(task) = task
            && let Err(e) = task.await
        {
            tracing::warn!(error = %e, "the Redis publisher ended badly");
        }
    }
}

fn closed() -> TransportError {
    TransportError::Connection(
        "the Redis transport is closed: nothing more is published through it".into(),
    )
}

async fn run(writer: Writer, mut ready: HashSet<Keys>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (writes, answers): (Vec<Write>, Vec<_>) =
            batch.drain(..).map(|p| (p.write, p.done)).unzip();
        let result = send(&writer, &mut ready, writes).await;
        for done in answers {
            let _ = done.send(result.clone());
        }
    }
}

/// Sends `writes` in one pipeline: for queues met for the first time, their consumer
/// groups first ([`create_group`]), then every write in order, then `WAIT` when
/// configured ([`Writer::write_all`]). Done only if every command succeeded; the
/// queues whose groups it created are then `ready`.
async fn send(
    writer: &Writer,
    ready: &mut HashSet<Keys>,
    writes: Vec<Write>,
) -> Result<(), WriteError> {
    let mut pipe = redis::pipe();
    let mut created: Vec<Keys> = Vec::new();
    for write in writes {
        if let Some(keys) = write.groups
            && !ready.contains(&keys)
            && !created.contains(&keys)
        {
            for i in 0..keys.partitions() {
                pipe.add_command(create_group(&keys, i));
            }
            created.push(keys);
        }
        pipe.add_command(write.cmd);
    }
    for reply in writer.write_all(pipe).await? {
        match reply {
            // The group exists already (only `XGROUP CREATE` answers this).
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(WriteError::Redis(e)),
            Ok(_) => {}
        }
    }
    ready.extend(created);
    Ok(())
}
