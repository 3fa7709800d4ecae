//! The figures of one run: statistics of samples, each Portless figure beside qemu-ga's with
//! their ratio and target, `summary.json`, and the results section of BENCHMARKS.md.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::Value;

/// Minimum, median, 99th percentile and maximum of some samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Stats {
    /// How many samples.
    pub(crate) samples: usize,
    /// The smallest.
    pub(crate) min: f64,
    /// The median (the mean of the middle two for an even count).
    pub(crate) median: f64,
    /// The 99th percentile (nearest rank).
    pub(crate) p99: f64,
    /// The largest.
    pub(crate) max: f64,
}

impl Stats {
    /// The statistics of `samples`; `None` if there are none (non-finite ones are dropped).
    pub(crate) fn of(samples: &[f64]) -> Option<Self> {
        let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if s.is_empty() {
            return None;
        }
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        // Nearest rank: the smallest sample with at least 99% of the samples at or below it.
        let rank = (n * 99).div_ceil(100).max(1);
        Some(Self {
            samples: n,
            min: round(s[0]),
            median: round(median),
            p99: round(s[rank - 1]),
            max: round(s[n - 1]),
        })
    }
}

/// One figure: Portless's value, qemu-ga's (when there is one to compare with), the ratio
/// of the two (Portless / qemu-ga, so lower is better) and the target ratio.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Figure {
    /// A stable key for tools.
    pub(crate) key: String,
    /// What it measures.
    pub(crate) label: String,
    /// The unit of the values (`us`, `ms`, `KiB`, `s`, `ms CPU`, ...).
    pub(crate) unit: String,
    /// Portless's value: a number, or `Stats` for a latency distribution.
    pub(crate) portless: Value,
    /// qemu-ga's value, in the same form.
    pub(crate) qemu_ga: Option<Value>,
    /// Portless / qemu-ga (of the medians for distributions).
    pub(crate) ratio: Option<f64>,
    /// The ratio Portless must stay at or under.
    pub(crate) target: Option<f64>,
    /// Whether the target was met.
    pub(crate) met: Option<bool>,
    /// Anything a reader needs to read the figure right.
    pub(crate) note: Option<String>,
    /// When the second value is not qemu-ga's but Portless's own in another setting: what
    /// that setting is (the figure then goes in a table of its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) against: Option<String>,
}

impl Figure {
    /// A latency figure from samples in microseconds.
    pub(crate) fn latency(
        key: &str,
        label: &str,
        portless: &[f64],
        qemu_ga: Option<&[f64]>,
        target: Option<f64>,
    ) -> Result<Self> {
        let p = Stats::of(portless).with_context(|| format!("{key}: no Portless samples"))?;
        let q = match qemu_ga {
            Some(q) => Some(Stats::of(q).with_context(|| format!("{key}: no qemu-ga samples"))?),
            None => None,
        };
        Ok(Self::compare(
            key,
            label,
            "us",
            p.median,
            q.map(|q| q.median),
            target,
            serde_json::to_value(p)?,
            q.map(serde_json::to_value).transpose()?,
        ))
    }

    /// A single-valued figure.
    pub(crate) fn amount(
        key: &str,
        label: &str,
        unit: &str,
        portless: f64,
        qemu_ga: Option<f64>,
        target: Option<f64>,
    ) -> Self {
        Self::compare(
            key,
            label,
            unit,
            portless,
            qemu_ga,
            target,
            Value::from(round(portless)),
            qemu_ga.map(|q| Value::from(round(q))),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn compare(
        key: &str,
        label: &str,
        unit: &str,
        p: f64,
        q: Option<f64>,
        target: Option<f64>,
        portless: Value,
        qemu_ga: Option<Value>,
    ) -> Self {
        let ratio = q.filter(|q| *q > 0.0).map(|q| p / q);
        Self {
            key: key.to_owned(),
            label: label.to_owned(),
            unit: unit.to_owned(),
            portless,
            qemu_ga,
            ratio: ratio.map(|r| (r * 10_000.0).round() / 10_000.0),
            target,
            met: ratio.zip(target).map(|(r, t)| r <= t),
            note: None,
            against: None,
        }
    }

    /// Makes the second value Portless's own in another setting, `against`.
    pub(crate) fn against(mut self, against: impl Into<String>) -> Self {
        self.against = Some(against.into());
        self
    }

    /// Adds a note.
    pub(crate) fn with_note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub(crate) struct Summary {
    /// When the run ended (UTC, RFC 3339).
    pub(crate) generated: String,
    /// The command that produced it.
    pub(crate) command: String,
    /// The accelerator every VM ran with.
    pub(crate) accelerator: String,
    /// The machine: CPU model, CPUs, kernel.
    pub(crate) host: Value,
    /// `qemu-system-x86_64 --version`.
    pub(crate) qemu: String,
    /// qemu-ga's version, as it reports it.
    pub(crate) qemu_ga: String,
    /// The guest's `uname -a`.
    pub(crate) guest: String,
    /// The figures.
    pub(crate) figures: Vec<Figure>,
}

impl Summary {
    /// Writes `summary.json` into `dir`.
    pub(crate) fn write_json(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(dir.join("summary.json"), text + "\n")?;
        Ok(())
    }

    /// The results as a Markdown table with a heading line.
    pub(crate) fn markdown(&self, plot: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Measured {} with `{}` on {} ({} accelerator), {}; qemu-ga {}; guest `{}`.\n",
            self.generated,
            self.command,
            self.host["description"].as_str().unwrap_or("this machine"),
            self.accelerator,
            self.qemu,
            self.qemu_ga,
            self.guest
        );
        s.push_str("| Figure | Portless | qemu-ga | Portless / qemu-ga | Target | |\n");
        s.push_str("|---|---:|---:|---:|---:|---|\n");
        for f in self.figures.iter().filter(|f| f.against.is_none()) {
            let verdict = match f.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "",
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                f.label,
                show(&f.portless, &f.unit),
                f.qemu_ga
                    .as_ref()
                    .map_or_else(|| "".to_owned(), |q| show(q, &f.unit)),
                f.ratio.map_or_else(String::new, show_ratio),
                f.target
                    .map_or_else(String::new, |t| format!("≤ {}", show_ratio(t))),
                verdict
            );
        }
        let own: Vec<&Figure> = self
            .figures
            .iter()
            .filter(|f| f.against.is_some())
            .collect();
        if !own.is_empty() {
            s.push_str(
                "\nPortless against itself in another setting, side by side in the same run:\n\n\
                 | Figure | Portless | the other setting | Ratio |\n|---|---:|---:|---:|\n",
            );
            for f in own {
                let _ = writeln!(
                    s,
                    "| {} | {} | {}: {} | {} |",
                    f.label,
                    show(&f.portless, &f.unit),
                    f.against.as_deref().unwrap_or(""),
                    f.qemu_ga
                        .as_ref()
                        .map_or_else(String::new, |q| show(q, &f.unit)),
                    f.ratio.map_or_else(String::new, show_ratio),
                );
            }
        }
        let targets: Vec<&Figure> = self.figures.iter().filter(|f| f.met.is_some()).collect();
        if !targets.is_empty() {
            let met = targets.iter().filter(|f| f.met == Some(true)).count();
            let _ = writeln!(s, "\nTargets: {met} of {} met.", targets.len());
            for f in targets.iter().filter(|f| f.met == Some(false)) {
                let (r, t) = (f.ratio.unwrap_or(0.0), f.target.unwrap_or(0.0));
                let _ = writeln!(
                    s,
                    "- missed: {}: {} against ≤ {} ({:.0}% over)",
                    f.label,
                    show_ratio(r),
                    show_ratio(t),
                    (r / t - 1.0) * 100.0
                );
            }
        }
        let notes: Vec<&Figure> = self.figures.iter().filter(|f| f.note.is_some()).collect();
        if !notes.is_empty() {
            s.push_str("\nNotes:\n\n");
            for f in notes {
                let _ = writeln!(s, "- {}: {}", f.label, f.note.as_deref().unwrap_or(""));
            }
        }
        let _ = writeln!(
            s,
            "\nLatencies are medians, with min and p99 below them; ratios are of medians. \
             The distributions:\n\n![Latency distributions]({plot})"
        );
        s
    }

    /// One line per figure with a target, and the fan-out, for the README.
    pub(crate) fn ratios(&self) -> String {
        let mut s = String::new();
        for f in self
            .figures
            .iter()
            .filter(|f| f.target.is_some() || f.key.starts_with("fan_out"))
        {
            let (Some(q), Some(r)) = (&f.qemu_ga, f.ratio) else {
                continue;
            };
            let verdict = match (f.met, f.target) {
                (Some(true), Some(t)) => format!(" (target ≤ {}: met)", show_ratio(t)),
                (Some(false), Some(t)) => format!(" (target ≤ {}: **missed**)", show_ratio(t)),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "- {}: {} against {}, {}{verdict}",
                f.label,
                short(&f.portless, &f.unit),
                short(q, &f.unit),
                show_ratio(r),
            );
        }
        s
    }
}

/// A value in a sentence: a distribution's median, a number with its unit.
fn short(v: &Value, unit: &str) -> String {
    match v.get("median").and_then(Value::as_f64) {
        Some(median) => micros(median),
        None => v
            .as_f64()
            .map_or_else(|| v.to_string(), |x| format!("{} {unit}", number(x))),
    }
}

/// A value for the table: a distribution as "median (min-p99)", a number with its unit.
fn show(v: &Value, unit: &str) -> String {
    if let Some(median) = v.get("median").and_then(Value::as_f64) {
        let min = v["min"].as_f64().unwrap_or(0.0);
        let p99 = v["p99"].as_f64().unwrap_or(0.0);
        return format!(
            "{}<br><sub>{} – {}</sub>",
            micros(median),
            micros(min),
            micros(p99)
        );
    }
    match v.as_f64() {
        Some(x) => format!("{} {unit}", number(x)),
        None => v.to_string(),
    }
}

/// A time in microseconds, in the unit that reads best.
pub(crate) fn micros(us: f64) -> String {
    if us < 1_000.0 {
        format!("{} us", number(us))
    } else if us < 1_000_000.0 {
        format!("{} ms", number(us / 1_000.0))
    } else {
        format!("{} s", number(us / 1_000_000.0))
    }
}

/// Three significant digits, thousands separated.
fn number(x: f64) -> String {
    let digits = if x.abs() >= 100.0 {
        0
    } else if x.abs() >= 10.0 {
        1
    } else {
        2
    };
    let text = format!("{x:.digits$}");
    let (int, frac) = text.split_once('.').unwrap_or((&text, ""));
    let (sign, int) = int.strip_prefix('-').map_or(("", int), |i| ("-", i));
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    if frac.is_empty() {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{frac}")
    }
}

/// A ratio: "1/37" or "1/2.7" below one half, else a decimal.
fn show_ratio(r: f64) -> String {
    if r > 0.0 && r < 0.1 {
        format!("1/{:.0}", 1.0 / r)
    } else if r > 0.0 && r < 0.5 {
        let d = 1.0 / r;
        if (d - d.round()).abs() < 0.05 {
            format!("1/{d:.0}")
        } else {
            format!("1/{d:.1}")
        }
    } else {
        format!("{r:.2}")
    }
}

/// Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in `path`.
pub(crate) fn replace_section(path: &Path, name: &str, body: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let (Some(b), Some(e)) = (text.find(&begin), text.find(&end)) else {
        bail!("{} has no `{begin}` ... `{end}` section", path.display());
    };
    if e < b {
        bail!("{}: `{end}` comes before `{begin}`", path.display());
    }
    let new = format!(
        "{}{begin}\n{}{}",
        &text[..b],
        body.trim_end().to_owned() + "\n",
        &text[e..]
    );
    std::fs::write(path, new)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_of_samples() {
        let s = Stats::of(&[5.0, 1.0, 3.0, f64::NAN]).expect("samples");
        assert_eq!((s.samples, s.min, s.median, s.max), (3, 1.0, 3.0, 5.0));
        assert_eq!(s.p99, 5.0);
        let s = Stats::of(&[4.0, 1.0, 3.0, 2.0]).expect("samples");
        assert_eq!(s.median, 2.5);
        let hundred: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(Stats::of(&hundred).expect("samples").p99, 198.0);
        assert_eq!(Stats::of(&[]), None);
        assert_eq!(Stats::of(&[f64::INFINITY]), None);
    }

    #[test]
    fn figures_compare_medians_against_the_target() {
        let f = Figure::latency(
            "k",
            "K",
            &[10.0, 20.0, 30.0],
            Some(&[100.0, 200.0]),
            Some(0.25),
        )
        .expect("figure");
        assert_eq!(
            f.ratio,
            Some(20.0 / 150.0_f64).map(|r| (r * 1e4).round() / 1e4)
        );
        assert_eq!(f.met, Some(true));
        let f = Figure::amount("k", "K", "KiB", 600.0, Some(1000.0), Some(0.2));
        assert_eq!((f.ratio, f.met), (Some(0.6), Some(false)));
        let f = Figure::amount("k", "K", "ms", 3.0, None, None);
        assert_eq!((f.ratio, f.met), (None, None));
        assert!(Figure::latency("k", "K", &[], None, None).is_err());
    }

    #[test]
    fn the_readme_lines_quote_figures_with_targets() {
        let summary = Summary {
            generated: "now".into(),
            command: "cargo xtask bench".into(),
            accelerator: "tcg".into(),
            host: serde_json::json!({ "description": "here" }),
            qemu: "QEMU".into(),
            qemu_ga: "7.2".into(),
            guest: "Linux".into(),
            figures: vec![
                Figure::latency("ping", "Ping", &[2.0], Some(&[150.0]), Some(0.02))
                    .expect("figure"),
                Figure::amount("rss", "RSS", "KiB", 2000.0, Some(4000.0), Some(1.0 / 3.0)),
                Figure::amount("cpu", "CPU", "ms", 1.0, Some(2.0), None),
                Figure::latency("own", "True, contained", &[1200.0], Some(&[1000.0]), None)
                    .expect("figure")
                    .against("uncontained"),
            ],
        };
        assert_eq!(
            summary.ratios(),
            "- Ping: 2.00 us against 150 us, 1/75 (target ≤ 1/50: met)\n\
             - RSS: 2,000 KiB against 4,000 KiB, 0.50 (target ≤ 1/3: **missed**)\n"
        );
        let md = summary.markdown("plot.svg");
        assert!(md.contains("Targets: 1 of 2 met."), "{md}");
        assert!(
            md.contains("- missed: RSS: 0.50 against ≤ 1/3 (50% over)"),
            "{md}"
        );
        assert!(md.contains("![Latency distributions](plot.svg)"), "{md}");
        // A figure against Portless itself is in its own table, not under qemu-ga.
        let main_table = md.split("Portless against itself").next().unwrap_or("");
        assert!(!main_table.contains("True, contained"), "{md}");
        assert!(
            md.contains("| True, contained | 1.20 ms<br><sub>1.20 ms – 1.20 ms</sub> | uncontained: 1.00 ms<br><sub>1.00 ms – 1.00 ms</sub> | 1.20 |"),
            "{md}"
        );
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(micros(4.123), "4.12 us");
        assert_eq!(micros(523.4), "523 us");
        assert_eq!(micros(12_345.0), "12.3 ms");
        assert_eq!(micros(2_500_000.0), "2.50 s");
        assert_eq!(number(1_234_567.0), "1,234,567");
        assert_eq!(number(-1234.0), "-1,234");
        assert_eq!(show_ratio(0.02), "1/50");
        assert_eq!(show_ratio(0.75), "0.75");
        assert_eq!(show_ratio(0.375), "1/2.7");
        assert_eq!(show_ratio(0.25), "1/4");
    }

    #[test]
    fn sections_are_replaced_in_place() {
        let dir = std::env::temp_dir().join(format!("vm-bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("doc.md");
        std::fs::write(&path, "head\n<!-- x:begin -->\nold\n<!-- x:end -->\ntail\n").expect("w");
        replace_section(&path, "x", "new\n\n").expect("replace");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "head\n<!-- x:begin -->\nnew\n<!-- x:end -->\ntail\n"
        );
        assert!(replace_section(&path, "y", "z").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
