//! Results of runs and their presentation: one human-readable line (plus warnings), one JSON
//! object, or the `compare` table.

use crate::cli::Target;
use crate::pubsub::Scenario;
use hdrhistogram::Histogram;
use std::fmt::Write as _;
use std::time::Duration;

/// A read gap above this is reported as a stall.
const STALL_WARNING: Duration = Duration::from_millis(100);

/// What one run measured. Counts cover messages sent inside the measured window.
#[derive(Debug)]
pub struct RunResult {
    /// The scenario that ran.
    pub scenario: Scenario,
    /// Messages published (acknowledged or not) inside the window.
    pub published: u64,
    /// Deliveries expected: published x subscribers of the message's channel.
    pub expected: u64,
    /// Deliveries seen, summed over subscribers.
    pub delivered: u64,
    /// Publish-to-delivery latency of the delivered messages, in microseconds.
    pub hist: Histogram<u64>,
    /// Messages skipped between delivered ones (gaps in sequence numbers), whole run.
    pub lost: u64,
    /// Messages delivered out of order, whole run.
    pub reordered: u64,
    /// Messages on the bench channels not sent by this run.
    pub foreign: u64,
    /// Longest time any subscriber went without reading anything inside the window.
    pub max_gap: Duration,
    /// Time to connect and subscribe everything.
    pub setup: Duration,
    /// Time spent waiting for late deliveries after publishing stopped.
    pub drained: Duration,
    /// Live subscribers still missing messages when the drain ended.
    pub undrained: usize,
    /// Subscribers whose connection ended early, and why.
    pub disconnected: Vec<String>,
    /// Publisher failures.
    pub errors: Vec<String>,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

impl Latency {
    /// Percentiles of a histogram of microseconds.
    pub fn of(hist: &Histogram<u64>) -> Self {
        Latency {
            p50: hist.value_at_quantile(0.5),
            p90: hist.value_at_quantile(0.9),
            p99: hist.value_at_quantile(0.99),
            p999: hist.value_at_quantile(0.999),
            max: hist.max(),
            mean: hist.mean(),
        }
    }
}

impl RunResult {
    /// Messages published per second inside the window.
    pub fn published_per_s(&self) -> f64 {
        self.published as f64 / self.scenario.duration.as_secs_f64()
    }

    /// Deliveries per second (over all subscribers) of messages sent inside the window.
    pub fn delivered_per_s(&self) -> f64 {
        self.delivered as f64 / self.scenario.duration.as_secs_f64()
    }

    /// Delivered / expected deliveries; `None` without any expected.
    pub fn delivery_ratio(&self) -> Option<f64> {
        (self.expected > 0).then(|| self.delivered as f64 / self.expected as f64)
    }

    /// Latency percentiles.
    pub fn latency(&self) -> Latency {
        Latency::of(&self.hist)
    }

    /// Warnings about anything abnormal in the run.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.disconnected.is_empty() {
            let shown: Vec<&str> = self
                .disconnected
                .iter()
                .take(3)
                .map(String::as_str)
                .collect();
            out.push(format!(
                "{} subscriber(s) disconnected: {}{}",
                self.disconnected.len(),
                shown.join("; "),
                if self.disconnected.len() > 3 {
                    "; ..."
                } else {
                    ""
                }
            ));
        }
        out.extend(self.errors.iter().cloned());
        if self.undrained > 0 {
            out.push(format!(
                "{} subscriber(s) still missing messages {:.1}s after publishing stopped",
                self.undrained,
                self.drained.as_secs_f64()
            ));
        }
        if self.lost > 0 || self.reordered > 0 {
            out.push(format!(
                "sequence gaps: {} message(s) lost, {} reordered",
                self.lost, self.reordered
            ));
        }
        if self.foreign > 0 {
            out.push(format!(
                "{} message(s) on bench channels from another client",
                self.foreign
            ));
        }
        if self.max_gap >= STALL_WARNING {
            out.push(format!(
                "stall: a subscriber read nothing for {} ms",
                self.max_gap.as_millis()
            ));
        }
        out
    }

    /// One human-readable line, followed by warning lines if any.
    pub fn human(&self) -> String {
        let s = &self.scenario;
        let l = self.latency();
        let rate = s.rate.map_or("unlimited".to_owned(), |r| {
            format!("{} msg/s", thousands(r as f64))
        });
        let ratio = self
            .delivery_ratio()
            .map_or("n/a".to_owned(), |r| format!("{r:.4}"));
        let mut out = format!(
            "{}: {}P x {}S, {} ch, {} B, pipeline {}, rate {}: published {} msg/s, delivered {} msg/s, \
             ratio {}, latency us p50 {} p90 {} p99 {} p99.9 {} max {}",
            s.label,
            s.publishers,
            s.subscribers,
            s.channels,
            s.payload,
            s.pipeline,
            rate,
            thousands(self.published_per_s()),
            thousands(self.delivered_per_s()),
            ratio,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
        );
        for warning in self.warnings() {
            let _ = write!(out, "\n  warning: {warning}");
        }
        out
    }

    /// One JSON object.
    pub fn json(&self) -> String {
        let s = &self.scenario;
        let l = self.latency();
        let mut out = String::with_capacity(1024);
        let _ = write!(
            out,
            "{{\"label\":{},\"addr\":{},\"publishers\":{},\"subscribers\":{},\"channels\":{},\
             \"payload\":{},\"pipeline\":{},\"rate\":{},\"duration_s\":{},\"warmup_s\":{},\
             \"published\":{},\"published_per_s\":{:.1},\"delivered\":{},\"delivered_per_s\":{:.1},\
             \"expected\":{},\"delivery_ratio\":{},\"latency_us\":{},\"lost\":{},\"reordered\":{},\
             \"foreign\":{},\"max_read_gap_ms\":{:.3},\"setup_s\":{:.3},\"drain_s\":{:.3},\
             \"undrained_subscribers\":{},\"disconnected\":{},\"warnings\":{}}}",
            json_str(&s.label),
            json_str(&s.addr),
            s.publishers,
            s.subscribers,
            s.channels,
            s.payload,
            s.pipeline,
            s.rate.map_or("null".to_owned(), |r| r.to_string()),
            s.duration.as_secs_f64(),
            s.warmup.as_secs_f64(),
            self.published,
            self.published_per_s(),
            self.delivered,
            self.delivered_per_s(),
            self.expected,
            self.delivery_ratio()
                .map_or("null".to_owned(), |r| format!("{r:.6}")),
            latency_json(&l),
            self.lost,
            self.reordered,
            self.foreign,
            self.max_gap.as_secs_f64() * 1e3,
            self.setup.as_secs_f64(),
            self.drained.as_secs_f64(),
            self.undrained,
            self.disconnected.len(),
            json_list(&self.warnings()),
        );
        out
    }
}

/// Latency percentiles as a JSON object.
pub fn latency_json(l: &Latency) -> String {
    format!(
        "{{\"p50\":{},\"p90\":{},\"p99\":{},\"p99_9\":{},\"max\":{},\"mean\":{:.1}}}",
        l.p50, l.p90, l.p99, l.p999, l.max, l.mean
    )
}

/// Runs of one side of a `compare` for one payload size, merged.
#[derive(Debug)]
pub struct Side {
    /// Mean deliveries per second over the rounds.
    pub delivered_per_s: f64,
    /// Mean delivery ratio over the rounds.
    pub delivery_ratio: Option<f64>,
    /// Latency over all rounds' deliveries.
    pub latency: Latency,
    /// Rounds with warnings.
    pub troubled_rounds: usize,
}

impl Side {
    /// Merges the rounds of one side; `None` without any.
    pub fn merge(runs: &[&RunResult]) -> Option<Side> {
        let first = runs.first()?;
        let mut hist = first.hist.clone();
        for run in &runs[1..] {
            hist.add(&run.hist).ok()?;
        }
        let n = runs.len() as f64;
        let ratios: Vec<f64> = runs.iter().filter_map(|r| r.delivery_ratio()).collect();
        Some(Side {
            delivered_per_s: runs.iter().map(|r| r.delivered_per_s()).sum::<f64>() / n,
            delivery_ratio: (!ratios.is_empty())
                .then(|| ratios.iter().sum::<f64>() / ratios.len() as f64),
            latency: Latency::of(&hist),
            troubled_rounds: runs.iter().filter(|r| !r.warnings().is_empty()).count(),
        })
    }

    fn json(&self) -> String {
        format!(
            "{{\"delivered_per_s\":{:.1},\"delivery_ratio\":{},\"latency_us\":{},\"troubled_rounds\":{}}}",
            self.delivered_per_s,
            self.delivery_ratio
                .map_or("null".to_owned(), |r| format!("{r:.6}")),
            latency_json(&self.latency),
            self.troubled_rounds
        )
    }
}

/// One row of the `compare` table.
#[derive(Debug)]
pub struct CompareRow {
    /// Payload size in bytes.
    pub payload: usize,
    /// First server.
    pub a: Side,
    /// Second server.
    pub b: Side,
}

impl CompareRow {
    /// A's delivered msg/s over B's.
    pub fn ratio(&self) -> f64 {
        self.a.delivered_per_s / self.b.delivered_per_s
    }
}

/// The `compare` table as text.
pub fn compare_table(a: &Target, b: &Target, rows: &[CompareRow]) -> String {
    let ratio_title = format!("{}/{}", a.label, b.label);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>8} | {:>14} {:>8} {:>8} {:>7} | {:>14} {:>8} {:>8} {:>7} | {:>10}",
        "payload",
        format!("{} msg/s", a.label),
        "p50 us",
        "p99 us",
        "ratio",
        format!("{} msg/s", b.label),
        "p50 us",
        "p99 us",
        "ratio",
        ratio_title,
    );
    for row in rows {
        let side = |s: &Side| {
            format!(
                "{:>14} {:>8} {:>8} {:>7}{}",
                thousands(s.delivered_per_s),
                s.latency.p50,
                s.latency.p99,
                s.delivery_ratio
                    .map_or("n/a".to_owned(), |r| format!("{r:.4}")),
                if s.troubled_rounds > 0 { "!" } else { "" }
            )
        };
        let _ = writeln!(
            out,
            "{:>8} | {} | {} | {:>10.3}",
            format!("{} B", row.payload),
            side(&row.a),
            side(&row.b),
            row.ratio()
        );
    }
    if rows
        .iter()
        .any(|r| r.a.troubled_rounds + r.b.troubled_rounds > 0)
    {
        out.push_str("(! = some rounds had warnings, see above)\n");
    }
    out
}

/// The `compare` outcome as one JSON object.
pub fn compare_json(a: &Target, b: &Target, rows: &[CompareRow], runs: &[RunResult]) -> String {
    let target = |t: &Target| {
        format!(
            "{{\"label\":{},\"addr\":{}}}",
            json_str(&t.label),
            json_str(&t.addr)
        )
    };
    let rows: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"payload\":{},\"a\":{},\"b\":{},\"delivered_ratio_a_b\":{:.4}}}",
                r.payload,
                r.a.json(),
                r.b.json(),
                r.ratio()
            )
        })
        .collect();
    let runs: Vec<String> = runs.iter().map(RunResult::json).collect();
    format!(
        "{{\"a\":{},\"b\":{},\"rows\":[{}],\"runs\":[{}]}}",
        target(a),
        target(b),
        rows.join(","),
        runs.join(",")
    )
}

/// Formats a rate with thousands separators, no decimals.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A JSON string literal.
pub fn json_str(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON array of strings.
pub fn json_list(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|s| json_str(s)).collect();
    format!("[{}]", items.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_thousands() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
    }

    #[test]
    fn escapes_json() {
        assert_eq!(json_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        assert_eq!(json_list(&["x".into(), "y".into()]), "[\"x\",\"y\"]");
    }
}
