//! Latency histograms for `/metrics`, in the Prometheus text format.
//!
//! Observations are durations between two [`Time`](crate::time::Time)s of the core's
//! injected clock, so tests drive them exactly; nothing here reads a clock.

use std::fmt::Write as _;
use std::time::Duration;

/// Upper bounds of the latency buckets, in milliseconds: from a fast first token on a
/// small model to a long generation. `+Inf` is implied.
pub const LATENCY_BUCKETS_MS: [u64; 14] =
    [5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 120_000];

/// A cumulative histogram of durations with fixed bucket bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    /// Upper bounds, in nanoseconds, ascending.
    bounds_ns: Vec<u64>,
    /// Observations per bucket (not cumulative); one more than the bounds, for `+Inf`.
    counts: Vec<u64>,
    /// The sum of all observations, in nanoseconds.
    sum_ns: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::latency()
    }
}

impl Histogram {
    /// A histogram with [`LATENCY_BUCKETS_MS`].
    pub fn latency() -> Histogram {
        Histogram::with_bounds_ms(&LATENCY_BUCKETS_MS)
    }

    /// A histogram with these upper bounds (milliseconds, ascending).
    pub fn with_bounds_ms(bounds_ms: &[u64]) -> Histogram {
        let bounds_ns = bounds_ms.iter().map(|ms| ms.saturating_mul(1_000_000)).collect();
        Histogram { bounds_ns, counts: vec![0; bounds_ms.len() + 1], sum_ns: 0 }
    }

    /// Records one duration. A duration equal to a bound falls in that bound's bucket
    /// (Prometheus buckets are `<=`).
    pub fn observe(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = self.bounds_ns.partition_point(|&b| b < ns);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum_ns += u128::from(ns);
    }

    /// How many observations there are.
    #[cfg(test)] // Only the tests ask; the module is private to the crate.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Cumulative counts per bound, `+Inf` last: what the `_bucket` series show.
    pub fn cumulative(&self) -> Vec<u64> {
        self.counts
            .iter()
            .scan(0u64, |acc, &c| {
                *acc += c;
                Some(*acc)
            })
            .collect()
    }

    /// Appends the histogram as `name` (seconds, as Prometheus names `_seconds` ask):
    /// HELP and TYPE lines, one `_bucket{le=…}` per bound and `+Inf`, `_sum`, `_count`.
    pub fn write_prometheus(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let cumulative = self.cumulative();
        for (bound, n) in self.bounds_ns.iter().zip(&cumulative) {
            // Bounds are whole milliseconds: print them exactly, without float noise.
            let ms = bound / 1_000_000;
            let le = format!("{}.{:03}", ms / 1000, ms % 1000);
            let le = le.trim_end_matches('0').trim_end_matches('.');
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
        }
        let total = cumulative.last().copied().unwrap_or(0);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let secs = self.sum_ns as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {secs}\n{name}_count {total}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Time;

    #[test]
    fn observations_land_in_le_buckets() {
        let mut h = Histogram::with_bounds_ms(&[10, 100]);
        let t0 = Time::from_millis(1_000);
        for ms in [0, 10, 11, 100, 101, 5_000] {
            h.observe(Time::from_millis(1_000 + ms).saturating_since(t0));
        }
        assert_eq!(h.cumulative(), vec![2, 4, 6]);
        assert_eq!(h.count(), 6);
        // Just over a bound is the next bucket.
        let mut h = Histogram::with_bounds_ms(&[10]);
        h.observe(Duration::from_nanos(10_000_001));
        assert_eq!(h.cumulative(), vec![0, 1]);
    }

    #[test]
    fn prometheus_text_has_buckets_sum_and_count() {
        let mut h = Histogram::with_bounds_ms(&[5, 250, 2_500]);
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(300));
        h.observe(Duration::from_millis(300));
        let mut out = String::new();
        h.write_prometheus(&mut out, "x_seconds", "What x is.");
        assert_eq!(
            out,
            "# HELP x_seconds What x is.\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{le=\"0.005\"} 1\nx_seconds_bucket{le=\"0.25\"} 1\n\
             x_seconds_bucket{le=\"2.5\"} 3\nx_seconds_bucket{le=\"+Inf\"} 3\n\
             x_seconds_sum 0.603\nx_seconds_count 3\n"
        );
    }

    #[test]
    fn default_buckets_print_whole_seconds_plainly() {
        let mut out = String::new();
        Histogram::latency().write_prometheus(&mut out, "y", "h");
        assert!(out.contains("y_bucket{le=\"1\"} 0\n"), "{out}");
        assert!(out.contains("y_bucket{le=\"120\"} 0\n"), "{out}");
        assert!(out.contains("y_bucket{le=\"0.01\"} 0\n"), "{out}");
        assert!(out.contains("y_sum 0\ny_count 0\n"), "{out}");
    }
}
