//! Lock-free counters and a latency histogram, cheap enough for the hot path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two: each bucket spans about 9% of its value.
const SUB_BUCKETS: usize = 8;
/// Covers 1 µs to 2^30 µs (about 18 minutes); longer durations land in the last bucket.
const BUCKETS: usize = 30 * SUB_BUCKETS;

/// A log-scale histogram of durations with bounded memory and ~9% resolution.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
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

    /// Cumulative counts at the given upper bounds (seconds), for Prometheus.
    pub fn cumulative(&self, bounds_seconds: &[f64]) -> Vec<u64> {
        bounds_seconds
            .iter()
            .map(|&bound| {
                let bound_micros = bound * 1e6;
                self.buckets
                    .iter()
                    .enumerate()
                    .take_while(|(i, _)| bucket_upper_micros(*i) <= bound_micros)
                    .map(|(_, b)| b.load(Ordering::Relaxed))
                    .sum()
            })
            .collect()
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
}
