//! results.json and results.csv of a load run: one row per users level and class (`"all"`
//! aggregating the level), built from the level's requests.
//!
//! Row fields: `requests` = requests that made all their tokens within the window; `tokens` =
//! tokens received within it (cancelled requests' included); `tokens_per_s` = tokens / window;
//! `errors` = failed requests; `ttft_ms` over the requests that got a first token; `tpot_ms` over
//! every gap between consecutive tokens; `sla_violations` = completed requests whose own TPOT
//! p99 exceeds their class's deadline (batch has none). A percentile with no samples is null
//! (empty in the CSV).

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::driver::Sample;
use super::mix::Class;

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Pcts {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Row {
    pub users: usize,
    pub class: String,
    pub requests: u64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub errors: u64,
    pub ttft_ms: Pcts,
    pub tpot_ms: Pcts,
    pub sla_violations: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub server: String,
    pub model: String,
    pub scheduler: String,
    pub mode: String,
    pub duration_s: f64,
    pub prompt_tokens: usize,
    pub max_new_tokens: u32,
    pub mix: serde_json::Value,
    pub runs: Vec<Row>,
}

/// The `q` quantile (nearest rank) of `xs`, sorted in place.
pub fn quantile(xs: &mut [f64], q: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len());
    Some(xs[rank - 1])
}

fn pcts(mut xs: Vec<f64>) -> Pcts {
    Pcts { p50: quantile(&mut xs, 0.50), p99: quantile(&mut xs, 0.99) }
}

/// A row over `samples` (already filtered to one class, or all of the level).
fn row(users: usize, class: &str, samples: &[&Sample], window_s: f64) -> Row {
    let tokens: u64 = samples.iter().map(|s| s.tokens).sum();
    let violations = samples
        .iter()
        .filter(|s| s.completed)
        .filter(|s| match s.class.tpot_deadline_ms() {
            Some(deadline) => quantile(&mut s.gaps_ms.clone(), 0.99).is_some_and(|p99| p99 > deadline),
            None => false,
        })
        .count() as u64;
    Row {
        users,
        class: class.to_owned(),
        requests: samples.iter().filter(|s| s.completed).count() as u64,
        tokens,
        tokens_per_s: if window_s > 0.0 { tokens as f64 / window_s } else { 0.0 },
        errors: samples.iter().filter(|s| s.error.is_some()).count() as u64,
        ttft_ms: pcts(samples.iter().filter_map(|s| s.ttft_ms).collect()),
        tpot_ms: pcts(samples.iter().flat_map(|s| s.gaps_ms.iter().copied()).collect()),
        sla_violations: violations,
    }
}

/// The level's rows: "all", then each class that ran (had users, or arrivals), in priority order.
pub fn level_rows(users: usize, classes: &[Class], samples: &[Sample], window_s: f64) -> Vec<Row> {
    let all: Vec<&Sample> = samples.iter().collect();
    let mut rows = vec![row(users, "all", &all, window_s)];
    for &c in Class::ALL.iter().filter(|c| classes.contains(c) || samples.iter().any(|s| s.class == **c)) {
        let of: Vec<&Sample> = samples.iter().filter(|s| s.class == c).collect();
        rows.push(row(users, c.name(), &of, window_s));
    }
    rows
}

impl Results {
    /// Writes DIR/results.json and DIR/results.csv.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let json = dir.join("results.json");
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(&json, text + "\n").with_context(|| format!("writing {}", json.display()))?;
        let csv = dir.join("results.csv");
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&csv).with_context(|| format!("creating {}", csv.display()))?,
        );
        writeln!(f, "{}", CSV_HEADER)?;
        for r in &self.runs {
            let o = |x: Option<f64>| x.map(|v| format!("{v:.3}")).unwrap_or_default();
            writeln!(
                f,
                "{},{},{},{},{:.3},{},{},{},{},{},{}",
                r.users,
                r.class,
                r.requests,
                r.tokens,
                r.tokens_per_s,
                r.errors,
                o(r.ttft_ms.p50),
                o(r.ttft_ms.p99),
                o(r.tpot_ms.p50),
                o(r.tpot_ms.p99),
                r.sla_violations
            )?;
        }
        f.flush().with_context(|| format!("writing {}", csv.display()))?;
        Ok(())
    }

    /// An earlier run's DIR/results.json (for `--compare`).
    pub fn read(dir: &Path) -> anyhow::Result<Results> {
        let path = dir.join("results.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("--compare {}: reading {}", dir.display(), path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("--compare: {} is not a bench load results.json", path.display()))
    }
}

pub const CSV_HEADER: &str =
    "users,class,requests,tokens,tokens_per_s,errors,ttft_ms_p50,ttft_ms_p99,tpot_ms_p50,tpot_ms_p99,sla_violations";

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(class: Class, gaps: &[f64]) -> Sample {
        Sample {
            class,
            ttft_ms: Some(10.0),
            gaps_ms: gaps.to_vec(),
            tokens: gaps.len() as u64 + 1,
            completed: true,
            error: None,
        }
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&mut xs, 0.5), Some(50.0));
        assert_eq!(quantile(&mut xs, 0.99), Some(99.0));
        assert_eq!(quantile(&mut [], 0.5), None);
    }

    #[test]
    fn violations_count_requests_over_their_class_deadline() {
        let s = vec![
            sample(Class::Realtime, &[10.0, 30.0]), // p99 30 > 25: violation
            sample(Class::Realtime, &[10.0, 20.0]),
            sample(Class::Interactive, &[30.0, 40.0]),
            sample(Class::Batch, &[900.0]), // no deadline
        ];
        let rows = level_rows(4, &[Class::Realtime, Class::Interactive, Class::Batch], &s, 2.0);
        let by = |c: &str| rows.iter().find(|r| r.class == c).unwrap();
        assert_eq!(by("all").sla_violations, 1);
        assert_eq!(by("realtime").sla_violations, 1);
        assert_eq!(by("all").tokens, 3 + 3 + 3 + 2);
        assert_eq!(by("all").tokens_per_s, 5.5);
        assert_eq!(by("batch").tpot_ms.p99, Some(900.0));
        assert_eq!(rows.len(), 4);
    }
}
