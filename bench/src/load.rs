//! A closed-loop load driver: `connections` workers each send one request, wait for its answer
//! and send the next, for a warm-up and then for a measured window. Only requests that start
//! inside the window count, so the warm-up (connection set-up, caches, JIT of query plans)
//! never reaches the figures.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::round;

/// How hard and how long to drive a scenario.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// Concurrent workers, each with its own connection.
    pub connections: usize,
    /// Time before measuring starts.
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
}

/// What one request came to.
pub enum Outcome {
    /// Answered as the scenario expects.
    Ok,
    /// Failed; the text says how (kept once, as the first error, for the report).
    Failed(String),
}

/// The figures of one driven scenario.
#[derive(Debug)]
pub struct Measured {
    /// Requests that started inside the window and succeeded.
    pub ok: u64,
    /// Requests that started inside the window and failed.
    pub errors: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Successful requests per second of the window.
    pub throughput: f64,
    /// Latencies of successful requests, in microseconds, sorted.
    latencies_us: Vec<u64>,
}

impl Measured {
    /// The latency at quantile `q` (0..=1), in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        percentile_us(&self.latencies_us, q) as f64 / 1000.0
    }

    /// The figures as JSON fields: `throughput_per_second`, `ok`, `errors`, `p50_ms`, `p95_ms`,
    /// `p99_ms`, `max_ms` and `first_error` when there was one.
    pub fn fields(&self) -> Value {
        let mut fields = json!({
            "throughput_per_second": round(self.throughput),
            "ok": self.ok, "errors": self.errors,
            "p50_ms": round2(self.latency_ms(0.50)), "p95_ms": round2(self.latency_ms(0.95)),
            "p99_ms": round2(self.latency_ms(0.99)), "max_ms": round2(self.latency_ms(1.0)),
        });
        if let (Some(error), Some(map)) = (&self.first_error, fields.as_object_mut()) {
            map.insert("first_error".into(), json!(error));
        }
        fields
    }
}

impl Measured {
    /// Two runs of the same shape as one: counts and latencies pooled, throughput averaged.
    pub fn combine(self, other: Self) -> Self {
        let mut latencies_us = self.latencies_us;
        latencies_us.extend(other.latencies_us);
        latencies_us.sort_unstable();
        Self {
            ok: self.ok + other.ok,
            errors: self.errors + other.errors,
            first_error: self.first_error.or(other.first_error),
            throughput: (self.throughput + other.throughput) / 2.0,
            latencies_us,
        }
    }
}

/// The value at quantile `q` of sorted microseconds (nearest rank), 0 when empty.
pub fn percentile_us(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn round2(x: f64) -> Value {
    json!((x * 100.0).round() / 100.0)
}

/// Drives `request` with `load.connections` concurrent workers. `request(n)` performs the
/// `n`-th request (numbered across all workers from 0) and says how it went.
pub async fn drive<F, Fut>(load: Load, request: F) -> Measured
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    let counter = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let window_start = start + load.warmup;
    let window_end = window_start + load.duration;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..load.connections.max(1) {
        let request = request.clone();
        let counter = counter.clone();
        workers.spawn(async move {
            let mut latencies = Vec::with_capacity(4096);
            let (mut errors, mut first_error) = (0u64, None);
            loop {
                let sent = Instant::now();
                if sent >= window_end {
                    break;
                }
                let outcome = request(counter.fetch_add(1, Ordering::Relaxed)).await;
                let took = sent.elapsed();
                if sent < window_start {
                    continue;
                }
                match outcome {
                    Outcome::Ok => latencies.push(took.as_micros() as u64),
                    Outcome::Failed(why) => {
                        errors += 1;
                        first_error.get_or_insert(why);
                    }
                }
            }
            (latencies, errors, first_error)
        });
    }
    let (mut latencies_us, mut errors, mut first_error) = (Vec::new(), 0, None);
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok((mine, failed, why)) => {
                latencies_us.extend(mine);
                errors += failed;
                if first_error.is_none() {
                    first_error = why;
                }
            }
            Err(panic) => {
                errors += 1;
                first_error.get_or_insert(format!("worker panicked: {panic}"));
            }
        }
    }
    latencies_us.sort_unstable();
    // Requests in flight at the window's end finish after it; the window is what they started
    // in, so the rate divides by the window, not by the time the last one took to answer.
    let ok = latencies_us.len() as u64;
    Measured {
        ok,
        errors,
        first_error,
        throughput: ok as f64 / load.duration.as_secs_f64(),
        latencies_us,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let sorted: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile_us(&sorted, 0.0), 1);
        assert_eq!(percentile_us(&sorted, 0.5), 51);
        assert_eq!(percentile_us(&sorted, 0.99), 99);
        assert_eq!(percentile_us(&sorted, 1.0), 100);
        assert_eq!(percentile_us(&[], 0.5), 0);
    }

    #[tokio::test]
    async fn only_requests_started_in_the_window_count() {
        let load = Load {
            connections: 2,
            warmup: Duration::from_millis(50),
            duration: Duration::from_millis(100),
        };
        let measured = drive(load, |n| async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if n % 5 == 0 {
                Outcome::Failed(format!("request {n}"))
            } else {
                Outcome::Ok
            }
        })
        .await;
        // Two workers, at least 10 ms a request, 100 ms window: at most 22 requests start in
        // it (counting the warm-up too would allow up to 32).
        let total = measured.ok + measured.errors;
        assert!((1..=22).contains(&total), "{measured:?}");
        assert!(measured.errors > 0 && measured.first_error.is_some());
        assert!(measured.latency_ms(0.5) >= 10.0);
    }
}
