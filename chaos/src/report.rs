//! The report: `result.json` (the verdict, every figure, the faults, the harness's notes),
//! `history/*.jsonl` (the raw record, the evidence), and `report.html`, one self-contained page
//! with inline SVG plots — throughput and latency over time, and each subscriber's lag, with
//! the fault windows shaded.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use serde_json::Value as Json;

use crate::checker::{Checked, NodeHistory, Summary};
use crate::history::{AttemptResult, Outcome, Record};

/// Everything `result.json` holds besides the record.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// Scenario name.
    pub scenario: String,
    /// `local` or `compose`.
    pub target: String,
    /// The settings, as given.
    pub settings: Json,
    /// Unix time (ms) the run's clock started: every `t`, `start`, `end` in the record is in ms
    /// after it.
    pub started_at_unix_ms: u64,
    /// Wall time of the whole run, in seconds.
    pub wall_seconds: f64,
    /// Whether the cluster converged after the final heal, and how long it took (ms).
    pub recovered_ms: Option<f64>,
    /// Whether every subscriber caught up with every acknowledged value, and when (ms after the
    /// drain started).
    pub drained_ms: Option<f64>,
    /// Acknowledged values still missing at the end of the drain (all subscribers).
    pub missing_after_drain: usize,
    /// The verdict.
    pub checked: Checked,
    /// Where the report is.
    pub report: String,
}

/// Writes `result.json`, `history/` and `report.html` into `dir`.
pub fn write(
    dir: &Path,
    result: &RunResult,
    record: &Record,
    histories: &[NodeHistory],
) -> Result<()> {
    std::fs::create_dir_all(dir.join("history"))?;
    let mut json = serde_json::to_value(result)?;
    json["faults"] = serde_json::to_value(&record.faults)?;
    json["subscribers"] = serde_json::to_value(&record.subscribers)?;
    json["channels"] = serde_json::to_value(&record.channels)?;
    json["notes"] = serde_json::to_value(&record.log)?;
    std::fs::write(
        dir.join("result.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    lines(&dir.join("history/publishes.jsonl"), &record.publishes)?;
    lines(&dir.join("history/deliveries.jsonl"), &record.deliveries)?;
    lines(&dir.join("history/episodes.jsonl"), &record.episodes)?;
    lines(&dir.join("history/gaps.jsonl"), &record.gaps)?;
    std::fs::write(
        dir.join("history/nodes.json"),
        serde_json::to_string(histories)?,
    )?;
    std::fs::write(dir.join("report.html"), html(result, record))?;
    Ok(())
}

/// Reads a run's saved record back (for `herald-chaos check DIR`): the result without its
/// verdict, the record, and the nodes' histories.
pub fn load(dir: &Path) -> Result<(Json, Record, Vec<NodeHistory>)> {
    use anyhow::Context;
    let result: Json = serde_json::from_str(
        &std::fs::read_to_string(dir.join("result.json")).context("read result.json")?,
    )?;
    fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("read {}: {e}", path.display()))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| Ok(serde_json::from_str(l)?))
            .collect()
    }
    let record = Record {
        channels: serde_json::from_value(result["channels"].clone())?,
        subscribers: serde_json::from_value(result["subscribers"].clone())?,
        faults: serde_json::from_value(result["faults"].clone())?,
        log: serde_json::from_value(result["notes"].clone())?,
        publishes: read_lines(&dir.join("history/publishes.jsonl"))?,
        deliveries: read_lines(&dir.join("history/deliveries.jsonl"))?,
        episodes: read_lines(&dir.join("history/episodes.jsonl"))?,
        gaps: read_lines(&dir.join("history/gaps.jsonl"))?,
        ..Record::default()
    };
    let histories =
        serde_json::from_str(&std::fs::read_to_string(dir.join("history/nodes.json"))?)?;
    Ok((result, record, histories))
}

fn lines<T: Serialize>(path: &Path, items: &[T]) -> Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for item in items {
        serde_json::to_writer(&mut out, item)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn ms(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{v:.0}"))
}

fn summary_cells(s: &Summary) -> String {
    format!(
        "<td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
        s.count,
        ms(s.p50),
        ms(s.p99),
        ms(s.max)
    )
}

/// One plotted line.
struct Series {
    name: String,
    color: String,
    points: Vec<(f64, f64)>,
}

const PALETTE: [&str; 12] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#637939",
];

/// An SVG line chart over `0..x_max` seconds with the fault windows shaded.
fn chart(
    title: &str,
    y_label: &str,
    x_max: f64,
    series: &[Series],
    faults: &[(f64, f64, String)],
    log_y: bool,
) -> String {
    let (w, h) = (1000.0, 300.0);
    let (left, right, top, bottom) = (60.0, 10.0, 24.0, 30.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let y_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        .max(if log_y { 10.0 } else { 1.0 });
    let y_of = |y: f64| -> f64 {
        let f = if log_y {
            (y.max(1.0)).log10() / y_max.log10()
        } else {
            y / y_max
        };
        top + ph - f.clamp(0.0, 1.0) * ph
    };
    let x_of = |x: f64| left + (x / x_max.max(1.0)).clamp(0.0, 1.0) * pw;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="100%" style="max-width:{w}px;font:11px sans-serif">"#
    );
    let _ = write!(
        svg,
        r#"<text x="{left}" y="14" font-weight="bold">{}</text>"#,
        esc(title)
    );
    for (start, end, kind) in faults {
        let (x0, x1) = (x_of(*start), x_of(*end));
        let _ = write!(
            svg,
            r##"<rect x="{x0:.1}" y="{top}" width="{:.1}" height="{ph}" fill="#f4cccc" opacity="0.6"><title>{}</title></rect><text x="{:.1}" y="{:.1}" fill="#a33" font-size="9">{}</text>"##,
            (x1 - x0).max(1.0),
            esc(kind),
            x0 + 1.0,
            top + 9.0,
            esc(kind)
        );
    }
    // Axes and ticks.
    let _ = write!(
        svg,
        r##"<line x1="{left}" y1="{0}" x2="{1}" y2="{0}" stroke="#333"/><line x1="{left}" y1="{top}" x2="{left}" y2="{0}" stroke="#333"/>"##,
        top + ph,
        left + pw
    );
    let step = nice_step(x_max / 10.0);
    let mut x = 0.0;
    while x <= x_max {
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555">{x:.0}s</text>"##,
            x_of(x),
            top + ph + 14.0
        );
        x += step;
    }
    let ticks: Vec<f64> = if log_y {
        let mut t = vec![];
        let mut v = 1.0;
        while v <= y_max * 1.0001 {
            t.push(v);
            v *= 10.0;
        }
        t
    } else {
        let step = nice_step(y_max / 5.0);
        (0..=((y_max / step).floor() as usize))
            .map(|i| i as f64 * step)
            .collect()
    };
    for t in ticks {
        let y = y_of(t);
        let _ = write!(
            svg,
            r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
            left + pw,
            left - 4.0,
            y + 3.0,
            short(t)
        );
    }
    let _ = write!(
        svg,
        r##"<text x="12" y="{:.1}" transform="rotate(-90 12 {:.1})" text-anchor="middle" fill="#555">{}</text>"##,
        top + ph / 2.0,
        top + ph / 2.0,
        esc(y_label)
    );
    for s in series {
        if s.points.is_empty() {
            continue;
        }
        let path: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", x_of(x), y_of(y)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.2" points="{}"><title>{}</title></polyline>"#,
            s.color,
            path.join(" "),
            esc(&s.name)
        );
    }
    // Legend (up to 12 entries).
    let mut lx = left + 200.0;
    for s in series.iter().take(12) {
        let _ = write!(
            svg,
            r#"<rect x="{lx:.1}" y="6" width="10" height="8" fill="{}"/><text x="{:.1}" y="14">{}</text>"#,
            s.color,
            lx + 13.0,
            esc(&s.name)
        );
        lx += 13.0 + 7.0 * s.name.len() as f64 + 10.0;
    }
    svg.push_str("</svg>");
    svg
}

fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let f = raw / magnitude;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

fn short(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.0}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

/// The HTML page.
pub fn html(result: &RunResult, record: &Record) -> String {
    let end_ms = record
        .publishes
        .iter()
        .filter_map(|p| p.acked)
        .chain(record.deliveries.iter().map(|d| d.t))
        .fold(0.0f64, f64::max);
    let seconds = (end_ms / 1000.0).ceil() as usize + 1;
    let x_max = seconds as f64;
    let faults: Vec<(f64, f64, String)> = record
        .faults
        .iter()
        .map(|f| {
            (
                f.start / 1000.0,
                f.end.unwrap_or(end_ms) / 1000.0,
                format!("#{} {}", f.index, f.kind),
            )
        })
        .collect();

    // Throughput per second.
    let mut acks = vec![0.0; seconds];
    let mut failed = vec![0.0; seconds];
    let mut unknown = vec![0.0; seconds];
    let mut latencies: Vec<Vec<f64>> = vec![Vec::new(); seconds];
    for p in &record.publishes {
        if let Some(acked) = p.acked {
            let s = (acked / 1000.0) as usize;
            acks[s.min(seconds - 1)] += 1.0;
            latencies[s.min(seconds - 1)].push(acked - p.invoked);
        }
        for a in &p.attempts {
            let s = ((a.end / 1000.0) as usize).min(seconds - 1);
            match a.result {
                AttemptResult::Failed { .. } => failed[s] += 1.0,
                AttemptResult::Unknown { .. } => unknown[s] += 1.0,
                AttemptResult::Ok { .. } => {}
            }
        }
    }
    let per_second = |values: &[f64]| -> Vec<(f64, f64)> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| (i as f64 + 0.5, *v))
            .collect()
    };
    let throughput = chart(
        "Publishes per second (acknowledged; failed and unknown attempts)",
        "per second",
        x_max,
        &[
            Series {
                name: "acknowledged".into(),
                color: "#2ca02c".into(),
                points: per_second(&acks),
            },
            Series {
                name: "failed attempts".into(),
                color: "#d62728".into(),
                points: per_second(&failed),
            },
            Series {
                name: "unknown attempts".into(),
                color: "#ff7f0e".into(),
                points: per_second(&unknown),
            },
        ],
        &faults,
        false,
    );
    let quantile = |q: f64| -> Vec<(f64, f64)> {
        latencies
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_empty())
            .map(|(i, l)| {
                let mut l = l.clone();
                l.sort_by(f64::total_cmp);
                let idx = ((l.len() as f64 * q).ceil() as usize).clamp(1, l.len()) - 1;
                (i as f64 + 0.5, l[idx])
            })
            .collect()
    };
    let latency = chart(
        "Publish latency by acknowledgement second (first attempt to ack, retries included)",
        "ms (log)",
        x_max,
        &[
            Series {
                name: "p50".into(),
                color: "#1f77b4".into(),
                points: quantile(0.5),
            },
            Series {
                name: "p99".into(),
                color: "#ff7f0e".into(),
                points: quantile(0.99),
            },
            Series {
                name: "max".into(),
                color: "#d62728".into(),
                points: quantile(1.0),
            },
        ],
        &faults,
        true,
    );

    // Lag per subscriber: acknowledged values of its channel it has not received yet.
    let mut received: Vec<BTreeMap<crate::history::ValueId, f64>> =
        vec![BTreeMap::new(); record.subscribers.len()];
    for d in &record.deliveries {
        if let Some(v) = d.value {
            received[d.sub].entry(v).or_insert(d.t);
        }
    }
    let mut lag_series = Vec::new();
    for sub in &record.subscribers {
        let mut diff = vec![0.0f64; seconds + 1];
        for p in record
            .publishes
            .iter()
            .filter(|p| p.channel == sub.channel && p.outcome == Outcome::Ok)
        {
            let acked = p.acked.unwrap_or(0.0);
            let got = received[sub.id].get(&p.value).copied().unwrap_or(f64::MAX);
            if got <= acked {
                continue;
            }
            let from = ((acked / 1000.0).ceil() as usize).min(seconds);
            let to = if got == f64::MAX {
                seconds
            } else {
                ((got / 1000.0).ceil() as usize).min(seconds)
            };
            if from < to {
                diff[from] += 1.0;
                diff[to] -= 1.0;
            }
        }
        let mut level = 0.0;
        let points: Vec<(f64, f64)> = (0..seconds)
            .map(|s| {
                level += diff[s];
                (s as f64, level)
            })
            .collect();
        lag_series.push(Series {
            name: format!("{} {}", sub.protocol.name(), record.channels[sub.channel]),
            color: PALETTE[sub.id % PALETTE.len()].into(),
            points,
        });
    }
    let lag = chart(
        "Lag per subscriber (acknowledged events of its channel not yet received)",
        "events",
        x_max,
        &lag_series,
        &faults,
        false,
    );

    let c = &result.checked;
    let m = &c.metrics;
    let s = &c.stats;
    let mut page = String::new();
    let verdict = if c.valid {
        r#"<span style="color:#2a2">VALID: no violation of the delivery contract</span>"#
            .to_string()
    } else {
        format!(
            r#"<span style="color:#c22">INVALID: {} violations</span>"#,
            c.violation_counts.values().sum::<usize>()
        )
    };
    let _ = write!(
        page,
        r#"<!doctype html><html><head><meta charset="utf-8"><title>herald-chaos: {name}</title>
<style>body{{font:14px sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top}}th{{background:#f4f4f4}}code{{font-size:12px}}</style></head><body>
<h1>herald-chaos: {name}</h1><h2>{verdict}</h2>
<p>Target <b>{target}</b>, clock started at unix {started} ms (node logs are in UTC; fault start times are given in UTC below), wall time {wall:.0} s. Faults injected: <b>{faults}</b>. Cluster converged {recovered} after the final heal; subscribers caught up {drained} ({missing} acknowledged values still missing after the drain).</p>"#,
        name = esc(&result.scenario),
        target = esc(&result.target),
        started = result.started_at_unix_ms,
        wall = result.wall_seconds,
        faults = s.faults,
        recovered = result
            .recovered_ms
            .map_or("NOT (timed out)".into(), |t| format!("in {t:.0} ms")),
        drained = result
            .drained_ms
            .map_or("NOT (timed out)".into(), |t| format!("in {t:.0} ms")),
        missing = result.missing_after_drain,
    );
    page.push_str("<h2>Violations</h2>");
    if c.violation_counts.is_empty() {
        page.push_str("<p>None.</p>");
    } else {
        page.push_str("<table><tr><th>kind</th><th>count</th></tr>");
        for (kind, n) in &c.violation_counts {
            let _ = write!(page, "<tr><td>{kind}</td><td>{n}</td></tr>");
        }
        page.push_str("</table><table><tr><th>kind</th><th>clause</th><th>detail</th></tr>");
        for v in &c.violations {
            let _ = write!(
                page,
                "<tr><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
                v.kind,
                v.clause,
                esc(&v.detail)
            );
        }
        page.push_str("</table>");
    }
    let _ = write!(
        page,
        r#"<h2>Counts</h2><table>
<tr><th>values published</th><td>{}</td></tr><tr><th>acknowledged</th><td>{}</td></tr>
<tr><th>certainly failed</th><td>{}</td></tr><tr><th>unknown outcome (of which committed)</th><td>{} ({})</td></tr>
<tr><th>attempts</th><td>{}</td></tr><tr><th>acks with duplicate=true</th><td>{}</td></tr>
<tr><th>committed values</th><td>{}</td></tr><tr><th>events delivered to subscribers</th><td>{}</td></tr>
<tr><th>gap notices</th><td>{}</td></tr><tr><th>history entries per node</th><td>{:?}</td></tr></table>"#,
        s.values,
        s.ok,
        s.failed,
        s.unknown,
        s.unknown_committed,
        s.attempts,
        s.duplicate_acks,
        s.committed,
        s.deliveries,
        s.gap_notices,
        s.history_entries
    );
    let _ = write!(
        page,
        r#"<h2>Figures</h2><table><tr><th>ms</th><th>n</th><th>p50</th><th>p99</th><th>max</th></tr>
<tr><th>failover: fault to first acknowledged publish on a partition that lost its leader, sent to a surviving node</th>{}</tr>
<tr><th>resume: fault to first event on a subscriber's next connection</th>{}</tr>
<tr><th>publish latency, all</th>{}</tr><tr><th>publish latency, sent during faults</th>{}</tr>
<tr><th>publish latency, sent outside faults</th>{}</tr></table>
<p>Acknowledged publishes per second: {:.1} overall, {:.1} during faults, {:.1} outside faults. Redeliveries: {}.</p>"#,
        summary_cells(&m.failover_publish),
        summary_cells(&m.resume),
        summary_cells(&m.latency),
        summary_cells(&m.latency_in_faults),
        summary_cells(&m.latency_outside_faults),
        m.throughput,
        m.throughput_in_faults,
        m.throughput_outside_faults,
        m.redeliveries.values().sum::<u64>()
    );
    page.push_str("<table><tr><th>fault kind</th><th colspan=4>failover (n, p50, p99, max)</th><th colspan=4>resume (n, p50, p99, max)</th></tr>");
    let kinds: std::collections::BTreeSet<&String> = m
        .failover_publish_by_kind
        .keys()
        .chain(m.resume_by_kind.keys())
        .collect();
    for kind in kinds {
        let empty = Summary::default();
        let _ = write!(
            page,
            "<tr><td>{kind}</td>{}{}</tr>",
            summary_cells(m.failover_publish_by_kind.get(kind).unwrap_or(&empty)),
            summary_cells(m.resume_by_kind.get(kind).unwrap_or(&empty))
        );
    }
    page.push_str("</table>");
    let _ = write!(page, "<h2>Over time</h2>{throughput}{latency}{lag}");
    page.push_str("<h2>Faults</h2><table><tr><th>#</th><th>kind</th><th>nodes</th><th>window (s)</th><th>start (UTC)</th><th>detail</th><th>leaders before</th></tr>");
    for f in &record.faults {
        let mut leaders: Vec<(&String, &u64)> = f.leaders_before.iter().collect();
        leaders.sort();
        let leaders: Vec<String> = leaders.iter().map(|(g, l)| format!("{g}:{l}")).collect();
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{:?}</td><td>{:.1} - {}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            f.index,
            esc(&f.kind),
            f.nodes,
            f.start / 1000.0,
            f.end.map_or("-".into(), |e| format!(
                "{:.1} (injected in {:.0} ms)",
                e / 1000.0,
                (f.injected - f.start).max(0.0)
            )),
            f.start_utc,
            esc(&f.detail),
            leaders.join(" ")
        );
    }
    page.push_str("</table><h2>Subscribers</h2><table><tr><th>#</th><th>protocol</th><th>channel</th><th>connections</th><th>redeliveries</th><th>why connections ended</th></tr>");
    for sub in &record.subscribers {
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for e in record.episodes.iter().filter(|e| e.sub == sub.id) {
            let reason: String = e.reason.chars().take(60).collect();
            *reasons.entry(reason).or_default() += 1;
        }
        let reasons: Vec<String> = reasons.iter().map(|(r, n)| format!("{n}× {r}")).collect();
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            sub.id,
            sub.protocol.name(),
            esc(&record.channels[sub.channel]),
            m.connections.get(&sub.id).unwrap_or(&0),
            m.redeliveries.get(&sub.id).unwrap_or(&0),
            esc(&reasons.join("; "))
        );
    }
    page.push_str("</table><h2>Harness log</h2><pre>");
    for (t, text) in &record.log {
        let _ = writeln!(
            page,
            "{:>8.1}s  {}Z  {}",
            t / 1000.0,
            crate::history::utc(result.started_at_unix_ms, *t),
            esc(text)
        );
    }
    let _ = write!(
        page,
        "</pre><h2>Settings</h2><pre>{}</pre><p>Raw record: <code>history/</code>; node logs: <code>nodes/</code>; verdict: <code>result.json</code>.</p></body></html>",
        esc(&serde_json::to_string_pretty(&result.settings).unwrap_or_default())
    );
    page
}
