//! Statistics over rounds and the written results: `target/bench/results.md`
//! and `results.json`.

use std::fmt::Write as _;

use serde_json::{Value, json};

/// The per-round figures of one scenario of one operation, in round order
/// (round `r` of every scenario of an operation was taken close in time).
pub struct Series {
    pub scenario: String,
    pub samples: Vec<f64>,
}

/// Every scenario of one operation; the first is the baseline.
pub struct Table {
    pub title: String,
    pub unit: &'static str,
    pub series: Vec<Series>,
    /// Per round, a scenario's ratio to the reference measured alongside it
    /// (in alternating batches): `(scenario, reference, ratios)`.
    pub alongside: Vec<(String, String, Vec<f64>)>,
}

impl Table {
    pub fn new(title: &str, unit: &'static str) -> Table {
        Table {
            title: title.to_owned(),
            unit,
            series: Vec::new(),
            alongside: Vec::new(),
        }
    }

    pub fn push_alongside(&mut self, scenario: &str, reference: &str, ratio: f64) {
        if let Some((_, _, ratios)) = self
            .alongside
            .iter_mut()
            .find(|(s, r, _)| s == scenario && r == reference)
        {
            ratios.push(ratio);
        } else {
            self.alongside
                .push((scenario.to_owned(), reference.to_owned(), vec![ratio]));
        }
    }

    pub fn push(&mut self, scenario: &str, sample: f64) {
        if let Some(series) = self.series.iter_mut().find(|s| s.scenario == scenario) {
            series.samples.push(sample);
        } else {
            self.series.push(Series {
                scenario: scenario.to_owned(),
                samples: vec![sample],
            });
        }
    }

    pub fn get(&self, scenario: &str) -> Option<&Series> {
        self.series.iter().find(|s| s.scenario == scenario)
    }

    /// Per-round ratios of `scenario` to `reference` (paired by round).
    pub fn ratios(&self, scenario: &str, reference: &str) -> Option<Vec<f64>> {
        let (a, b) = (self.get(scenario)?, self.get(reference)?);
        Some(
            a.samples
                .iter()
                .zip(&b.samples)
                .map(|(x, y)| x / y)
                .collect(),
        )
    }

    fn baseline(&self) -> &Series {
        &self.series[0]
    }
}

/// Median, quartiles and extremes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    pub median: f64,
    pub q1: f64,
    pub q3: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(samples: &[f64]) -> Stats {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Stats {
            median: quantile(&sorted, 0.5),
            q1: quantile(&sorted, 0.25),
            q3: quantile(&sorted, 0.75),
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
        }
    }

    /// `(max - min) / median`: the spread over rounds, relative.
    pub fn relative_range(&self) -> f64 {
        (self.max - self.min) / self.median
    }

    fn json(&self) -> Value {
        json!({"median": self.median, "q1": self.q1, "q3": self.q3, "min": self.min, "max": self.max})
    }
}

/// Linear interpolation between closest ranks of sorted samples.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            #[expect(clippy::cast_precision_loss, reason = "a handful of samples")]
            let position = q * (n - 1) as f64;
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "0 <= position <= n - 1"
            )]
            let below = position.floor() as usize;
            let above = (below + 1).min(n - 1);
            #[expect(clippy::cast_precision_loss, reason = "a handful of samples")]
            let fraction = position - below as f64;
            sorted[below] + (sorted[above] - sorted[below]) * fraction
        }
    }
}

/// Renders a table in Markdown: per scenario the median and IQR of the
/// absolute figure and the ratio to the baseline (median of the per-round
/// ratios, with their range), then the baseline's own spread as the noise.
pub fn table_markdown(table: &Table, labels: &dyn Fn(&str) -> String) -> String {
    let mut md = String::new();
    let base = table.baseline();
    let _ = writeln!(
        md,
        "| scenario | median {unit} | IQR {unit} | ratio to {base} (median of rounds) | ratio range over rounds | alongside: ratio to (median, range) |\n\
         | --- | ---: | ---: | ---: | ---: | --- |",
        unit = table.unit,
        base = labels(&base.scenario),
    );
    for series in &table.series {
        let stats = Stats::of(&series.samples);
        let ratios = Stats::of(
            &table
                .ratios(&series.scenario, &base.scenario)
                .unwrap_or_default(),
        );
        let alongside = table
            .alongside
            .iter()
            .find(|(s, _, _)| *s == series.scenario)
            .map_or_else(
                || "—".to_owned(),
                |(_, reference, ratios)| {
                    let r = Stats::of(ratios);
                    format!(
                        "{}: {:.3} ({:.3}–{:.3})",
                        labels(reference),
                        r.median,
                        r.min,
                        r.max
                    )
                },
            );
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0}–{:.0} | {:.3} | {:.3}–{:.3} | {alongside} |",
            labels(&series.scenario),
            stats.median,
            stats.q1,
            stats.q3,
            ratios.median,
            ratios.min,
            ratios.max
        );
    }
    let noise = Stats::of(&base.samples);
    let _ = writeln!(
        md,
        "\nNoise: the baseline itself varied by {:.1}% between rounds (max − min over median; \
         IQR {:.1}%), over {} rounds.",
        noise.relative_range() * 100.0,
        (noise.q3 - noise.q1) / noise.median * 100.0,
        base.samples.len()
    );
    md
}

pub fn table_json(table: &Table) -> Value {
    let base = &table.baseline().scenario;
    Value::Array(
        table
            .series
            .iter()
            .map(|series| {
                let ratios = table.ratios(&series.scenario, base).unwrap_or_default();
                let alongside = table
                    .alongside
                    .iter()
                    .find(|(s, _, _)| *s == series.scenario)
                    .map(|(_, reference, ratios)| {
                        json!({"reference": reference, "per_round": ratios, "stats": Stats::of(ratios).json()})
                    });
                json!({
                    "alongside": alongside,
                    "operation": table.title,
                    "scenario": series.scenario,
                    "unit": table.unit,
                    "samples": series.samples,
                    "stats": Stats::of(&series.samples).json(),
                    "ratio_to_baseline": Stats::of(&ratios).json(),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_paired_ratios() {
        let s = Stats::of(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!((s.min, s.max), (1.0, 4.0));
        assert!((s.median - 2.5).abs() < 1e-9);
        assert!((s.q1 - 1.75).abs() < 1e-9);
        let mut t = Table::new("op", "ns");
        for (b, x) in [(10.0, 11.0), (20.0, 20.0)] {
            t.push("base", b);
            t.push("x", x);
        }
        assert_eq!(t.ratios("x", "base").unwrap(), [1.1, 1.0]);
        let md = table_markdown(&t, &|s: &str| s.to_owned());
        assert!(
            md.contains("| x | 16 | 13–18 | 1.050 | 1.000–1.100 | — |"),
            "{md}"
        );
    }
}
