//! What this process knows of its partitions: which leases it holds and until when,
//! whether each one's pending entries must be claimed (again) before anything new is
//! read, and which entries it has handed out and not yet settled. Pure: the lease
//! keeper, the reader and the acks report what Redis answered; the reader asks what
//! to do next.
//!
//! An entry stays pending in its group until a successful ack. Whenever one is handed
//! out and then not acked — its ack refused (the lease lapsed for a moment), failed,
//! or its delivery dropped — or the lease is taken (again), the partition is claimed
//! again: every pending entry not in hand here is delivered again, before anything new.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

/// A lease this process holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// Past this instant (local clock) the lease may have expired on the server: the
    /// partition is neither read nor claimed until a renewal succeeds.
    valid_until: Instant,
    /// Claims asked for so far (a ticket number).
    asked: u64,
    /// The last ticket whose claim completed: when it is `asked`, new entries may be
    /// read.
    done: Option<u64>,
}

/// The partitions this process holds and the entries it has in hand.
#[derive(Debug, Default)]
pub(super) struct Leases {
    held: BTreeMap<u16, Held>,
    /// Entries handed out and not yet acked or given up, by partition and entry id.
    in_hand: HashSet<(u16, String)>,
}

impl Leases {
    /// The partitions held.
    pub fn held(&self) -> Vec<u16> {
        self.held.keys().copied().collect()
    }

    /// Whether partition `i` is held.
    pub fn holds(&self, i: u16) -> bool {
        self.held.contains_key(&i)
    }

    /// A renewal of partition `i` succeeded (valid until `valid_until`); `acquired`:
    /// the lease was taken, not extended, so whatever is pending must be claimed.
    pub fn renewed(&mut self, i: u16, valid_until: Instant, acquired: bool) {
        let h = self.held.entry(i).or_insert(Held {
            valid_until,
            asked: 1,
            done: None,
        });
        h.valid_until = valid_until;
        if acquired {
            h.asked += 1;
        }
    }

    /// Partition `i`'s lease belongs to another consumer now.
    pub fn lost(&mut self, i: u16) {
        self.held.remove(&i);
    }

    /// Forgets every lease (released, or abandoned).
    pub fn forget_all(&mut self) {
        self.held.clear();
    }

    /// Asks that partition `i`'s pending entries be claimed again (if it is held;
    /// otherwise taking it will).
    pub fn claim_again(&mut self, i: u16) {
        if let Some(h) = self.held.get_mut(&i) {
            h.asked += 1;
        }
    }

    /// Asks that every held partition be claimed again (a new consume session).
    pub fn claim_all_again(&mut self) {
        for h in self.held.values_mut() {
            h.asked += 1;
        }
    }

    /// The partitions to claim now, each with its ticket for [`Leases::claimed`].
    pub fn to_claim(&self, now: Instant) -> Vec<(u16, u64)> {
        self.held
            .iter()
            .filter(|(_, h)| h.done != Some(h.asked) && h.valid_until > now)
            .map(|(&i, h)| (i, h.asked))
            .collect()
    }

    /// The claim of partition `i` with `ticket` handed out every pending entry. If
    /// another claim was asked for meanwhile, that one is still to do.
    pub fn claimed(&mut self, i: u16, ticket: u64) {
        if let Some(h) = self.held.get_mut(&i) {
            h.done = Some(h.done.map_or(ticket, |d| d.max(ticket)));
        }
    }

    /// The partitions whose new entries may be read by a read ending before `until`:
    /// held past it, and nothing left to claim.
    pub fn readable(&self, until: Instant) -> Vec<u16> {
        self.held
            .iter()
            .filter(|(_, h)| h.done == Some(h.asked) && h.valid_until > until)
            .map(|(&i, _)| i)
            .collect()
    }

    /// Entry `id` of partition `i` was handed out.
    pub fn handed_out(&mut self, i: u16, id: &str) {
        self.in_hand.insert((i, id.to_string()));
    }

    /// Whether entry `id` of partition `i` is in hand here (handed out, not settled):
    /// a claim does not hand it out twice.
    pub fn in_hand(&self, i: u16, id: &str) -> bool {
        self.in_hand.contains(&(i, id.to_string()))
    }

    /// Entry `id` of partition `i` is settled: `acked`, or not (refused, failed,
    /// dropped), in which case it is still pending and the partition is claimed again.
    pub fn settled(&mut self, i: u16, id: &str, acked: bool) {
        self.in_hand.remove(&(i, id.to_string()));
        if !acked {
            self.claim_again(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn later(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[test]
    fn a_taken_partition_is_claimed_before_it_is_read() {
        let mut l = Leases::default();
        l.renewed(0, later(1_000), true);
        assert!(l.readable(Instant::now()).is_empty());
        let [(0, ticket)] = l.to_claim(Instant::now())[..] else {
            panic!("partition 0 to claim")
        };
        l.claimed(0, ticket);
        assert!(l.to_claim(Instant::now()).is_empty());
        assert_eq!(l.readable(Instant::now()), [0]);
        // A plain renewal changes nothing.
        l.renewed(0, later(1_000), false);
        assert_eq!(l.readable(Instant::now()), [0]);
    }

    #[test]
    fn an_entry_not_acked_makes_its_partition_claimed_again() {
        let mut l = Leases::default();
        l.renewed(1, later(1_000), true);
        let (_, t) = l.to_claim(Instant::now())[0];
        l.claimed(1, t);
        l.handed_out(1, "5-0");
        assert!(l.in_hand(1, "5-0"));
        // The ack was refused during a lease blip; the lease is this process's again.
        l.settled(1, "5-0", false);
        assert!(!l.in_hand(1, "5-0"));
        assert_eq!(l.to_claim(Instant::now()).len(), 1, "claimed again");
        assert!(l.readable(Instant::now()).is_empty(), "before anything new");
        // An acked one asks for nothing.
        let (_, t) = l.to_claim(Instant::now())[0];
        l.claimed(1, t);
        l.handed_out(1, "6-0");
        l.settled(1, "6-0", true);
        assert!(l.to_claim(Instant::now()).is_empty());
    }

    #[test]
    fn a_claim_asked_for_during_a_claim_is_not_lost() {
        let mut l = Leases::default();
        l.renewed(2, later(1_000), true);
        let (_, first) = l.to_claim(Instant::now())[0];
        // While that claim runs, the lease lapses and is taken again.
        l.renewed(2, later(1_000), true);
        l.claimed(2, first);
        assert_eq!(
            l.to_claim(Instant::now()).len(),
            1,
            "the second claim is due"
        );
        assert!(l.readable(Instant::now()).is_empty());
    }

    #[test]
    fn a_lease_that_may_have_expired_is_neither_read_nor_claimed() {
        let mut l = Leases::default();
        l.renewed(3, Instant::now(), true);
        assert!(l.to_claim(later(1)).is_empty());
        l.claim_all_again();
        l.lost(3);
        assert!(l.held().is_empty());
        l.claim_again(3); // not held: nothing to do
        assert!(l.to_claim(Instant::now()).is_empty());
    }
}
