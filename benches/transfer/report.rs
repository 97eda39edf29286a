//! Results

#[allow(unused_imports)]
use crate::prelude::*;

/// One measured figure: its samples (one per run) and what it is compared with.
pub struct Row {
    pub workload: String,
    pub variant: String,
    pub metric: String,
    pub unit: String,
    pub samples: Vec<f64>,
    /// (column, yardstick key): the ratio median / yardstick median is shown in the column.
    pub compare: Vec<(&'static str, String)>,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Yardstick samples by key ("raw", "raw+fsync", "sftp put", ...), higher is better.
    pub yardsticks: BTreeMap<String, Vec<f64>>,
    pub notes: Vec<String>,
    pub failures: Vec<String>,
}

/// Ratio columns of the table, in order.
pub const COLUMNS: [&str; 5] = ["raw", "raw+fsync", "sftp", "rsync", "dufs"];

impl Report {
    pub fn row(
        &mut self,
        workload: &str,
        variant: &str,
        metric: &str,
        unit: &str,
        samples: Vec<f64>,
    ) -> &mut Row {
        self.rows.push(Row {
            workload: workload.into(),
            variant: variant.into(),
            metric: metric.into(),
            unit: unit.into(),
            samples,
            compare: Vec::new(),
        });
        self.rows.last_mut().expect("just pushed")
    }

    pub fn yardstick(&mut self, key: &str, samples: &[f64]) {
        self.yardsticks
            .entry(key.into())
            .or_default()
            .extend_from_slice(samples);
    }

    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        eprintln!("note: {note}");
        self.notes.push(note);
    }

    pub fn fail(&mut self, what: &str, error: &anyhow::Error) {
        let message = format!("{what}: {error:#}");
        eprintln!("FAILED: {message}");
        self.failures.push(message);
    }

    pub fn ratio(&self, row: &Row, column: &str) -> Option<f64> {
        let (_, key) = row.compare.iter().find(|(c, _)| *c == column)?;
        let base = median(self.yardsticks.get(key)?)?;
        let value = median(&row.samples)?;
        (base > 0.0).then(|| value / base)
    }

    pub fn print(&self, facts: &Value) {
        println!();
        println!("netdisk transfer benchmark");
        for key in [
            "cpu",
            "cores",
            "memory",
            "kernel",
            "os",
            "data_dir",
            "data_fs",
            "netdisk",
            "commit",
            "tls",
            "load_at_start",
            "load_at_end",
            "date",
        ] {
            if let Some(v) = facts.get(key) {
                let v = v
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string());
                println!("  {key:<9} {v}");
            }
        }
        println!();
        println!(
            "{:<16} {:<24} {:<38} {:>9} {:>19} {}",
            "workload",
            "variant",
            "metric (unit)",
            "median",
            "min..max",
            COLUMNS.map(|c| format!("{:>11}", format!("x{c}"))).join("")
        );
        println!("{}", "-".repeat(165));
        for row in &self.rows {
            let (Some(med), Some(lo), Some(hi)) =
                (median(&row.samples), min(&row.samples), max(&row.samples))
            else {
                continue;
            };
            let ratios: String = COLUMNS
                .iter()
                .map(|c| match self.ratio(row, c) {
                    Some(r) => format!("{:>11}", format!("{r:.2}")),
                    None => format!("{:>11}", "-"),
                })
                .collect();
            println!(
                "{:<16} {:<24} {:<38} {:>9} {:>19} {}",
                row.workload,
                row.variant,
                format!("{} ({})", row.metric, row.unit),
                num(med),
                format!("{}..{}", num(lo), num(hi)),
                ratios
            );
        }
        println!();
        println!("x<yardstick>: median / yardstick median (speed ratio: above 1 means netdisk is faster).");
        println!("MB = 10^6 bytes; MiB = 2^20 bytes; CPU in seconds of user+system time.");
        for note in &self.notes {
            println!("note: {note}");
        }
        for failure in &self.failures {
            println!("FAILED: {failure}");
        }
    }

    pub fn json(&self, facts: &Value, settings: &Settings, peers: &Value) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|row| {
                let ratios: serde_json::Map<String, Value> = COLUMNS
                    .iter()
                    .filter_map(|c| self.ratio(row, c).map(|r| (c.to_string(), json!(r))))
                    .collect();
                json!({
                    "workload": row.workload,
                    "variant": row.variant,
                    "metric": row.metric,
                    "unit": row.unit,
                    "median": median(&row.samples),
                    "min": min(&row.samples),
                    "max": max(&row.samples),
                    "samples": row.samples,
                    "ratios": ratios,
                })
            })
            .collect();
        let yardsticks: serde_json::Map<String, Value> = self
            .yardsticks
            .iter()
            .map(|(k, v)| (k.clone(), json!({"median": median(v), "samples": v})))
            .collect();
        json!({
            "facts": facts,
            "settings": settings.json(),
            "peers": peers,
            "rows": rows,
            "yardsticks": yardsticks,
            "notes": self.notes,
            "failures": self.failures,
        })
    }
}

pub fn median(samples: &[f64]) -> Option<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

pub fn min(samples: &[f64]) -> Option<f64> {
    samples.iter().copied().min_by(f64::total_cmp)
}

pub fn max(samples: &[f64]) -> Option<f64> {
    samples.iter().copied().max_by(f64::total_cmp)
}

/// The `q` quantile (0..=1) by the nearest-rank method.
pub fn percentile(samples: &[f64], q: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

pub fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}
