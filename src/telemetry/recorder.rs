//! The metrics recorder: Prometheus's for counters and gauges, fixed-bucket
//! atomic histograms of our own for the histograms.
//!
//! Why not the exporter's histograms: `metrics-exporter-prometheus` records
//! every histogram sample into a lock-free buffer (a `quanta` clock read, an
//! epoch pin, a 16-byte sample, a 1 KiB block allocated every 64 samples)
//! and folds the buffer into buckets at scrape or upkeep time. That is the
//! right design for an exporter that does not know its buckets in advance,
//! and it costs ~80 ns and an occasional allocation per sample; a pool call
//! records three samples, which made the histograms the largest single
//! cost of a successful call (docs/benchmarks.md). Our buckets are known
//! when a handle is registered, so a sample is one binary search over the
//! bounds and two relaxed atomic updates, with no clock read and no
//! allocation; the `/metrics` text is rendered from the same atomics.
//!
//! Counters are ours too, for the same reason on more than one core: a
//! counter every request increments is one cache line that the cores pass
//! back and forth (~100 ns a transfer). Ours, like the histograms, are
//! striped (`crate::stripe`): each thread writes its own cache line, and
//! a scrape sums the stripes.
//!
//! Histograms whose name has no retryctl bucket layout (any name outside
//! [`buckets_for`]) go to the Prometheus recorder unchanged, so metrics an
//! embedding application records through the same recorder still work.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use metrics::{
    Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, SharedString, Unit,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use super::buckets_for;
use crate::stripe::{Padded, STRIPES, Stripe};

/// A monotonic counter striped over [`STRIPES`] cache lines.
#[derive(Debug, Default)]
pub(crate) struct StripedCounter {
    stripes: [Padded<AtomicU64>; STRIPES],
    /// Histograms whose sample count the counter includes when rendered
    /// ([`AtOnce`]).
    addends: Mutex<Vec<Arc<BucketHistogram>>>,
}

impl StripedCounter {
    fn value(&self) -> u64 {
        let own = self
            .stripes
            .iter()
            .fold(0u64, |sum, s| sum.wrapping_add(s.0.load(Ordering::Relaxed)));
        lock(&self.addends)
            .iter()
            .fold(own, |sum, h| sum.wrapping_add(h.count()))
    }
}

/// The lock of render-time state (poisoning cannot leave it half-written:
/// every writer pushes one element).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl StripedCounter {
    /// Adds `value` in the stripe `at`.
    #[inline(always)]
    fn add_at(&self, at: Stripe, value: u64) {
        at.add(&self.stripes[at.index()].0, value);
    }
}

impl CounterFn for StripedCounter {
    #[inline]
    fn increment(&self, value: u64) {
        self.add_at(Stripe::current(), value);
    }

    /// Raises the counter to `value` (never lowers it), as Prometheus's
    /// recorder does.
    fn absolute(&self, value: u64) {
        let current = self.value();
        if value > current {
            self.increment(value - current);
        }
    }
}

/// One stripe of a histogram: per-bucket counts and the sum.
#[derive(Debug)]
struct HistogramStripe {
    /// `counts[i]`: samples `<= bounds[i]` and `> bounds[i - 1]`; the last
    /// one counts samples above every bound (`+Inf`).
    counts: Box<[AtomicU64]>,
    /// The sum of the samples, as `f64` bits.
    sum: AtomicU64,
    /// The sum of the samples recorded in nanoseconds ([`AtOnce`]), which
    /// the rendered sum includes in seconds.
    sum_nanos: AtomicU64,
}

/// A cumulative histogram with fixed bucket bounds, striped like
/// [`StripedCounter`] and updated with relaxed atomics (each bucket and
/// the sum are exact; a scrape that races a record may see the sample in
/// the buckets before it sees it in the sum, which Prometheus tolerates).
#[derive(Debug)]
pub(crate) struct BucketHistogram {
    bounds: &'static [f64],
    /// `below[e + 32]`: how many bounds are below `2^e` (`e` clamped to
    /// -32..=31; 0 for the lowest, which takes every smaller sample too),
    /// where the search for a sample in binade `e` starts.
    below: [u8; BINADES],
    /// The bucket of 1, where an [`Addend::Ones`] counts.
    one: usize,
    stripes: Box<[Padded<HistogramStripe>]>,
    /// What the histogram includes when rendered besides its own samples
    /// ([`AtOnce`]).
    addends: Mutex<Vec<Addend>>,
}

/// Samples a histogram includes at render time from another one.
#[derive(Debug)]
enum Addend {
    /// Every sample of a histogram with the same bounds.
    Samples(Arc<BucketHistogram>),
    /// A sample of 1 for every sample of a histogram (an attempt count
    /// of 1 for every request served at once).
    Ones(Arc<BucketHistogram>),
}

/// The binades [`BucketHistogram::bucket`] indexes: 2^-32 to 2^31.
const BINADES: usize = 64;

impl BucketHistogram {
    fn new(bounds: &'static [f64]) -> Self {
        let stripe = || {
            Padded(HistogramStripe {
                counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum: AtomicU64::new(0f64.to_bits()),
                sum_nanos: AtomicU64::new(0),
            })
        };
        let below = std::array::from_fn(|k| {
            if k == 0 {
                // Every sample below 2^-31 (its exponent clamped up).
                return 0;
            }
            let binade = 2f64.powi(k as i32 - 32);
            bounds
                .partition_point(|b| *b < binade)
                .min(usize::from(u8::MAX)) as u8
        });
        let mut histogram = BucketHistogram {
            bounds,
            below,
            one: 0,
            stripes: (0..STRIPES).map(|_| stripe()).collect(),
            addends: Mutex::default(),
        };
        histogram.one = histogram.bucket(1.0);
        histogram
    }

    /// The bucket of `value` (not NaN): the number of bounds below it,
    /// as `partition_point` would count them. The sample's binary exponent
    /// gives where to start, and the bounds within one binade (at most
    /// two in every retryctl layout) are scanned: about a third of a
    /// binary search's instructions, on every sample of every request.
    #[inline]
    fn bucket(&self, value: f64) -> usize {
        let mut i = if value > 0.0 {
            let exponent = ((value.to_bits() >> 52) & 0x7ff) as i32 - 1023;
            usize::from(self.below[(exponent.clamp(-32, 31) + 32) as usize])
        } else {
            0
        };
        while self.bounds.get(i).is_some_and(|b| *b < value) {
            i += 1;
        }
        i
    }

    /// This histogram's own samples: the count of each bucket (not
    /// cumulative) and the sum.
    fn own(&self) -> (Vec<u64>, f64) {
        let mut counts = vec![0u64; self.bounds.len() + 1];
        let mut sum = 0.0;
        let mut nanos = 0u64;
        for Padded(stripe) in self.stripes.iter() {
            for (total, c) in counts.iter_mut().zip(stripe.counts.iter()) {
                *total = total.wrapping_add(c.load(Ordering::Relaxed));
            }
            sum += f64::from_bits(stripe.sum.load(Ordering::Relaxed));
            nanos = nanos.wrapping_add(stripe.sum_nanos.load(Ordering::Relaxed));
        }
        if nanos != 0 {
            sum += Duration::from_nanos(nanos).as_secs_f64();
        }
        (counts, sum)
    }

    /// How many samples this histogram has of its own.
    fn count(&self) -> u64 {
        self.stripes
            .iter()
            .flat_map(|Padded(s)| s.counts.iter())
            .fold(0u64, |sum, c| sum.wrapping_add(c.load(Ordering::Relaxed)))
    }

    /// The cumulative count of each bucket (`le` order, `+Inf` last) and
    /// the sum, its addends included.
    fn snapshot(&self) -> (Vec<u64>, f64) {
        let (mut counts, mut sum) = self.own();
        for addend in lock(&self.addends).iter() {
            match addend {
                Addend::Samples(h) => {
                    let (theirs, their_sum) = h.own();
                    for (total, c) in counts.iter_mut().zip(theirs) {
                        *total = total.wrapping_add(c);
                    }
                    sum += their_sum;
                }
                Addend::Ones(h) => {
                    let n = h.count();
                    counts[self.one] = counts[self.one].wrapping_add(n);
                    sum += n as f64;
                }
            }
        }
        let mut running = 0u64;
        for c in &mut counts {
            running = running.wrapping_add(*c);
            *c = running;
        }
        (counts, sum)
    }
}

impl BucketHistogram {
    /// Adds `count` samples of `value` (not NaN) whose sum is `add`.
    #[inline(always)]
    fn add(&self, value: f64, count: u64, add: f64) {
        self.add_at(Stripe::current(), self.bucket(value), count, add);
    }

    /// [`BucketHistogram::add`] into `bucket`, in the stripe `at`.
    #[inline(always)]
    fn add_at(&self, at: Stripe, bucket: usize, count: u64, add: f64) {
        let Padded(stripe) = &self.stripes[at.index()];
        at.add(&stripe.counts[bucket], count);
        // There is no atomic f64 add: a load and a store on an owned
        // stripe, a compare-and-swap loop on the shared one.
        at.update(&stripe.sum, false, |bits| {
            (f64::from_bits(bits) + add).to_bits()
        });
    }
}

/// A histogram's bounds as durations in nanoseconds, for samples taken as
/// integers: `bounds[i]` is the longest duration whose seconds (as
/// `Duration::as_secs_f64` gives them, which is what a sample in seconds
/// is) are at most the histogram's `i`-th bound, so a sample lands in the
/// bucket its seconds would. Finding it takes no conversion to `f64` (a
/// float division, whose ~13 cycles the sample's store waits for).
#[derive(Debug)]
struct NanosBounds {
    bounds: Box<[u64]>,
    /// `below[k]`: how many bounds are below the smallest duration of `k`
    /// significant bits (`2^(k-1)` ns; none for `k = 0`, a duration of 0),
    /// where the search for a sample of `k` bits starts.
    below: [u8; 65],
}

impl NanosBounds {
    /// `None` if a bound is negative or NaN (no duration is below it).
    fn new(bounds: &[f64]) -> Option<Self> {
        let secs = |n: u64| Duration::from_nanos(n).as_secs_f64();
        let bounds = bounds
            .iter()
            .map(|&b| {
                if b.is_nan() || b < 0.0 {
                    return None;
                }
                // The last duration at most `b`: `secs` never decreases.
                let (mut lo, mut hi) = (0u64, u64::MAX);
                if secs(hi) <= b {
                    return Some(hi);
                }
                while hi - lo > 1 {
                    let mid = lo + (hi - lo) / 2;
                    if secs(mid) <= b { lo = mid } else { hi = mid }
                }
                Some(lo)
            })
            .collect::<Option<Box<[u64]>>>()?;
        let below = std::array::from_fn(|k| {
            let smallest = if k == 0 { 0 } else { 1u64 << (k - 1) };
            bounds
                .partition_point(|b| *b < smallest)
                .min(usize::from(u8::MAX)) as u8
        });
        Some(NanosBounds { bounds, below })
    }

    /// The bucket of a duration of `nanos`.
    #[inline]
    fn bucket(&self, nanos: u64) -> usize {
        let bits = (u64::BITS - nanos.leading_zeros()) as usize;
        let mut i = usize::from(self.below[bits]);
        while self.bounds.get(i).is_some_and(|b| *b < nanos) {
            i += 1;
        }
        i
    }
}

/// The samples of the requests one route served at once (one attempt, no
/// wait at a gate: the attempt's duration is the request's), recorded as
/// one histogram sample instead of five updates: the route's `ok` attempt
/// counter and attempt duration, the model's first-try outcome counter,
/// request duration and attempt count (a sample of 1) include them when
/// rendered. The text is the same as if each had been updated, and a
/// scrape sees a request in all five series or in none.
#[derive(Debug)]
pub(crate) struct AtOnce {
    samples: Arc<BucketHistogram>,
    nanos: NanosBounds,
}

impl AtOnce {
    /// Links a new one into the five series; `None` when the two duration
    /// histograms do not share their bounds (their buckets could not take
    /// the same samples).
    pub(crate) fn link(
        ok: &StripedCounter,
        attempt: &BucketHistogram,
        first_try: &StripedCounter,
        request: &BucketHistogram,
        attempts: &BucketHistogram,
    ) -> Option<AtOnce> {
        if !std::ptr::eq(attempt.bounds, request.bounds) {
            return None;
        }
        let nanos = NanosBounds::new(attempt.bounds)?;
        let samples = Arc::new(BucketHistogram::new(attempt.bounds));
        lock(&ok.addends).push(samples.clone());
        lock(&first_try.addends).push(samples.clone());
        lock(&attempt.addends).push(Addend::Samples(samples.clone()));
        lock(&request.addends).push(Addend::Samples(samples.clone()));
        lock(&attempts.addends).push(Addend::Ones(samples.clone()));
        Some(AtOnce { samples, nanos })
    }

    /// One request served at once, in `nanos` nanoseconds.
    #[inline]
    pub(crate) fn record(&self, nanos: u64) {
        let at = Stripe::current();
        let Padded(stripe) = &self.samples.stripes[at.index()];
        at.add(&stripe.counts[self.nanos.bucket(nanos)], 1);
        at.add(&stripe.sum_nanos, nanos);
    }
}

impl HistogramFn for BucketHistogram {
    /// One sample, the pool's only kind: without `record_many`'s count
    /// check and its conversion and product (`value x 1.0` is `value`),
    /// on every sample of every request.
    #[inline]
    fn record(&self, value: f64) {
        // A NaN would poison the sum forever; a duration is never one.
        if !value.is_nan() {
            self.add(value, 1, value);
        }
    }

    fn record_many(&self, value: f64, count: usize) {
        if value.is_nan() || count == 0 {
            return;
        }
        self.add(value, count as u64, value * count as f64);
    }
}

/// The counters and histograms of one recorder, by name then by labels.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    families: Mutex<BTreeMap<String, Family>>,
}

#[derive(Debug, Default)]
struct Family {
    help: Option<String>,
    /// Rendered label sets (`a="x",b="y"`), sorted.
    counters: BTreeMap<String, Arc<StripedCounter>>,
    histograms: BTreeMap<String, Arc<BucketHistogram>>,
}

/// A key's labels as the text format writes them.
fn label_text(key: &Key) -> String {
    let mut labels = String::new();
    for label in key.labels() {
        if !labels.is_empty() {
            labels.push(',');
        }
        let _ = write!(labels, "{}=\"{}\"", label.key(), escape(label.value()));
    }
    labels
}

/// `{labels}`, or nothing for no labels.
fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

impl Registry {
    fn describe(&self, name: &str, help: &str) {
        let mut families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        families.entry(name.to_owned()).or_default().help = Some(help.to_owned());
    }

    pub(crate) fn counter(&self, key: &Key) -> Arc<StripedCounter> {
        let labels = label_text(key);
        let mut families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        families
            .entry(key.name().to_owned())
            .or_default()
            .counters
            .entry(labels)
            .or_default()
            .clone()
    }

    pub(crate) fn histogram(&self, key: &Key, bounds: &'static [f64]) -> Arc<BucketHistogram> {
        let labels = label_text(key);
        let mut families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        families
            .entry(key.name().to_owned())
            .or_default()
            .histograms
            .entry(labels)
            .or_insert_with(|| Arc::new(BucketHistogram::new(bounds)))
            .clone()
    }

    /// Appends the counters and histograms in the Prometheus text format.
    fn render(&self, out: &mut String) {
        let families = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        for (name, family) in families.iter() {
            let kind = if !family.counters.is_empty() {
                "counter"
            } else if !family.histograms.is_empty() {
                "histogram"
            } else {
                continue;
            };
            if let Some(help) = &family.help {
                let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
            }
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, counter) in &family.counters {
                let _ = writeln!(out, "{name}{} {}", braces(labels), counter.value());
            }
            if kind == "counter" {
                // One type per family: a histogram registered under a
                // counter's name is not rendered.
                continue;
            }
            for (labels, histogram) in &family.histograms {
                let (cumulative, sum) = histogram.snapshot();
                let sep = if labels.is_empty() { "" } else { "," };
                let les = histogram.bounds.iter().map(|b| b.to_string());
                for (le, count) in les.chain(["+Inf".to_owned()]).zip(&cumulative) {
                    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {count}");
                }
                let count = cumulative.last().copied().unwrap_or(0);
                let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
                let _ = writeln!(out, "{name}_count{} {count}", braces(labels));
            }
        }
    }
}

/// A label value escaped for the text format.
fn escape(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', r#"\""#)
        .replace('\n', r"\n")
}

/// HELP text escaped for the text format.
fn escape_help(help: &str) -> String {
    help.replace('\\', r"\\").replace('\n', r"\n")
}

/// The recorder retryctl's metrics go to: install it (or make it the local
/// recorder) **before** building a pool, and render `/metrics` from its
/// [`handle`](Recorder::handle).
///
/// ```
/// use retryctl::telemetry::Recorder;
///
/// let recorder = Recorder::new();
/// let handle = recorder.handle();
/// metrics::with_local_recorder(&recorder, || {
///     metrics::histogram!("retryctl_request_duration_seconds", "model" => "m").record(0.2);
/// });
/// let text = handle.render();
/// assert!(text.contains(r#"retryctl_request_duration_seconds_bucket{model="m",le="0.25"} 1"#));
/// assert!(text.contains(r#"retryctl_request_duration_seconds_count{model="m"} 1"#));
/// ```
#[derive(Debug)]
pub struct Recorder {
    prometheus: PrometheusRecorder,
    registry: Arc<Registry>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// A recorder with nothing recorded yet.
    pub fn new() -> Self {
        Recorder {
            prometheus: PrometheusBuilder::new().build_recorder(),
            registry: Arc::default(),
        }
    }

    /// A handle that renders everything this recorder records.
    pub fn handle(&self) -> MetricsHandle {
        MetricsHandle {
            prometheus: self.prometheus.handle(),
            registry: self.registry.clone(),
        }
    }

    /// Installs this recorder as the process-wide one and returns its
    /// handle. Fails if a global recorder is already installed.
    pub fn install(self) -> Result<MetricsHandle, metrics::SetRecorderError<Recorder>> {
        let handle = self.handle();
        metrics::set_global_recorder(self)?;
        Ok(handle)
    }
}

/// The name a pool describes to learn whether the recorder installed is
/// this crate's own ([`installed_registry`]). Describing a name no metric
/// has changes nothing in any recorder.
const PROBE: &str = "retryctl_recorder_probe";

thread_local! {
    /// The recorder that answered [`PROBE`] on this thread (its address),
    /// and its registry.
    static ANSWER: std::cell::RefCell<Option<(usize, Arc<Registry>)>> =
        const { std::cell::RefCell::new(None) };
}

/// The registry of the recorder installed now (this thread's local one,
/// or the global one), if that recorder is a [`Recorder`] itself.
///
/// One wrapped in another recorder (a fan-out, a layer) answers the probe
/// too, and the pool must then go through the wrapper, which may want to
/// see every update. The answer counts only when it came from the
/// installed recorder's own address and that recorder is a `Recorder`'s
/// size: a wrapper holding ours as its first field shares its address,
/// and a wrapper with nothing beside ours (a forwarding newtype) is the
/// one case this cannot tell apart.
pub(crate) fn installed_registry() -> Option<Arc<Registry>> {
    metrics::with_recorder(|installed| {
        ANSWER.set(None);
        installed.describe_counter(
            KeyName::from_const_str(PROBE),
            None,
            SharedString::const_str(""),
        );
        let (answered, registry) = ANSWER.take()?;
        let address = (installed as *const dyn metrics::Recorder).cast::<()>() as usize;
        let ours = address == answered
            && std::mem::size_of_val(installed) == std::mem::size_of::<Recorder>();
        ours.then_some(registry)
    })
}

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        if key.as_str() == PROBE {
            let address = (self as *const Recorder).cast::<()>() as usize;
            ANSWER.set(Some((address, self.registry.clone())));
            return;
        }
        self.registry.describe(key.as_str(), &description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.prometheus.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        if buckets_for(key.as_str()).is_some() {
            self.registry.describe(key.as_str(), &description);
        } else {
            self.prometheus.describe_histogram(key, unit, description);
        }
    }

    fn register_counter(&self, key: &Key, _metadata: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.registry.counter(key))
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.prometheus.register_gauge(key, metadata)
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        match buckets_for(key.name()) {
            Some(bounds) => Histogram::from_arc(self.registry.histogram(key, bounds)),
            None => self.prometheus.register_histogram(key, metadata),
        }
    }
}

/// Renders what a [`Recorder`] recorded, in the Prometheus text format.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct MetricsHandle {
    prometheus: PrometheusHandle,
    registry: Arc<Registry>,
}

impl MetricsHandle {
    /// The current metrics in the Prometheus text format (0.0.4).
    pub fn render(&self) -> String {
        let mut out = self.prometheus.render();
        if !out.is_empty() && !out.ends_with("\n\n") {
            out.push('\n');
        }
        self.registry.render(&mut out);
        out
    }

    /// Folds buffered samples of histograms outside retryctl's layouts
    /// into their summaries (retryctl's counters and histograms need no
    /// upkeep).
    pub fn run_upkeep(&self) {
        self.prometheus.run_upkeep();
    }
}

#[cfg(test)]
mod bucket_tests {
    use super::*;
    use crate::telemetry::{ATTEMPTS_BUCKETS, DELAY_BUCKETS, SECONDS_BUCKETS};
    use proptest::prelude::*;

    const LAYOUTS: [&[f64]; 4] = [
        SECONDS_BUCKETS,
        ATTEMPTS_BUCKETS,
        DELAY_BUCKETS,
        &[1e-12, 0.3, 0.31, 0.32, 7.0, 1e12],
    ];

    fn agrees(value: f64) {
        for bounds in LAYOUTS {
            let h = BucketHistogram::new(bounds);
            assert_eq!(
                h.bucket(value),
                bounds.partition_point(|b| *b < value),
                "{value} in {bounds:?}"
            );
        }
    }

    #[test]
    fn the_binade_start_finds_the_binary_searchs_bucket_at_the_edges() {
        let mut values = vec![
            0.0,
            -0.0,
            -1.0,
            -1e300,
            f64::MIN_POSITIVE,
            5e-324,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MAX,
            2f64.powi(-32),
            2f64.powi(31),
            2f64.powi(40),
        ];
        for bounds in LAYOUTS {
            for &b in bounds {
                values.extend([b, b.next_down(), b.next_up()]);
            }
        }
        for v in values {
            agrees(v);
        }
    }

    /// A duration in nanoseconds lands in the bucket its seconds do.
    fn agrees_in_nanos(nanos: u64) {
        for bounds in LAYOUTS {
            let in_nanos = NanosBounds::new(bounds).expect("non-negative bounds");
            let seconds = Duration::from_nanos(nanos).as_secs_f64();
            assert_eq!(
                in_nanos.bucket(nanos),
                bounds.partition_point(|b| *b < seconds),
                "{nanos} ns in {bounds:?}"
            );
        }
    }

    #[test]
    fn a_duration_in_nanoseconds_finds_its_seconds_bucket_at_the_edges() {
        let mut values = vec![0, 1, 2, 999, 1_000, u64::MAX, u64::MAX - 1, 1 << 63];
        for bounds in LAYOUTS {
            let in_nanos = NanosBounds::new(bounds).expect("non-negative bounds");
            for &b in in_nanos.bounds.iter() {
                values.extend([b.saturating_sub(1), b, b.saturating_add(1)]);
            }
            for k in 0..64 {
                values.extend([(1u64 << k) - 1, 1 << k, (1 << k) + 1]);
            }
        }
        for v in values {
            agrees_in_nanos(v);
        }
        // A bound no duration is below: not a layout durations can take.
        assert!(NanosBounds::new(&[-1.0, 1.0]).is_none());
        assert!(NanosBounds::new(&[f64::NAN]).is_none());
    }

    proptest! {
        #[test]
        fn a_duration_in_nanoseconds_finds_its_seconds_bucket(nanos in any::<u64>()) {
            agrees_in_nanos(nanos);
        }

        #[test]
        fn a_short_duration_in_nanoseconds_finds_its_seconds_bucket(nanos in 0u64..20_000_000_000) {
            agrees_in_nanos(nanos);
        }

        #[test]
        fn the_binade_start_finds_the_binary_searchs_bucket(value in any::<f64>().prop_filter("not NaN", |v| !v.is_nan())) {
            agrees(value);
        }

        #[test]
        fn the_binade_start_finds_it_for_durations(value in 0.0f64..1000.0) {
            agrees(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_served_at_once_render_as_their_five_updates() {
        let bounds = super::super::SECONDS_BUCKETS;
        let series = || {
            (
                StripedCounter::default(),
                BucketHistogram::new(bounds),
                StripedCounter::default(),
                BucketHistogram::new(bounds),
                BucketHistogram::new(super::super::ATTEMPTS_BUCKETS),
            )
        };
        // One set of series updated five times per request, one taking
        // the same requests as one sample each, and a request of each
        // kind on the second (a retried one, recorded apart).
        let (ok, attempt, first_try, request, attempts) = series();
        let (ok2, attempt2, first_try2, request2, attempts2) = series();
        let at_once = AtOnce::link(&ok2, &attempt2, &first_try2, &request2, &attempts2)
            .expect("shared bounds");
        for nanos in [500_000, 20_000_000, 20_000_000, 3_500_000_000, 5_000_000] {
            let seconds = Duration::from_nanos(nanos).as_secs_f64();
            ok.increment(1);
            attempt.record(seconds);
            first_try.increment(1);
            request.record(seconds);
            attempts.record(1.0);
            at_once.record(nanos);
        }
        for (counter, histogram, attempts) in
            [(&ok, &request, &attempts), (&ok2, &request2, &attempts2)]
        {
            counter.increment(1);
            histogram.record(7.0);
            attempts.record(3.0);
        }
        assert_eq!(ok2.value(), ok.value());
        assert_eq!(ok2.value(), 6);
        assert_eq!(first_try2.value(), first_try.value());
        // The same buckets (5 ms exactly is in the bucket `le="0.005"`),
        // and the same sum but for the rounding of a sum of seconds.
        for (linked, updated) in [(&attempt2, &attempt), (&request2, &request)] {
            let ((counts, sum), (their_counts, their_sum)) =
                (linked.snapshot(), updated.snapshot());
            assert_eq!(counts, their_counts);
            assert!((sum - their_sum).abs() < 1e-12, "{sum} {their_sum}");
        }
        let five_ms = bounds
            .iter()
            .position(|b| *b == 0.005)
            .expect("a 5 ms bound");
        let (counts, _) = attempt2.snapshot();
        assert_eq!(counts[five_ms] - counts[five_ms - 1], 1);
        assert_eq!(attempts2.snapshot(), attempts.snapshot());
        // The attempt counts: five 1s in the bucket of 1, the 3 above it.
        let (cumulative, sum) = attempts2.snapshot();
        assert_eq!(&cumulative[..3], &[5, 5, 6]);
        assert_eq!(sum, 8.0);
        // Histograms that do not share their bounds are not linked.
        let (ok3, attempt3, first_try3, _, attempts3) = series();
        assert!(AtOnce::link(&ok3, &attempt3, &first_try3, &attempts3, &attempts3).is_none());
    }

    #[test]
    fn buckets_are_cumulative_with_le_semantics() {
        let h = BucketHistogram::new(&[1.0, 2.0, 5.0]);
        for v in [0.5, 1.0, 1.5, 2.0, 7.0, f64::NAN] {
            h.record(v);
        }
        h.record_many(3.0, 2);
        let (cumulative, sum) = h.snapshot();
        // <=1: 0.5, 1.0; <=2: +1.5, 2.0; <=5: +3.0 x2; +Inf: +7.0.
        assert_eq!(cumulative, vec![2, 4, 6, 7]);
        assert_eq!(sum, 0.5 + 1.0 + 1.5 + 2.0 + 7.0 + 6.0);
    }

    #[test]
    fn stripes_add_up_across_threads() {
        let c = Arc::new(StripedCounter::default());
        let h = Arc::new(BucketHistogram::new(&[1.0]));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (c, h) = (c.clone(), h.clone());
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        c.increment(1);
                        h.record(0.5);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.value(), 40_000);
        assert_eq!(h.snapshot(), (vec![40_000, 40_000], 20_000.0));
        c.absolute(39_000);
        assert_eq!(c.value(), 40_000);
        c.absolute(40_005);
        assert_eq!(c.value(), 40_005);
    }

    #[test]
    fn renders_families_with_help_and_escaped_labels() {
        let recorder = Recorder::new();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::describe_histogram!("x_attempts_per_request", "Attempts.");
            metrics::histogram!("x_attempts_per_request", "model" => "a\"b").record(2.0);
            metrics::histogram!("x_other", "model" => "m").record(2.0);
            metrics::describe_counter!("x_total", "Things.");
            metrics::counter!("x_total").increment(3);
        });
        let text = handle.render();
        assert!(
            text.contains("# HELP x_attempts_per_request Attempts.\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE x_attempts_per_request histogram\n"),
            "{text}"
        );
        assert!(
            text.contains("x_attempts_per_request_bucket{model=\"a\\\"b\",le=\"1\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("x_attempts_per_request_bucket{model=\"a\\\"b\",le=\"2\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("x_attempts_per_request_bucket{model=\"a\\\"b\",le=\"+Inf\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("x_attempts_per_request_sum{model=\"a\\\"b\"} 2\n"),
            "{text}"
        );
        // Not one of ours: the exporter's summary.
        assert!(text.contains("# TYPE x_other summary"), "{text}");
        assert!(
            text.contains("# HELP x_total Things.\n# TYPE x_total counter\nx_total 3\n"),
            "{text}"
        );
    }
}
