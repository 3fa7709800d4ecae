//! Plots of latency distributions for BENCHMARKS.md: each series' empirical cumulative
//! distribution over a logarithmic time axis, written as SVG so the document can show whole
//! distributions rather than a mean and a spread.
//!
//! The output depends only on the input (no clock, no randomness, no system fonts: plotters
//! without a font feature estimates text widths), so regenerating a plot from the same samples
//! gives the same file.

use std::ops::Range;
use std::path::Path;

use anyhow::Context as _;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One latency distribution.
#[derive(Clone, Debug)]
pub struct Series {
    /// The legend's label.
    pub label: String,
    /// Samples in microseconds, any order.
    pub samples_us: Vec<f64>,
}

/// Writes an SVG of the distributions' cumulative fractions over a logarithmic time axis.
///
/// For each series the curve at latency `x` is the fraction of its samples at or below `x`.
/// The x axis runs from the whole decade below the smallest sample to the whole decade above
/// the largest (a sample exactly on a decade gets one more, so no curve sits on the frame);
/// the legend, under the chart, gives each label with the series' median. Colours follow the
/// series' positions in `series`, cycling after ten; the picture grows to give the legend up
/// to eight rows (in one or two columns, as the labels allow), and a legend longer than that
/// ends with "and N more series".
///
/// Samples that are not finite or not positive cannot sit on a logarithmic axis and are
/// ignored; a series with no sample left is left out. If no series has a sample, the file
/// still gets written, with the title and "no data", so a document linking to it shows why.
///
/// # Errors
///
/// If drawing fails or the file cannot be written.
pub fn latency_cdf(path: &Path, title: &str, series: &[Series]) -> anyhow::Result<()> {
    let svg = render(title, series)?;
    std::fs::write(path, svg).with_context(|| format!("writing plot {}", path.display()))
}

/// Size of the whole picture in pixels with up to [`LEGEND_ROWS_IN_SIZE`] legend rows; it
/// grows by a row's height for each row more.
const SIZE: (u32, u32) = (900, 540);
/// Legend rows [`SIZE`] has room for.
const LEGEND_ROWS_IN_SIZE: usize = 4;
/// Height of the strip holding the title.
const TITLE_HEIGHT: u32 = 40;
/// Height of one legend row.
const LEGEND_ROW: u32 = 22;
/// Space above and below the legend's rows.
const LEGEND_PAD: u32 = 8;
/// Most legend rows; series beyond are drawn but summed up as "and N more".
const LEGEND_MAX_ROWS: usize = 8;
/// Left and right margin of the legend.
const LEGEND_MARGIN: i32 = 20;
/// Length of a legend's colour swatch.
const SWATCH: i32 = 24;
/// Most labelled decades on the x axis; a wider range labels every k-th decade.
const MAX_X_LABELS: i32 = 10;
/// Decade exponents (of microseconds) are kept in this range, so that ten to the power of
/// each is a finite, normal `f64`; samples outside are drawn at the edge.
const EXPONENTS: Range<i32> = -300..300;
/// Columns of the x axis within which a curve's steps merge into one segment: about two per
/// pixel, so the curve looks the same and the file stays small whatever the sample count.
const CURVE_COLUMNS: f64 = 1600.0;

/// tab10, the matplotlib palette: ten colours told apart on white.
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];

/// A series ready to draw: its plottable samples, sorted, and its legend entry.
struct Prepared {
    /// Finite, positive samples in ascending order; never empty.
    sorted_us: Vec<f64>,
    /// The label with the median.
    legend: String,
    /// The curve's colour.
    colour: RGBColor,
}

/// Draws the plot into an SVG document.
fn render(title: &str, series: &[Series]) -> anyhow::Result<String> {
    let prepared: Vec<Prepared> = series
        .iter()
        .enumerate()
        .filter_map(|(i, s)| prepare(s, PALETTE[i % PALETTE.len()]))
        .collect();

    let mut svg = String::new();
    {
        // Room for a one-column legend of every series shown, so the chart keeps its height.
        let extra_rows = prepared
            .len()
            .min(LEGEND_MAX_ROWS)
            .saturating_sub(LEGEND_ROWS_IN_SIZE);
        let height = SIZE.1 + u32::try_from(extra_rows).unwrap_or(0) * LEGEND_ROW;
        let root = SVGBackend::with_string(&mut svg, (SIZE.0, height)).into_drawing_area();
        root.fill(&WHITE).context("drawing the background")?;
        let (title_area, body) = root.split_vertically(TITLE_HEIGHT);
        let (width, height) = title_area.dim_in_pixel();
        title_area
            .draw_text(
                title,
                &centred(("sans-serif", 22).into_font()),
                (width as i32 / 2, height as i32 / 2),
            )
            .context("drawing the title")?;

        if prepared.is_empty() {
            let (width, height) = body.dim_in_pixel();
            body.draw_text(
                "no data",
                &centred(("sans-serif", 20).into_font().color(&BLACK.mix(0.6))),
                (width as i32 / 2, height as i32 / 2),
            )
            .context("drawing the empty plot")?;
        } else {
            draw_chart(&body, &prepared)?;
        }
        root.present().context("finishing the SVG")?;
    }
    Ok(svg)
}

/// Keeps the plottable samples of `series`, sorted, or `None` if there are none.
fn prepare(series: &Series, colour: RGBColor) -> Option<Prepared> {
    let mut sorted_us: Vec<f64> = series
        .samples_us
        .iter()
        .copied()
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    sorted_us.sort_by(f64::total_cmp);
    let median = median(&sorted_us)?;
    Some(Prepared {
        legend: format!("{} (median {})", series.label, format_duration(median)),
        sorted_us,
        colour,
    })
}

/// The median of ascending samples, halving before adding so that huge samples cannot
/// overflow.
fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some(sorted[n / 2 - 1] / 2.0 + sorted[n / 2] / 2.0),
    }
}

/// Draws the legend at the bottom of `area` and the chart above it.
fn draw_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    prepared: &[Prepared],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let legend_font = TextStyle::from(("sans-serif", 16).into_font());
    let (width, _) = area.dim_in_pixel();
    let column_width = (width as i32 - 2 * LEGEND_MARGIN) / 2;
    let mut widest = 0;
    for p in prepared {
        let (w, _) = area
            .estimate_text_size(&p.legend, &legend_font)
            .context("measuring the legend")?;
        widest = widest.max(w as i32);
    }
    let columns = if SWATCH + 8 + widest < column_width - 10 {
        2
    } else {
        1
    };
    let slots = columns * LEGEND_MAX_ROWS;
    // A legend too long for its slots gives its last slot to a count of the rest.
    let shown = if prepared.len() > slots {
        slots - 1
    } else {
        prepared.len()
    };
    let entries = shown + usize::from(shown < prepared.len());
    let rows = entries.div_ceil(columns);
    let legend_height = rows as u32 * LEGEND_ROW + 2 * LEGEND_PAD;
    let (_, height) = area.dim_in_pixel();
    let (chart_area, legend_area) = area.split_vertically(height.saturating_sub(legend_height));

    for slot in 0..entries {
        // Column by column, so the legend reads down like a list.
        let x = LEGEND_MARGIN + (slot / rows) as i32 * column_width;
        let y = (LEGEND_PAD + (slot % rows) as u32 * LEGEND_ROW + LEGEND_ROW / 2) as i32;
        let text_style = legend_font.clone().pos(Pos::new(HPos::Left, VPos::Center));
        let Some(p) = prepared.get(slot).filter(|_| slot < shown) else {
            let rest = format!("and {} more series", prepared.len() - shown);
            legend_area
                .draw_text(&rest, &text_style, (x, y))
                .context("drawing the legend")?;
            continue;
        };
        // A filled rectangle, not a line, so each series has exactly one polyline.
        legend_area
            .draw(&Rectangle::new(
                [(x, y - 2), (x + SWATCH, y + 2)],
                p.colour.filled(),
            ))
            .context("drawing the legend")?;
        legend_area
            .draw_text(&p.legend, &text_style, (x + SWATCH + 8, y))
            .context("drawing the legend")?;
    }

    let (lo_exp, hi_exp) = decade_range(prepared);
    let (bold, light) = x_key_points(lo_exp, hi_exp);
    let x_spec = Axis::new(f64::from(lo_exp)..f64::from(hi_exp), bold, light);
    let y_spec = Axis::new(
        -0.02..1.02,
        (0..=10).map(|i| f64::from(i) / 10.0).collect(),
        (0..10).map(|i| f64::from(2 * i + 1) / 20.0).collect(),
    );

    let mut chart = ChartBuilder::on(&chart_area)
        .margin_top(6)
        .margin_left(10)
        .margin_right(30)
        .x_label_area_size(48)
        .y_label_area_size(70)
        .build_cartesian_2d(x_spec, y_spec)
        .context("laying out the chart")?;
    chart
        .configure_mesh()
        .x_desc("Latency (logarithmic)")
        .y_desc("Samples at or below")
        .x_label_formatter(&|x| format_duration(10_f64.powf(*x)))
        .y_label_formatter(&|f| format!("{:.0}%", f * 100.0))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .bold_line_style(BLACK.mix(0.18))
        .light_line_style(BLACK.mix(0.06))
        .draw()
        .context("drawing the axes")?;

    let x_range = chart.x_range();
    for p in prepared {
        chart
            .draw_series(LineSeries::new(
                curve(&p.sorted_us, x_range.clone()),
                p.colour.stroke_width(2),
            ))
            .context("drawing a curve")?;
    }
    Ok(())
}

/// A linear axis with grid lines where we say, not where plotters' own choice of round
/// numbers would put them. (plotters' `WithKeyPoints` does the same but loses the tick label
/// formatting an `f64` axis needs.)
struct Axis {
    /// Maps values to pixels.
    linear: RangedCoordf64,
    /// Values with labelled, stronger grid lines.
    bold: Vec<f64>,
    /// Values with faint, unlabelled grid lines.
    light: Vec<f64>,
}

impl Axis {
    fn new(range: Range<f64>, bold: Vec<f64>, light: Vec<f64>) -> Self {
        Axis {
            linear: range.into(),
            bold,
            light,
        }
    }
}

impl Ranged for Axis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.linear.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.light.clone()
        } else {
            self.bold.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.linear.range()
    }
}

/// Text style anchored at its centre.
fn centred<'a>(font: impl Into<TextStyle<'a>>) -> TextStyle<'a> {
    font.into().pos(Pos::new(HPos::Center, VPos::Center))
}

/// Exponents of the whole decades (of microseconds) around every sample, with a sample on a
/// whole decade given one more, so that no curve hides in the frame.
fn decade_range(prepared: &[Prepared]) -> (i32, i32) {
    let min = prepared
        .iter()
        .map(|p| p.sorted_us[0])
        .fold(f64::INFINITY, f64::min);
    let max = prepared
        .iter()
        .map(|p| p.sorted_us[p.sorted_us.len() - 1])
        .fold(0.0, f64::max);
    // Saturating float-to-int casts; the samples are finite and positive, so are the logs.
    let lo = (min.log10().ceil() as i32 - 1).clamp(EXPONENTS.start, EXPONENTS.end - 1);
    let hi = (max.log10().floor() as i32 + 1).clamp(lo + 1, EXPONENTS.end);
    (lo, hi)
}

/// Where the x axis has labelled grid lines and faint ones, as log10 of microseconds: every
/// decade labelled, and 2 to 9 times each faint; over one or two decades 2 and 5 times
/// labelled too; over more than [`MAX_X_LABELS`] decades only every k-th decade labelled and
/// the others faint (none past a few dozen, which would only grey the chart).
fn x_key_points(lo: i32, hi: i32) -> (Vec<f64>, Vec<f64>) {
    let decades = hi - lo;
    let step = (decades + MAX_X_LABELS - 1) / MAX_X_LABELS;
    let mut bold = Vec::new();
    let mut light = Vec::new();
    for e in lo..=hi {
        let e_f = f64::from(e);
        if (e - lo) % step == 0 {
            bold.push(e_f);
        } else if decades <= 5 * MAX_X_LABELS {
            light.push(e_f);
        }
        if step == 1 && e < hi {
            for k in 2..10 {
                let x = e_f + f64::from(k).log10();
                if decades <= 2 && (k == 2 || k == 5) {
                    bold.push(x);
                } else {
                    light.push(x);
                }
            }
        }
    }
    (bold, light)
}

/// The points of a series' cumulative distribution as (log10 of the latency, fraction at or
/// below it), a staircase with the steps inside each of [`CURVE_COLUMNS`] merged, clamped to
/// `x_range`.
fn curve(sorted_us: &[f64], x_range: Range<f64>) -> Vec<(f64, f64)> {
    let n = sorted_us.len() as f64;
    let column_width = (x_range.end - x_range.start) / CURVE_COLUMNS;
    let column = |x: f64| ((x - x_range.start) / column_width).floor() as i64;
    let mut points = Vec::new();
    let mut i = 0;
    while i < sorted_us.len() {
        let x_first = sorted_us[i].log10().clamp(x_range.start, x_range.end);
        let mut j = i;
        let mut x_last = x_first;
        while let Some(v) = sorted_us.get(j + 1) {
            let x = v.log10().clamp(x_range.start, x_range.end);
            if column(x) != column(x_first) {
                break;
            }
            x_last = x;
            j += 1;
        }
        points.push((x_first, i as f64 / n));
        points.push((x_last, (j + 1) as f64 / n));
        i = j + 1;
    }
    points
}

/// A latency in microseconds, for the legend and the ticks, to three significant figures in
/// a fitting unit: "4.1 us", "10 ms".
fn format_duration(us: f64) -> String {
    // Round first, so 999.96 us becomes 1 ms rather than 1000 us.
    let magnitude = us.log10().floor();
    let scale = 10_f64.powf(magnitude - 2.0);
    let rounded = match (us / scale).round() * scale {
        r if r.is_finite() && r > 0.0 => r,
        _ => us,
    };
    let (value, unit) = if rounded < 1.0 {
        (rounded * 1e3, "ns")
    } else if rounded < 1e3 {
        (rounded, "us")
    } else if rounded < 1e6 {
        (rounded / 1e3, "ms")
    } else {
        (rounded / 1e6, "s")
    };
    if !(1e-3..1e5).contains(&value) {
        let text = format!("{value:.2e}");
        let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
        return format!("{}e{exponent} {unit}", trim_zeros(mantissa));
    }
    let decimals = (2.0 - value.log10().floor()).clamp(0.0, 5.0) as usize;
    format!("{} {unit}", trim_zeros(&format!("{value:.decimals$}")))
}

/// A decimal number without trailing zeros after its point, nor a trailing point.
fn trim_zeros(number: &str) -> &str {
    if number.contains('.') {
        number.trim_end_matches('0').trim_end_matches('.')
    } else {
        number
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random numbers in [0, 1) (xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1_u64 << 53) as f64
        }

        /// Roughly log-normal samples around `median_us`, with a tail.
        fn latencies(&mut self, n: usize, median_us: f64, spread: f64) -> Vec<f64> {
            (0..n)
                .map(|_| {
                    let normalish = (0..4).map(|_| self.next()).sum::<f64>() - 2.0;
                    let tail = if self.next() < 0.02 { 30.0 } else { 1.0 };
                    median_us * (normalish * spread).exp() * tail
                })
                .collect()
        }
    }

    fn sample_series() -> Vec<Series> {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        vec![
            Series {
                label: "Portless ping, polling".into(),
                samples_us: rng.latencies(5000, 4.1, 0.4),
            },
            Series {
                label: "Portless ping, notified".into(),
                samples_us: rng.latencies(2000, 60.0, 0.8),
            },
            Series {
                label: "vsock ping".into(),
                samples_us: rng.latencies(50, 1500.0, 1.2),
            },
        ]
    }

    fn polylines_in(svg: &str, colour: RGBColor) -> usize {
        let stroke = format!(
            "stroke=\"#{:02X}{:02X}{:02X}\"",
            colour.0, colour.1, colour.2
        );
        svg.lines()
            .filter(|l| l.contains("<polyline") && l.contains(&stroke))
            .count()
    }

    #[test]
    fn writes_an_svg_with_a_curve_and_legend_entry_per_series() {
        let series = sample_series();
        let path = std::env::temp_dir().join(format!("benches-plot-{}.svg", std::process::id()));
        latency_cdf(&path, "Round trip, 64 B", &series).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();

        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(100)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("Round trip, 64 B"));
        for (i, s) in series.iter().enumerate() {
            assert!(svg.contains(&s.label), "missing {}", s.label);
            assert_eq!(polylines_in(&svg, PALETTE[i]), 1, "curves of {}", s.label);
        }
        assert!(svg.contains("(median 4."), "median of the first series");
        for tick in ["1 us", "10 us", "100 us", "1 ms", "10 ms", "100%", "50%"] {
            assert!(
                svg.contains(&format!("\n{tick}\n</text>")),
                "missing tick {tick}"
            );
        }
        // Curves are merged per column, so thousands of samples make hundreds of points.
        assert!(svg.len() < 200_000, "{} bytes", svg.len());
    }

    #[test]
    fn output_is_deterministic() {
        let series = sample_series();
        assert_eq!(render("t", &series).unwrap(), render("t", &series).unwrap());
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        let one = |label: &str, samples_us: Vec<f64>| Series {
            label: label.into(),
            samples_us,
        };
        let cases: Vec<Vec<Series>> = vec![
            vec![],
            vec![one("empty", vec![]), one("also empty", vec![])],
            vec![one(
                "unplottable",
                vec![f64::NAN, f64::INFINITY, -1.0, 0.0, -0.0],
            )],
            vec![one("single", vec![7.0])],
            vec![one("same", vec![100.0; 1000])],
            vec![one("power of ten", vec![1000.0])],
            vec![one(
                "extremes",
                vec![f64::MIN_POSITIVE / 1e10, 1e-300, f64::MAX],
            )],
            vec![one("<&\"'> label", vec![1.0, 2.0]), one("", vec![3.0])],
            (0..40)
                .map(|i| one(&format!("series {i}"), vec![f64::from(i + 1)]))
                .collect(),
            vec![one(&"very long label ".repeat(20), vec![1.0, 1e6])],
        ];
        for series in &cases {
            for title in ["", "A title"] {
                let svg = render(title, series).unwrap();
                assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
            }
        }
        let svg = render("nothing", &cases[2]).unwrap();
        assert!(svg.contains("\nno data\n</text>"));
        assert!(!svg.contains("<polyline"));
        let svg = render("one", &cases[3]).unwrap();
        assert_eq!(polylines_in(&svg, PALETTE[0]), 1);
        assert!(svg.contains("single (median 7 us)"));
        let svg = render("escaped", &cases[7]).unwrap();
        assert!(svg.contains("&lt;&amp;"));
        let svg = render("many", &cases[8]).unwrap();
        assert!(svg.contains("and 25 more series"));
        // Seven long labels (one column) all get a row; the picture grows for them.
        let seven: Vec<Series> = (0..7)
            .map(|i| {
                one(
                    &format!("a long label, as the benches write them, number {i}"),
                    vec![f64::from(i + 1)],
                )
            })
            .collect();
        let svg = render("seven", &seven).unwrap();
        assert!(!svg.contains("more series"));
        for s in &seven {
            assert!(svg.contains(&s.label), "missing {}", s.label);
        }
        assert!(
            svg.contains(&format!("height=\"{}\"", SIZE.1 + 3 * LEGEND_ROW)),
            "grown"
        );
    }

    #[test]
    fn unwritable_path_is_an_error() {
        let path = std::env::temp_dir()
            .join(format!("benches-plot-missing-{}", std::process::id()))
            .join("plot.svg");
        let err = latency_cdf(&path, "t", &sample_series()).unwrap_err();
        assert!(format!("{err:#}").contains("plot.svg"), "{err:#}");
    }

    #[test]
    fn labels_read_as_durations() {
        assert_eq!(format_duration(1.0), "1 us");
        assert_eq!(format_duration(100.0), "100 us");
        assert_eq!(format_duration(10_f64.powf(3.0)), "1 ms");
        assert_eq!(format_duration(10_f64.powf(7.0)), "10 s");
        assert_eq!(format_duration(0.1), "100 ns");
        assert_eq!(format_duration(1e10), "10000 s");
        assert_eq!(format_duration(1e-5), "0.01 ns");
        assert_eq!(format_duration(1e12), "1e6 s");
        assert_eq!(format_duration(2.5e12), "2.5e6 s");
        assert_eq!(format_duration(1e-300), "1e-297 ns");
        assert_eq!(format_duration(4.1), "4.1 us");
        assert_eq!(format_duration(4.14159), "4.14 us");
        assert_eq!(format_duration(999.96), "1 ms");
        assert_eq!(format_duration(12_345.0), "12.3 ms");
        assert_eq!(format_duration(0.25), "250 ns");
        assert_eq!(format_duration(2.5e6), "2.5 s");
    }

    #[test]
    fn curve_is_a_staircase_from_zero_to_one() {
        let points = curve(&[1.0, 10.0, 10.0, 100.0], 0.0..3.0);
        assert_eq!(
            points,
            vec![
                (0.0, 0.0),
                (0.0, 0.25),
                (1.0, 0.25),
                (1.0, 0.75),
                (2.0, 0.75),
                (2.0, 1.0)
            ]
        );
    }
}
