//! What `/metrics` shows, kept cheap enough for the hot path: a log-scale latency
//! histogram (for `skald bench`'s quantiles, and exposed with fixed buckets) and the
//! labelled metrics of [`Metrics`], kept by the maintained `prometheus-client` crate
//! (OpenMetrics text). Labels are bounded by the loaded saga definitions (saga,
//! step, service, command type) and by fixed sets (phase, outcome, status,
//! disposition): never an instance or an aggregate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds (seconds) of the buckets of every duration histogram in `/metrics`.
pub const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(LATENCY_BOUNDS.iter().copied())
}

/// Labels of `skald_step_attempts_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// The saga's name.
    pub saga: String,
    /// The step's name.
    pub step: String,
    /// `forward` or `compensate`.
    pub phase: &'static str,
    /// `succeeded` or `failed`.
    pub outcome: &'static str,
}

/// Labels of the command metrics: which step sent what to whom.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    /// The saga's name.
    pub saga: String,
    /// The command step's name.
    pub step: String,
    /// The participant service.
    pub service: String,
    /// The command type (label `type`).
    pub r#type: String,
}

/// Labels of `skald_commands_finished_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishedLabels {
    #[prometheus(flatten)]
    command: CommandLabels,
    /// `succeeded`, `failed` or `timed_out` (as in `skald.commands.status`).
    status: &'static str,
}

/// Labels of `skald_replies_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplyLabels {
    /// `applied`, `duplicate`, `late` or `unknown` (as in `skald.replies.disposition`).
    disposition: &'static str,
}

/// The engine's labelled metrics, one registry per engine (so that several engines
/// in one process, as in the tests, never mix their counts).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    step_attempts: Family<StepLabels, Counter>,
    commands_sent: Family<CommandLabels, Counter>,
    commands_finished: Family<FinishedLabels, Counter>,
    replies: Family<ReplyLabels, Counter>,
    reply_seconds: Family<CommandLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let step_attempts = Family::default();
        registry.register(
            "skald_step_attempts",
            "Step and compensation attempts committed, by saga, step, phase and outcome.",
            step_attempts.clone(),
        );
        let commands_sent = Family::default();
        registry.register(
            "skald_commands_sent",
            "Commands published to participant services (re-sends after a reply timeout included).",
            commands_sent.clone(),
        );
        let commands_finished = Family::default();
        registry.register(
            "skald_commands_finished",
            "Commands answered or given up, by status: succeeded, failed, timed_out.",
            commands_finished.clone(),
        );
        let replies = Family::default();
        registry.register(
            "skald_replies",
            "Replies received from participant services, by disposition: applied, duplicate, late, unknown.",
            replies.clone(),
        );
        let reply_seconds: Family<CommandLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        registry.register(
            "skald_reply_seconds",
            "Time from a command's first send to its reply being applied.",
            reply_seconds.clone(),
        );
        Metrics {
            registry,
            step_attempts,
            commands_sent,
            commands_finished,
            replies,
            reply_seconds,
        }
    }
}

impl Metrics {
    /// The registry to encode.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// One committed attempt of `step` of `saga`.
    pub fn step_attempt(&self, saga: &str, step: &str, phase: &'static str, failed: bool) {
        self.step_attempts
            .get_or_create(&StepLabels {
                saga: saga.into(),
                step: step.into(),
                phase,
                outcome: if failed { "failed" } else { "succeeded" },
            })
            .inc();
    }

    /// One command send (first or re-send).
    pub fn command_sent(&self, command: &CommandLabels) {
        self.commands_sent.get_or_create(command).inc();
    }

    /// A command finished with `status` (`succeeded`, `failed`, `timed_out`).
    pub fn command_finished(&self, command: &CommandLabels, status: &'static str) {
        self.commands_finished
            .get_or_create(&FinishedLabels {
                command: command.clone(),
                status,
            })
            .inc();
    }

    /// A reply applied to its command `latency` after the command was first sent.
    pub fn reply_applied(&self, command: &CommandLabels, latency: Duration) {
        self.reply("applied");
        self.reply_seconds
            .get_or_create(command)
            .observe(latency.as_secs_f64());
    }

    /// A reply received and recorded as `disposition` (`duplicate`, `late`,
    /// `unknown`: the replying service is not a label, since an unknown reply names
    /// any service it likes).
    pub fn reply(&self, disposition: &'static str) {
        self.replies
            .get_or_create(&ReplyLabels { disposition })
            .inc();
    }
}

/// Sub-buckets per power of two: each bucket spans about 9% of its value.
const SUB_BUCKETS: usize = 8;
/// Covers 1 µs to 2^30 µs (about 18 minutes); longer durations land in the last bucket.
const BUCKETS: usize = 30 * SUB_BUCKETS;

/// A log-scale histogram of durations with bounded memory and ~9% resolution, and
/// its copy with [`LATENCY_BOUNDS`] for `/metrics`.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
    exposed: Histogram,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
            exposed: duration_histogram(),
        }
    }
}

fn bucket_of(micros: u64) -> usize {
    let micros = micros.max(1) as f64;
    ((micros.log2() * SUB_BUCKETS as f64) as usize).min(BUCKETS - 1)
}

/// The upper bound of a bucket, in microseconds.
fn bucket_upper_micros(bucket: usize) -> f64 {
    2f64.powf((bucket + 1) as f64 / SUB_BUCKETS as f64)
}

impl LatencyHistogram {
    /// Counts one observation.
    pub fn record(&self, d: Duration) {
        let micros = d.as_micros().min(u64::MAX as u128) as u64;
        self.buckets[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.exposed.observe(d.as_secs_f64());
    }

    /// The histogram `/metrics` shows (shares its counts with this one).
    pub fn exposed(&self) -> Histogram {
        self.exposed.clone()
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of all observations, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// The `q` quantile (0..=1) in milliseconds, as the upper bound of its bucket
    /// (so never an underestimate); 0 when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let total = self.count();
        if total == 0 {
            return 0.0;
        }
        let rank = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                return bucket_upper_micros(i) / 1000.0;
            }
        }
        bucket_upper_micros(BUCKETS - 1) / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_close_upper_bounds() {
        let h = LatencyHistogram::default();
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile_ms(0.5);
        let p99 = h.quantile_ms(0.99);
        assert!((50.0..=50.0 * 1.1).contains(&p50), "{p50}");
        assert!((99.0..=99.0 * 1.1).contains(&p99), "{p99}");
        assert_eq!(h.count(), 100);
        assert_eq!(LatencyHistogram::default().quantile_ms(0.5), 0.0);
    }

    #[test]
    fn labelled_metrics_encode_with_conventional_names() {
        let m = Metrics::default();
        m.step_attempt("order", "reserve", "forward", false);
        m.step_attempt("order", "reserve", "forward", true);
        let cmd = CommandLabels {
            saga: "order".into(),
            step: "reserve".into(),
            service: "stock".into(),
            r#type: "reserve_stock".into(),
        };
        m.command_sent(&cmd);
        m.command_finished(&cmd, "succeeded");
        m.reply_applied(&cmd, Duration::from_millis(30));
        m.reply("late");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, m.registry()).unwrap();
        for line in [
            "skald_step_attempts_total{saga=\"order\",step=\"reserve\",phase=\"forward\",outcome=\"succeeded\"} 1",
            "skald_step_attempts_total{saga=\"order\",step=\"reserve\",phase=\"forward\",outcome=\"failed\"} 1",
            "skald_commands_sent_total{saga=\"order\",step=\"reserve\",service=\"stock\",type=\"reserve_stock\"} 1",
            "skald_commands_finished_total{saga=\"order\",step=\"reserve\",service=\"stock\",type=\"reserve_stock\",status=\"succeeded\"} 1",
            "skald_replies_total{disposition=\"applied\"} 1",
            "skald_replies_total{disposition=\"late\"} 1",
            "skald_reply_seconds_bucket{le=\"0.05\",saga=\"order\",step=\"reserve\",service=\"stock\",type=\"reserve_stock\"} 1",
            "skald_reply_seconds_count{saga=\"order\",step=\"reserve\",service=\"stock\",type=\"reserve_stock\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }
}
