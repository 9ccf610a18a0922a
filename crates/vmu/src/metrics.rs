//! Prometheus metrics of the VMU, registered on the registry the server exposes on /metrics.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::error::VmuError;

/// Handles to every VMU metric. Cloning shares the same series.
#[derive(Clone, Debug)]
pub struct VmuMetrics {
    pub kv_capacity_bytes: IntGauge,
    pub kv_used_bytes: IntGauge,
    pub kv_used_bytes_peak: IntGauge,
    pub swap_out_total: IntCounter,
    pub swap_in_total: IntCounter,
    pub swap_out_bytes_total: IntCounter,
    pub swap_in_bytes_total: IntCounter,
    /// `direction` = "out" | "in"; issue to completion of one session's swap.
    pub swap_seconds: HistogramVec,
    /// `region` = "weights" | "kv" | "scratch" | "host_swap".
    pub region_used_bytes: IntGaugeVec,
    pub region_free_bytes: IntGaugeVec,
    /// `region` = "weights": 1 - largest free range / free bytes (KV blocks are fixed-size: none).
    pub fragmentation_ratio: GaugeVec,
    pub sessions_open: IntGauge,
    pub sessions_swapped: IntGauge,
    pub admission_refused_total: IntCounter,
    /// Paused states refused a charge (`Vmu::hold_paused`: no room on the device or the host pool).
    pub paused_refused_total: IntCounter,
    /// Label values resolved once: `with_label_values` hashes and locks, too slow per append.
    resolved: Resolved,
}

#[derive(Clone, Debug)]
struct Resolved {
    swap_out: Histogram,
    swap_in: Histogram,
    /// (used, free) per region, in [`REGIONS`] order.
    regions: Vec<(IntGauge, IntGauge)>,
    weights_fragmentation: Gauge,
}

// "paused" / "paused_host": paused states charged to the KV blocks (inside "kv") / host pool.
const REGIONS: [&str; 6] = ["weights", "kv", "scratch", "host_swap", "paused", "paused_host"];

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> Result<T, VmuError> {
    r.register(Box::new(m.clone())).map_err(|e| VmuError::Config(format!("registering VMU metrics: {e}")))?;
    Ok(m)
}

fn mk<T>(r: Result<T, prometheus::Error>) -> Result<T, VmuError> {
    r.map_err(|e| VmuError::Config(format!("creating VMU metrics: {e}")))
}

impl VmuMetrics {
    pub fn new(r: &Registry) -> Result<Self, VmuError> {
        let g = |n: &str, h: &str| -> Result<IntGauge, VmuError> { reg(r, mk(IntGauge::new(n, h))?) };
        let c = |n: &str, h: &str| -> Result<IntCounter, VmuError> { reg(r, mk(IntCounter::new(n, h))?) };
        let swap_buckets = prometheus::exponential_buckets(1e-5, 2.0, 22).expect("static buckets");
        let mut m = VmuMetrics {
            kv_capacity_bytes: g("djinn_kv_capacity_bytes", "KV cache capacity on the device")?,
            kv_used_bytes: g("djinn_kv_used_bytes", "KV bytes in blocks held by sessions")?,
            kv_used_bytes_peak: g("djinn_kv_used_bytes_peak", "high-water mark of djinn_kv_used_bytes")?,
            swap_out_total: c("djinn_swap_out_total", "sessions swapped out to the host pool")?,
            swap_in_total: c("djinn_swap_in_total", "sessions swapped back in")?,
            swap_out_bytes_total: c("djinn_swap_out_bytes_total", "KV bytes copied device to host")?,
            swap_in_bytes_total: c("djinn_swap_in_bytes_total", "KV bytes copied host to device")?,
            swap_seconds: reg(
                r,
                mk(HistogramVec::new(
                    HistogramOpts::new("djinn_swap_seconds", "latency of one session's swap, issue to completion")
                        .buckets(swap_buckets),
                    &["direction"],
                ))?,
            )?,
            region_used_bytes: reg(
                r,
                mk(IntGaugeVec::new(
                    Opts::new("djinn_vmu_region_used_bytes", "bytes in use per VMU region"),
                    &["region"],
                ))?,
            )?,
            region_free_bytes: reg(
                r,
                mk(IntGaugeVec::new(
                    Opts::new("djinn_vmu_region_free_bytes", "bytes free per VMU region"),
                    &["region"],
                ))?,
            )?,
            fragmentation_ratio: reg(
                r,
                mk(GaugeVec::new(
                    Opts::new("djinn_vmu_fragmentation_ratio", "1 - largest free range / free bytes"),
                    &["region"],
                ))?,
            )?,
            sessions_open: g("djinn_vmu_sessions_open", "sessions holding KV state")?,
            sessions_swapped: g("djinn_vmu_sessions_swapped", "sessions whose KV lives in the host pool")?,
            admission_refused_total: c("djinn_vmu_admission_refused_total", "new sessions refused: KV and swap full")?,
            paused_refused_total: c("djinn_vmu_paused_refused_total", "paused states refused: KV and swap full")?,
            resolved: Resolved {
                swap_out: Histogram::with_opts(HistogramOpts::new("unused", "unused")).expect("static opts"),
                swap_in: Histogram::with_opts(HistogramOpts::new("unused", "unused")).expect("static opts"),
                regions: Vec::new(),
                weights_fragmentation: Gauge::new("unused", "unused").expect("static opts"),
            },
        };
        m.resolved = Resolved {
            swap_out: m.swap_seconds.with_label_values(&["out"]),
            swap_in: m.swap_seconds.with_label_values(&["in"]),
            regions: REGIONS
                .iter()
                .map(|r| (m.region_used_bytes.with_label_values(&[r]), m.region_free_bytes.with_label_values(&[r])))
                .collect(),
            weights_fragmentation: m.fragmentation_ratio.with_label_values(&["weights"]),
        };
        Ok(m)
    }

    pub(crate) fn swap_hist(&self, out: bool) -> &Histogram {
        if out {
            &self.resolved.swap_out
        } else {
            &self.resolved.swap_in
        }
    }

    pub(crate) fn set_region(&self, region: &str, used: usize, free: usize) {
        let i = REGIONS.iter().position(|r| *r == region).expect("known region label");
        self.resolved.regions[i].0.set(used as i64);
        self.resolved.regions[i].1.set(free as i64);
    }

    pub(crate) fn weights_fragmentation(&self) -> &Gauge {
        &self.resolved.weights_fragmentation
    }
}
