//! One message per aggregate at a time in this process, in the order received.
//!
//! Each message joins its aggregate's lane: it waits for the message before it in
//! the lane to finish, runs, then lets the next one go. Lanes are created on demand
//! and forgotten once empty, so memory follows the aggregates in flight, not all
//! aggregates ever seen. (Across processes the transport keeps per-aggregate order:
//! one active consumer per partition.)

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::oneshot;

/// The lanes of the aggregates with messages in flight.
#[derive(Debug, Default)]
pub struct Lanes {
    tails: Mutex<HashMap<String, (u64, oneshot::Receiver<()>)>>,
    next: std::sync::atomic::AtomicU64,
}

/// A message's place in its aggregate's lane. Call [`Lanes::enter`] order = receive
/// order; [`Turn::wait`] resolves when the message before it finished (or was dropped).
#[derive(Debug)]
pub struct Turn {
    aggregate: String,
    id: u64,
    before: Option<oneshot::Receiver<()>>,
    done: Option<oneshot::Sender<()>>,
}

impl Lanes {
    /// Joins `aggregate`'s lane, behind every message that joined before. Must be
    /// called in receive order (the consume loop does, synchronously).
    pub fn enter(&self, aggregate: &str) -> Turn {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (done, tail) = oneshot::channel();
        let before = self
            .tails
            .lock()
            .expect("lanes lock")
            .insert(aggregate.to_string(), (id, tail))
            .map(|(_, rx)| rx);
        Turn {
            aggregate: aggregate.to_string(),
            id,
            before,
            done: Some(done),
        }
    }

    /// Leaves the lane: the next message of the aggregate may run; an empty lane is
    /// forgotten.
    pub fn leave(&self, mut turn: Turn) {
        let mut tails = self.tails.lock().expect("lanes lock");
        if tails
            .get(&turn.aggregate)
            .is_some_and(|(id, _)| *id == turn.id)
        {
            tails.remove(&turn.aggregate);
        }
        if let Some(done) = turn.done.take() {
            let _ = done.send(());
        }
    }

    /// Aggregates with a message in flight.
    pub fn len(&self) -> usize {
        self.tails.lock().expect("lanes lock").len()
    }

    /// Whether no message is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Turn {
    /// Waits for the message before this one in the lane to finish.
    pub async fn wait(&mut self) {
        if let Some(before) = self.before.take() {
            // A dropped sender (the task before ended without leaving) also lets us go.
            let _ = before.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn one_aggregate_runs_in_order_and_others_do_not_wait() {
        let lanes = Arc::new(Lanes::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, agg) in ["a", "a", "b", "a"].into_iter().enumerate() {
            let mut turn = lanes.enter(agg);
            let (lanes, log) = (lanes.clone(), log.clone());
            tasks.push(tokio::spawn(async move {
                turn.wait().await;
                // The first `a` is slow: the second must still wait for it.
                if i == 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                log.lock().unwrap().push((agg, i));
                lanes.leave(turn);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let log = log.lock().unwrap().clone();
        let a: Vec<usize> = log.iter().filter(|(g, _)| *g == "a").map(|p| p.1).collect();
        assert_eq!(a, vec![0, 1, 3]);
        assert_eq!(log[0], ("b", 2), "b did not wait for a");
        assert!(lanes.is_empty(), "empty lanes are forgotten");
    }
}
