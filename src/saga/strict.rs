//! Strict per-aggregate order of starts (`ordering: strict`), as a plain component.
//!
//! One [`StrictOrder`] belongs to one aggregate. It answers three questions, and the
//! aggregate's actor only carries out the answers (it owns the timers and the
//! deliveries):
//! - [`StrictOrder::offer`]: a start with sequence `n` arrived — run it now, or hold
//!   it until its predecessor has been applied?
//! - [`StrictOrder::applied`]: start `n` was applied — which held starts may go now?
//! - [`StrictOrder::gap_timeout`]: the oldest held start waited its saga's
//!   `ordering_max_wait_ms` — which start goes next, skipping the gap?
//!
//! The watermark (the highest sequence applied) is PostgreSQL's: this component only
//! caches it ([`StrictOrder::knows`] / [`StrictOrder::learn`]). A start at or below
//! the watermark goes too: the engine records it as stale.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// The answer to an offered start.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer<T> {
    /// Run it now.
    Go(T),
    /// It is held until its predecessor is applied or the gap times out.
    Held {
        /// Start the saga's gap timer, for this long (no timer runs for it yet).
        arm_timer: Option<Duration>,
        /// A held copy of the same sequence that this one replaced (a redelivery after
        /// the first copy's channel died): the caller forgets it.
        replaced: Option<T>,
    },
}

/// What a gap timeout lets go.
#[derive(Debug, PartialEq, Eq)]
pub struct GapSkip<T> {
    /// The earliest held start, applied now past the gap (a late predecessor will be
    /// stale). `None` when nothing was held any more.
    pub next: Option<T>,
    /// More starts are held behind another gap: wait again, this long.
    pub rearm_timer: Option<Duration>,
}

/// What applying a start releases.
#[derive(Debug, PartialEq, Eq)]
pub struct Released<T> {
    /// Held starts that may go now, in sequence order (the successor, and any held
    /// start that the new watermark made stale).
    pub ready: Vec<T>,
    /// Nothing is held any more for this saga: cancel its gap timer.
    pub cancel_timer: bool,
}

#[derive(Debug)]
struct Saga<T> {
    /// The highest sequence applied (`None`: nothing yet).
    watermark: Option<i64>,
    held: BTreeMap<u64, T>,
    max_wait: Duration,
    timer_armed: bool,
}

/// The strict-order state of one aggregate, per saga.
#[derive(Debug)]
pub struct StrictOrder<T> {
    sagas: HashMap<String, Saga<T>>,
}

impl<T> Default for StrictOrder<T> {
    fn default() -> Self {
        StrictOrder {
            sagas: HashMap::new(),
        }
    }
}

impl<T> StrictOrder<T> {
    /// Whether the watermark of `saga` is known here (else read it from PostgreSQL and
    /// [`StrictOrder::learn`] it before offering).
    pub fn knows(&self, saga: &str) -> bool {
        self.sagas.contains_key(saga)
    }

    /// Records the watermark of `saga` as read from PostgreSQL.
    pub fn learn(&mut self, saga: &str, watermark: Option<i64>, max_wait: Duration) {
        self.sagas.entry(saga.to_string()).or_insert(Saga {
            watermark,
            held: BTreeMap::new(),
            max_wait,
            timer_armed: false,
        });
    }

    /// A start of `saga` with sequence `seq` arrived. Sequences start at 0 or 1: with
    /// nothing applied, 0 and 1 go. A start not yet known to this component (see
    /// [`StrictOrder::knows`]) goes.
    pub fn offer(&mut self, saga: &str, seq: u64, item: T) -> Offer<T> {
        let Some(state) = self.sagas.get_mut(saga) else {
            return Offer::Go(item);
        };
        let expected = state.watermark.map_or(1, |w| w + 1);
        if (seq as i64) <= expected {
            return Offer::Go(item);
        }
        let replaced = state.held.insert(seq, item);
        let arm_timer = (!state.timer_armed).then_some(state.max_wait);
        state.timer_armed = true;
        Offer::Held {
            arm_timer,
            replaced,
        }
    }

    /// Start `seq` of `saga` was applied (or recorded stale): the watermark moves up,
    /// and the held starts it unblocks are released.
    pub fn applied(&mut self, saga: &str, seq: u64) -> Released<T> {
        let Some(state) = self.sagas.get_mut(saga) else {
            return Released {
                ready: Vec::new(),
                cancel_timer: false,
            };
        };
        let seq = seq as i64;
        state.watermark = Some(state.watermark.map_or(seq, |w| w.max(seq)));
        let next = state.watermark.map_or(0, |w| w + 1) as u64;
        let mut ready = Vec::new();
        while let Some(entry) = state.held.first_entry() {
            if *entry.key() > next {
                break;
            }
            ready.push(entry.remove());
        }
        let cancel_timer = state.held.is_empty() && state.timer_armed;
        if cancel_timer {
            state.timer_armed = false;
        }
        Released {
            ready,
            cancel_timer,
        }
    }

    /// The gap timer of `saga` fired: the earliest held start goes past the gap.
    pub fn gap_timeout(&mut self, saga: &str) -> GapSkip<T> {
        let Some(state) = self.sagas.get_mut(saga) else {
            return GapSkip {
                next: None,
                rearm_timer: None,
            };
        };
        state.timer_armed = false;
        let next = state.held.pop_first().map(|(seq, item)| {
            // Applying it moves the watermark past the gap.
            state.watermark = Some(seq as i64 - 1);
            item
        });
        let rearm_timer = (!state.held.is_empty()).then_some(state.max_wait);
        state.timer_armed = rearm_timer.is_some();
        GapSkip { next, rearm_timer }
    }

    /// Whether anything is held for any saga.
    pub fn holds_anything(&self) -> bool {
        self.sagas.values().any(|s| !s.held.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_millis(500);

    fn order(watermark: Option<i64>) -> StrictOrder<&'static str> {
        let mut o = StrictOrder::default();
        o.learn("s", watermark, WAIT);
        o
    }

    #[test]
    fn with_nothing_applied_zero_and_one_go_and_later_ones_wait() {
        let mut o = order(None);
        assert_eq!(o.offer("s", 0, "0"), Offer::Go("0"));
        assert_eq!(o.offer("s", 1, "1"), Offer::Go("1"));
        assert_eq!(
            o.offer("s", 2, "2"),
            Offer::Held {
                arm_timer: Some(WAIT),
                replaced: None
            }
        );
    }

    #[test]
    fn starts_arriving_1_3_2_are_applied_in_order() {
        let mut o = order(None);
        assert_eq!(o.offer("s", 1, "1"), Offer::Go("1"));
        assert!(matches!(o.offer("s", 3, "3"), Offer::Held { .. }));
        // 1 applied: 2 is expected, 3 still waits.
        assert_eq!(
            o.applied("s", 1),
            Released {
                ready: vec![],
                cancel_timer: false
            }
        );
        assert_eq!(o.offer("s", 2, "2"), Offer::Go("2"));
        assert_eq!(
            o.applied("s", 2),
            Released {
                ready: vec!["3"],
                cancel_timer: true
            }
        );
    }

    #[test]
    fn one_timer_per_saga_however_many_are_held() {
        let mut o = order(Some(4));
        assert!(matches!(
            o.offer("s", 7, "7"),
            Offer::Held {
                arm_timer: Some(_),
                ..
            }
        ));
        assert!(matches!(
            o.offer("s", 9, "9"),
            Offer::Held {
                arm_timer: None,
                ..
            }
        ));
    }

    #[test]
    fn a_redelivered_copy_replaces_the_held_one() {
        let mut o = order(Some(0));
        o.offer("s", 5, "first");
        assert_eq!(
            o.offer("s", 5, "copy"),
            Offer::Held {
                arm_timer: None,
                replaced: Some("first")
            }
        );
    }

    #[test]
    fn a_gap_timeout_skips_to_the_earliest_held_and_rearms_for_the_next_gap() {
        let mut o = order(Some(1));
        o.offer("s", 4, "4");
        o.offer("s", 7, "7");
        let skip = o.gap_timeout("s");
        assert_eq!(skip.next, Some("4"));
        assert_eq!(skip.rearm_timer, Some(WAIT));
        // 4 applied: 5 expected; 7 still held behind a second gap.
        assert!(o.applied("s", 4).ready.is_empty());
        let skip = o.gap_timeout("s");
        assert_eq!(skip.next, Some("7"));
        assert_eq!(skip.rearm_timer, None);
        assert!(!o.holds_anything());
    }

    #[test]
    fn stale_starts_go_so_the_engine_can_record_them() {
        let mut o = order(Some(5));
        assert_eq!(o.offer("s", 3, "3"), Offer::Go("3"));
        assert_eq!(o.offer("s", 6, "6"), Offer::Go("6"));
    }

    #[test]
    fn held_starts_the_new_watermark_made_stale_are_released_too() {
        let mut o = order(Some(0));
        o.offer("s", 3, "3");
        o.offer("s", 5, "5");
        // Another process applied up to 4 (a late read): 3 is stale, 5 is next.
        let released = o.applied("s", 4);
        assert_eq!(released.ready, vec!["3", "5"]);
        assert!(released.cancel_timer);
    }

    #[test]
    fn an_unknown_saga_goes() {
        let mut o: StrictOrder<&str> = StrictOrder::default();
        assert!(!o.knows("s"));
        assert_eq!(o.offer("s", 9, "9"), Offer::Go("9"));
    }
}
