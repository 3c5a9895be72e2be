//! `skald explore --random N --seed S`: N random schedules, each with several faults
//! over several instances at once, replayable by their seed.
//!
//! Schedule `k` runs with seed `S + k`: from it come the number of instances (1 to 4,
//! each on an aggregate of its own, their messages interleaved on one queue) and every
//! fault — crashes at any point, retryable and (rarely) fatal failures, duplicated
//! deliveries, lost confirms and older messages arriving after newer ones. The engine's
//! own random numbers (retry jitter) are seeded from it too, so `--random 1 --seed <the
//! schedule's seed>` runs that schedule again, fault for fault.
//!
//! A schedule holds when every instance ended (completed, compensated, or parked with
//! its dead letter), no step or compensation succeeded twice, and nothing was left
//! unacked or undelivered. Business atomicity is checked point by point by the plain
//! `explore` run (instances of one schedule share the business tables).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::points::Fault;
use super::{Chaos, ExploreError, Scratch, deliver_all, look};
use crate::envelope::{Envelope, instance_id_for};
use crate::faults::{FaultPlan, FaultPoint, Injected};
use crate::saga::coordinator::{FailureKind, InstanceStatus, Phase};
use crate::saga::{Catalog, SagaDef, ValueRef};

/// The most instances one schedule starts.
const MAX_INSTANCES: usize = 4;

/// A schedule that broke a promise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// Its seed: `--random 1 --seed <seed>` runs it again.
    pub seed: u64,
    /// What broke, for a person.
    pub why: String,
}

/// What the random schedules found.
#[derive(Debug, Clone)]
pub struct RandomReport {
    /// The saga's name.
    pub saga: String,
    /// The first schedule's seed.
    pub seed: u64,
    /// Schedules run.
    pub schedules: u64,
    /// Instances started over all schedules.
    pub instances: usize,
    /// Faults injected over all schedules.
    pub faults: usize,
    /// The schedules that broke a promise.
    pub broken: Vec<Broken>,
}

impl RandomReport {
    /// Every schedule kept every promise.
    pub fn held(&self) -> bool {
        self.broken.is_empty()
    }

    /// One line per broken schedule, then a summary line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for b in &self.broken {
            out.push_str(&format!(
                "BROKEN seed {}: {} (replay: --random 1 --seed {})\n",
                b.seed, b.why, b.seed
            ));
        }
        let last = self.seed + self.schedules.saturating_sub(1);
        out.push_str(&format!(
            "{}: {} random schedules (seeds {}..={last}), {} instances, {} faults: {}\n",
            self.saga,
            self.schedules,
            self.seed,
            self.instances,
            self.faults,
            if self.held() {
                "every promise held".to_string()
            } else {
                format!("{} broke a promise", self.broken.len())
            }
        ));
        out
    }
}

/// Random faults, from one seed.
struct RandomChaos {
    rng: Mutex<fastrand::Rng>,
    injected: Mutex<usize>,
    crashed: AtomicBool,
}

impl RandomChaos {
    /// True with probability `percent` / 100 (counted as an injected fault).
    fn roll(&self, percent: u32) -> bool {
        let hit = self.rng.lock().expect("rng lock").u32(0..100) < percent;
        if hit {
            *self.injected.lock().expect("count lock") += 1;
        }
        hit
    }
}

impl FaultPlan for RandomChaos {
    fn at(&self, point: FaultPoint, _step: &str, _phase: Phase) -> Injected {
        match point {
            FaultPoint::BeforeEffect if self.roll(1) => Injected::Fail(FailureKind::Fatal),
            FaultPoint::BeforeEffect if self.roll(6) => Injected::Fail(FailureKind::Retryable),
            FaultPoint::BeforeEffect => Injected::Nothing,
            _ if self.roll(4) => {
                self.crashed.store(true, Ordering::SeqCst);
                Injected::Crash
            }
            _ => Injected::Nothing,
        }
    }
}

impl Chaos for RandomChaos {
    fn on_delivery(&self, _here: (usize, Phase)) -> Option<Fault> {
        if self.roll(5) {
            Some(Fault::Duplicate)
        } else if self.roll(3) {
            Some(Fault::LostConfirm)
        } else if self.roll(5) {
            Some(Fault::Overtaken)
        } else {
            None
        }
    }

    fn take_crash(&self) -> bool {
        self.crashed.swap(false, Ordering::SeqCst)
    }
}

/// `payload` for instance `i` of schedule `seed`: its aggregate field made unique, so
/// that every instance is one aggregate of its own.
fn payload_for(saga: &SagaDef, payload: &Value, seed: u64, i: usize) -> Value {
    let mut out = payload.clone();
    if let ValueRef::Payload { path } = &saga.aggregate {
        let mut at = &mut out;
        for key in path {
            match at.get_mut(key) {
                Some(next) => at = next,
                None => return out,
            }
        }
        let unique = match &*at {
            Value::String(s) => Some(Value::String(format!("{s}-r{seed}-{i}"))),
            Value::Number(n) => n.as_u64().map(|n| Value::from(n * 1000 + i as u64)),
            _ => None,
        };
        if let Some(unique) = unique {
            *at = unique;
        }
    }
    out
}

/// Runs `schedules` random schedules from `seed` on one fresh copy of the scratch
/// database (every instance has an aggregate of its own).
pub(super) async fn run(
    scratch: &Scratch,
    catalog: &Catalog,
    saga: &SagaDef,
    payload: &Value,
    seed: u64,
    schedules: u64,
) -> Result<RandomReport, ExploreError> {
    let copy = scratch.fresh().await?;
    let mut report = RandomReport {
        saga: saga.name.clone(),
        seed,
        schedules,
        instances: 0,
        faults: 0,
        broken: Vec::new(),
    };
    let result = async {
        for k in 0..schedules {
            let seed = seed.wrapping_add(k);
            let mut rng = fastrand::Rng::with_seed(seed);
            // The engine's retry jitter too.
            fastrand::seed(seed);
            let starts: Vec<Envelope> = (0..rng.usize(1..=MAX_INSTANCES))
                .map(|i| Envelope::start(&saga.name, None, payload_for(saga, payload, seed, i)))
                .collect();
            let instances: Vec<_> = starts
                .iter()
                .map(|s| instance_id_for(s.message_id))
                .collect();
            let chaos = Arc::new(RandomChaos {
                rng: Mutex::new(rng),
                injected: Mutex::new(0),
                crashed: AtomicBool::new(false),
            });
            let transport =
                deliver_all(scratch, &copy.store, catalog, starts, chaos.clone()).await?;
            report.instances += instances.len();
            report.faults += *chaos.injected.lock().expect("count lock");
            let mut why = Vec::new();
            if transport.pending() != (0, 0, 0) {
                why.push(format!(
                    "messages left (ready, delayed, unacked): {:?}",
                    transport.pending()
                ));
            }
            for (i, instance) in instances.iter().enumerate() {
                let end = look(&copy.store, *instance).await?;
                match end.ended {
                    Some(s) if s.is_terminal() => {}
                    other => why.push(format!(
                        "instance {i} did not end ({})",
                        other.map_or("never started", InstanceStatus::as_str)
                    )),
                }
                if !end.once {
                    why.push(format!("instance {i}: a step succeeded twice"));
                }
                if end.ended == Some(InstanceStatus::Failed) && !end.parked {
                    why.push(format!("instance {i} parked without its dead letter"));
                }
            }
            if !why.is_empty() {
                report.broken.push(super::random::Broken {
                    seed,
                    why: why.join("; "),
                });
            }
        }
        Ok::<(), ExploreError>(())
    }
    .await;
    scratch.discard(copy).await;
    result.map(|()| report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::load_str;
    use serde_json::json;

    #[test]
    fn each_instance_of_a_schedule_gets_an_aggregate_of_its_own() {
        let saga = load_str(
            "name: s\nversion: 1\naggregate: payload.order.id\nsteps:\n  - name: a\n    role: pivot\n    action: { sql: SELECT 1 }\n",
            std::path::Path::new("s.yaml"),
        )
        .unwrap();
        let payload = json!({"order": {"id": "o-1"}, "qty": 2});
        let a = payload_for(&saga, &payload, 7, 0);
        let b = payload_for(&saga, &payload, 7, 1);
        assert_eq!(a["order"]["id"], "o-1-r7-0");
        assert_eq!(b["order"]["id"], "o-1-r7-1");
        assert_eq!(a["qty"], 2);
    }
}
