//! A bounded memory of the message ids this process has recorded, so that a copy
//! (a client's re-send, a redelivery) is recognised *before* its step runs again.
//!
//! Only a hint: the inbox in PostgreSQL is what decides. A hit makes the engine look
//! in the inbox first; a miss (an id forgotten, or recorded by another process) costs
//! nothing but the old path, where the guarded record rolls the copy back.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use uuid::Uuid;

/// How many ids are remembered (about 3 MiB at most).
pub const CAPACITY: usize = 65_536;

/// The most recent [`CAPACITY`] ids, forgotten oldest first.
#[derive(Debug, Default)]
pub struct SeenIds {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    ids: HashSet<Uuid>,
    order: VecDeque<Uuid>,
}

impl SeenIds {
    /// Remembers `id`, forgetting the oldest id when full.
    pub fn insert(&self, id: Uuid) {
        let mut inner = self.inner.lock().expect("seen ids lock");
        if !inner.ids.insert(id) {
            return;
        }
        inner.order.push_back(id);
        if inner.order.len() > CAPACITY
            && let Some(old) = inner.order.pop_front()
        {
            inner.ids.remove(&old);
        }
    }

    /// Whether `id` was recorded recently by this process.
    pub fn contains(&self, id: &Uuid) -> bool {
        self.inner.lock().expect("seen ids lock").ids.contains(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_recent_ids_and_forgets_the_oldest() {
        let seen = SeenIds::default();
        let first = Uuid::new_v4();
        seen.insert(first);
        seen.insert(first);
        assert!(seen.contains(&first));
        let rest: Vec<Uuid> = (0..CAPACITY).map(|_| Uuid::new_v4()).collect();
        for id in &rest {
            seen.insert(*id);
        }
        assert!(!seen.contains(&first), "the oldest is forgotten");
        assert!(rest.iter().all(|id| seen.contains(id)));
        assert_eq!(seen.inner.lock().unwrap().order.len(), CAPACITY);
    }
}
