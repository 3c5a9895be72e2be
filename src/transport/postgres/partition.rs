//! Partitions of the PostgreSQL transport, as pure functions: the advisory-lock keys
//! that make one session the owner of a partition, and how many partitions a process
//! should hold when several consume. (A message's partition is computed in the
//! database: `key_hash % partitions`, `key_hash` being PostgreSQL's
//! `hashtextextended(key, 0)`, so that any publisher's plain `INSERT` lands right.)

/// FNV-1a, 32 bits: stable across processes, versions and platforms.
fn fnv1a(key: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The first key of the endpoint's advisory locks (`pg_try_advisory_lock(class,
/// partition)`): positive, so that it reads the same as the `oid` in `pg_locks`.
pub fn lock_class(endpoint: &str) -> i32 {
    (fnv1a(&format!("skald.queue:{endpoint}")) & 0x7fff_ffff) as i32
}

/// The second key of the shared advisory lock every consumer of an endpoint holds
/// while it runs, so that consumers can count each other. Above every partition
/// number (at most 1024).
pub const MEMBER_LOCK: i32 = 100_000;

/// What a consumer does with its partitions at a rebalance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebalance {
    /// Partitions to try to lock, in this order, until `want` are owned.
    pub try_acquire: Vec<u16>,
    /// How many partitions to own after acquiring.
    pub want: usize,
    /// Partitions to hand over: fetch nothing more from them, and unlock each once
    /// nothing of it is in flight (idle ones come first, so they go at once).
    pub release: Vec<u16>,
}

/// The fair share of `partitions` for one of `members` consumers (rounded up, so that
/// together they cover every partition), and what to do to reach it from `owned`:
/// acquire free ones starting at `start` (random, so that processes spread), or
/// release the surplus, idle partitions first (`busy` says which have deliveries in
/// flight: those are unlocked only once drained, or another consumer would deliver
/// their messages again while this one still handles them).
pub fn rebalance(
    partitions: u16,
    members: usize,
    owned: &[u16],
    busy: impl Fn(u16) -> bool,
    start: u16,
) -> Rebalance {
    let n = partitions.max(1) as usize;
    let fair = n.div_ceil(members.max(1));
    let mut plan = Rebalance {
        try_acquire: Vec::new(),
        want: fair,
        release: Vec::new(),
    };
    if owned.len() < fair {
        plan.try_acquire = (0..n)
            .map(|i| ((start as usize + i) % n) as u16)
            .filter(|p| !owned.contains(p))
            .collect();
    } else if owned.len() > fair {
        let (idle, busy): (Vec<u16>, Vec<u16>) = owned.iter().partition(|&&p| !busy(p));
        plan.release = idle
            .into_iter()
            .chain(busy)
            .take(owned.len() - fair)
            .collect();
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_classes_are_stable_positive_and_differ_per_endpoint() {
        // FNV-1a reference values: the lock keys may never change, or two versions of
        // skald running side by side would not exclude each other.
        assert_eq!(fnv1a(""), 0x811c_9dc5);
        assert_eq!(fnv1a("a"), 0xe40c_292c);
        assert_eq!(fnv1a("foobar"), 0xbf9c_f968);
        assert!(lock_class("skald") >= 0);
        assert_ne!(lock_class("skald"), lock_class("payments"));
    }

    #[test]
    fn a_lone_consumer_takes_every_partition() {
        let plan = rebalance(4, 1, &[], |_| false, 2);
        assert_eq!(plan.try_acquire, [2, 3, 0, 1]);
        assert_eq!(plan.want, 4);
        assert!(plan.release.is_empty());
    }

    #[test]
    fn consumers_share_the_partitions_rounding_up() {
        let plan = rebalance(8, 3, &[0], |_| false, 0);
        assert_eq!(plan.want, 3);
        assert_eq!(plan.try_acquire, [1, 2, 3, 4, 5, 6, 7]);
        let plan = rebalance(8, 2, &[0, 1, 2, 3], |_| false, 0);
        assert_eq!(
            plan,
            Rebalance {
                try_acquire: vec![],
                want: 4,
                release: vec![]
            }
        );
    }

    #[test]
    fn a_surplus_is_released_idle_partitions_first() {
        // A second consumer joined: half of the eight are handed over, idle ones first
        // (busy ones drain before they are unlocked).
        let owned: Vec<u16> = (0..8).collect();
        let plan = rebalance(8, 2, &owned, |p| p < 3, 0);
        assert_eq!(plan.release, [3, 4, 5, 6]);
        let plan = rebalance(8, 2, &owned, |p| p != 7, 0);
        assert_eq!(plan.release, [7, 0, 1, 2]);
    }
}
