//! Prometheus metrics: installs the recorder the gateway's `metrics` calls report to, with
//! histogram buckets (so latencies are histograms, not summaries) and periodic upkeep.

use anyhow::{Context, Result};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::Arc;
use std::time::Duration;

/// The installed recorder.
pub struct Metrics {
    handle: PrometheusHandle,
}

/// Publish-to-commit latency buckets, in seconds: 100 µs to 5 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

impl Metrics {
    /// Installs the global recorder. Must run inside a Tokio runtime (for the upkeep task).
    pub fn install() -> Result<Metrics> {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), LATENCY_BUCKETS)
            .context("invalid metrics buckets")?
            .install_recorder()
            .context("cannot install the metrics recorder")?;
        let upkeep = handle.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(5));
            loop {
                ticker.tick().await;
                upkeep.run_upkeep();
            }
        });
        Ok(Metrics { handle })
    }

    /// Renders the Prometheus text format (what `/metrics` serves).
    pub fn renderer(&self) -> Arc<dyn Fn() -> String + Send + Sync> {
        let handle = self.handle.clone();
        Arc::new(move || handle.render())
    }
}
