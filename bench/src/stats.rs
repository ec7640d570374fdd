//! What a run counts while it goes: errors and protocol violations ([`Tally`], summed up as
//! [`Problems`]), latency percentiles, and the progress line on a terminal.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cli::CommonArgs;

/// Error and violation texts kept as samples (the counts cover all of them).
const MAX_SAMPLES: usize = 10;

/// Errors and protocol violations of a run, shared by its tasks.
#[derive(Default)]
pub(crate) struct Tally {
    errors: Mutex<BTreeMap<String, u64>>,
    error_samples: Mutex<Vec<String>>,
    violations: AtomicU64,
    violation_samples: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking task cannot leave a counter map inconsistent; keep counting.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn push_sample(samples: &Mutex<Vec<String>>, sample: impl FnOnce() -> String) {
    let mut s = lock(samples);
    if s.len() < MAX_SAMPLES {
        s.push(sample());
    }
}

impl Tally {
    /// One error of `kind`; `detail` is only rendered while samples are still kept.
    pub(crate) fn error(&self, kind: String, detail: impl FnOnce() -> String) {
        *lock(&self.errors).entry(kind).or_default() += 1;
        push_sample(&self.error_samples, detail);
    }

    /// One protocol violation by the server.
    pub(crate) fn violation(&self, what: String) {
        self.violations.fetch_add(1, Ordering::Relaxed);
        push_sample(&self.violation_samples, || what);
    }

    pub(crate) fn error_total(&self) -> u64 {
        lock(&self.errors).values().sum()
    }

    pub(crate) fn violation_total(&self) -> u64 {
        self.violations.load(Ordering::Relaxed)
    }

    /// Add another process's error counts and samples (an idle child's).
    pub(crate) fn add_errors(&self, counts: &BTreeMap<String, u64>, samples: &[String]) {
        {
            let mut errors = lock(&self.errors);
            for (kind, n) in counts {
                *errors.entry(kind.clone()).or_default() += n;
            }
        }
        for sample in samples {
            push_sample(&self.error_samples, || sample.clone());
        }
    }

    /// Forget the errors counted so far (an idle child reports each phase's on its own).
    pub(crate) fn clear_errors(&self) {
        *lock(&self.errors) = BTreeMap::new();
        lock(&self.error_samples).clear();
    }

    /// Count the warm-up's errors and violations too, marked as the warm-up's: they are the
    /// same server under the same load.
    pub(crate) fn add_warmup(&self, warm: &Tally) {
        let warm_errors = lock(&warm.errors).clone();
        {
            let mut errors = lock(&self.errors);
            for (kind, n) in warm_errors {
                *errors.entry(format!("warm-up {kind}")).or_default() += n;
            }
        }
        let warm_samples = lock(&warm.violation_samples).clone();
        for v in &warm_samples {
            self.violation(format!("warm-up: {v}"));
        }
        // Samples beyond MAX_SAMPLES were not kept; the count still is.
        let extra = warm
            .violation_total()
            .saturating_sub(warm_samples.len() as u64);
        self.violations.fetch_add(extra, Ordering::Relaxed);
    }

    pub(crate) fn summary(&self) -> Problems {
        Problems {
            errors: self.error_total(),
            error_counts: lock(&self.errors).clone(),
            error_samples: lock(&self.error_samples).clone(),
            violations: self.violation_total(),
            violation_samples: lock(&self.violation_samples).clone(),
        }
    }
}

/// Errors (the run could not do what it wanted) and violations (the server broke the protocol).
#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct Problems {
    pub(crate) errors: u64,
    pub(crate) error_counts: BTreeMap<String, u64>,
    pub(crate) error_samples: Vec<String>,
    pub(crate) violations: u64,
    pub(crate) violation_samples: Vec<String>,
}

/// The first few words of a text, for an error's kind or sample.
pub(crate) fn first_words(s: &str) -> String {
    s.split_whitespace().take(4).collect::<Vec<_>>().join(" ")
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct Percentiles {
    pub(crate) count: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p90_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    pub(crate) mean_ms: f64,
}

impl Percentiles {
    /// From samples in microseconds.
    pub(crate) fn from_micros(mut v: Vec<u32>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_unstable();
        let n = v.len();
        let ms = |us: u32| (f64::from(us) / 10.0).round() / 100.0;
        // Nearest rank: the smallest sample with at least q of them at or below it.
        let at = |q: f64| ms(v[((q * n as f64).ceil() as usize).clamp(1, n) - 1]);
        let mean = v.iter().map(|&x| u64::from(x)).sum::<u64>() as f64 / n as f64;
        Self {
            count: n as u64,
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            max_ms: ms(v[n - 1]),
            mean_ms: (mean / 10.0).round() / 100.0,
        }
    }
}

/// A duration as a latency sample, in microseconds.
pub(crate) fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Milliseconds from `a` to `b`, to two decimals.
pub(crate) fn ms_between(a: Instant, b: Instant) -> f64 {
    (b.saturating_duration_since(a).as_secs_f64() * 100_000.0).round() / 100.0
}

/// Positions of the progress bar: the fraction done, in thousandths.
const PROGRESS_STEPS: u64 = 1000;

/// A progress line on stderr, redrawn a few times a second; only on a terminal.
pub(crate) struct Progress {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// `state` returns the fraction done (0 to 1) and a text such as "1200/5000 runs".
    pub(crate) fn start(
        enabled: bool,
        label: &'static str,
        state: impl Fn() -> (f64, String) + Send + 'static,
    ) -> Self {
        let stop = CancellationToken::new();
        if !enabled {
            return Self { stop, task: None };
        }
        let bar = ProgressBar::with_draw_target(Some(PROGRESS_STEPS), ProgressDrawTarget::stderr());
        bar.set_style(progress_style());
        bar.set_prefix(label);
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    _ = s.cancelled() => break,
                    _ = tick.tick() => {
                        let (frac, text) = state();
                        bar.set_position((frac.clamp(0.0, 1.0) * PROGRESS_STEPS as f64) as u64);
                        bar.set_message(format!("{:>5.1}s {text}", started.elapsed().as_secs_f64()));
                    }
                }
            }
            bar.finish_and_clear();
        });
        Self {
            stop,
            task: Some(task),
        }
    }

    /// Stop drawing and clear the line.
    pub(crate) async fn finish(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            // The drawing task only ends by this cancel; a panic in it lost a progress line.
            let _drawn = t.await;
        }
    }
}

/// `chat [#########---------------------]   3.2s 1200/5000 runs ...`
fn progress_style() -> ProgressStyle {
    match ProgressStyle::with_template("{prefix} [{bar:30}] {msg}") {
        Ok(style) => style.progress_chars("#-"),
        // The template is a constant; should it ever not parse, indicatif's plain bar will do.
        Err(_) => ProgressStyle::default_bar(),
    }
}

/// The progress line is drawn unless `--no-progress`, and only when stderr is a terminal.
pub(crate) fn progress_enabled(common: &CommonArgs) -> bool {
    !common.no_progress && std::io::stderr().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let p = Percentiles::from_micros((1..=100).map(|x| x * 1000).collect());
        assert_eq!(
            (p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(Percentiles::from_micros(vec![]).count, 0);
        assert_eq!(Percentiles::from_micros(vec![1500]).p99_ms, 1.5);
    }

    #[test]
    fn the_warm_up_counts_with_its_samples_marked_and_none_lost() {
        let warm = Tally::default();
        for i in 0..(MAX_SAMPLES as u64 + 3) {
            warm.violation(format!("v{i}"));
        }
        warm.error("io".into(), || "e".into());
        let t = Tally::default();
        t.violation("own".into());
        t.add_warmup(&warm);
        let p = t.summary();
        assert_eq!(p.violations, 1 + MAX_SAMPLES as u64 + 3);
        assert_eq!(p.violation_samples[1], "warm-up: v0");
        assert_eq!(p.error_counts["warm-up io"], 1);
    }
}
