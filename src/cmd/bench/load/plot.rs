//! The load run's plots, as SVG (plotters' SVG backend writes text as `<text>` elements, so no
//! system font is read): throughput and TPOT p99 against users per class, and, with `--compare`,
//! this run beside an earlier one (solid: this run; dashed: the other). The x axis has one evenly
//! spaced place per users level (levels usually double, so this reads as a log scale).

use std::path::Path;

use anyhow::anyhow;
use plotters::coord::types::RangedCoordf64;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

use super::mix::Class;
use super::results::{Results, Row};

const SIZE: (u32, u32) = (1000, 560);
const COMPARE_SIZE: (u32, u32) = (1400, 520);
/// Series drawn, in legend order: the level's aggregate, then each class.
const SERIES: [&str; 4] = ["all", "realtime", "interactive", "batch"];

type Chart<'a> = ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

fn color(series: &str) -> RGBColor {
    match series {
        "realtime" => RGBColor(214, 39, 40),
        "interactive" => RGBColor(31, 119, 180),
        "batch" => RGBColor(44, 160, 44),
        _ => RGBColor(0, 0, 0),
    }
}

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> anyhow::Error + '_ {
    move |e| anyhow!("drawing {what}: {e}")
}

/// Every users level of `runs`, ascending: level i is drawn at x = i.
fn levels(runs: &[&Results]) -> Vec<usize> {
    let mut u: Vec<usize> = runs.iter().flat_map(|r| r.runs.iter().map(|row| row.users)).collect();
    u.sort_unstable();
    u.dedup();
    u
}

/// (x, value) points of one series, in users order, skipping levels without a value.
fn points(r: &Results, levels: &[usize], series: &str, value: impl Fn(&Row) -> Option<f64>) -> Vec<(f64, f64)> {
    let mut pts: Vec<(f64, f64)> = r
        .runs
        .iter()
        .filter(|row| row.class == series)
        .filter_map(|row| Some((levels.iter().position(|&u| u == row.users)? as f64, value(row)?)))
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    pts
}

fn y_max(runs: &[&Results], value: &impl Fn(&Row) -> Option<f64>) -> f64 {
    let m = runs.iter().flat_map(|r| r.runs.iter().filter_map(value)).fold(0.0f64, f64::max);
    if m > 0.0 {
        // Headroom above the highest point keeps the legend (upper left) off the data.
        m * 1.4
    } else {
        1.0
    }
}

/// A chart with one x place per users level and `y_desc` from 0 to `y_max`.
fn chart<'a>(
    area: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    caption: &str,
    levels: &[usize],
    y_max: f64,
    y_desc: &str,
) -> anyhow::Result<Chart<'a>> {
    let n = levels.len().max(1);
    let mut c = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.5..(n as f64 - 0.5), 0.0..y_max)
        .map_err(err("axes"))?;
    let label = |x: &f64| {
        let i = x.round();
        match levels.get(i as usize) {
            Some(u) if (x - i).abs() < 1e-6 && i >= 0.0 => u.to_string(),
            _ => String::new(),
        }
    };
    c.configure_mesh()
        .light_line_style(TRANSPARENT)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .x_labels(n)
        .x_desc("concurrent users")
        .y_desc(y_desc)
        .x_label_formatter(&label)
        .y_label_formatter(&|v| if v.abs() < 10.0 { format!("{v:.1}") } else { format!("{v:.0}") })
        .draw()
        .map_err(err("the mesh"))?;
    Ok(c)
}

/// Draws one series: solid with markers, or dashed (`dashed` = the compared run).
fn series(c: &mut Chart<'_>, pts: Vec<(f64, f64)>, col: RGBColor, label: String, dashed: bool) -> anyhow::Result<()> {
    if pts.is_empty() {
        return Ok(());
    }
    let style = col.stroke_width(2);
    if dashed {
        c.draw_series(DashedLineSeries::new(pts.clone(), 8, 5, style))
            .map_err(err("a series"))?
            .label(label)
            .legend(move |(x, y)| DashedPathElement::new(vec![(x, y), (x + 20, y)], 5, 3, style));
    } else {
        c.draw_series(LineSeries::new(pts.clone(), style))
            .map_err(err("a series"))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    c.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, col.filled()))).map_err(err("markers"))?;
    Ok(())
}

fn legend(c: &mut Chart<'_>) -> anyhow::Result<()> {
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err("the legend"))
}

/// One metric against users, a series per class (and "all" where `with_all`).
fn per_class(
    path: &Path,
    r: &Results,
    caption: &str,
    y_desc: &str,
    with_all: bool,
    value: impl Fn(&Row) -> Option<f64>,
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err("the background"))?;
    let lv = levels(&[r]);
    let mut c = chart(&root, caption, &lv, y_max(&[r], &value), y_desc)?;
    for s in SERIES.into_iter().filter(|s| with_all || *s != "all") {
        series(&mut c, points(r, &lv, s, &value), color(s), label(s), false)?;
    }
    legend(&mut c)?;
    root.present().map_err(err(&path.display().to_string()))
}

/// A series' legend label: the class and its TPOT deadline, if it has one.
fn label(series: &str) -> String {
    match Class::ALL.into_iter().find(|c| c.name() == series).and_then(Class::tpot_deadline_ms) {
        Some(d) => format!("{series} (deadline {d} ms)"),
        None => series.to_owned(),
    }
}

/// throughput_vs_users.svg and tpot_p99_vs_users.svg in `dir`.
pub fn draw(dir: &Path, r: &Results) -> anyhow::Result<()> {
    let title = format!("{}, {} scheduler, {} loop", r.model, r.scheduler, r.mode);
    per_class(&dir.join("throughput_vs_users.svg"), r, &format!("tokens/s — {title}"), "tokens/s", true, |row| {
        Some(row.tokens_per_s)
    })?;
    per_class(
        &dir.join("tpot_p99_vs_users.svg"),
        r,
        &format!("time per output token, p99 — {title}"),
        "TPOT p99 (ms)",
        false,
        |row| row.tpot_ms.p99,
    )
}

/// qos_vs_fcfs.svg in `dir`: tokens/s (all) and TPOT p99 per class, this run solid and the
/// compared one dashed.
pub fn draw_compare(dir: &Path, this: &Results, other: &Results) -> anyhow::Result<()> {
    let path = dir.join("qos_vs_fcfs.svg");
    let root = SVGBackend::new(&path, COMPARE_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err("the background"))?;
    let halves = root.split_evenly((1, 2));
    let runs = [this, other];
    let lv = levels(&runs);
    let this_name = if this.scheduler == "unknown" { "this run".to_owned() } else { this.scheduler.clone() };
    let mut other_name = if other.scheduler == "unknown" { "compared run".to_owned() } else { other.scheduler.clone() };
    if other_name == this_name {
        other_name.push_str(", compared");
    }
    let named = [(this, this_name.as_str(), false), (other, other_name.as_str(), true)];
    let tps = |row: &Row| Some(row.tokens_per_s);
    let mut left = chart(&halves[0], "aggregate tokens/s", &lv, y_max(&runs, &tps), "tokens/s")?;
    for (r, name, dashed) in named {
        series(&mut left, points(r, &lv, "all", tps), color("all"), format!("all ({name})"), dashed)?;
    }
    legend(&mut left)?;
    let tpot = |row: &Row| row.tpot_ms.p99;
    let mut right = chart(&halves[1], "TPOT p99 per class", &lv, y_max(&runs, &tpot), "ms")?;
    for s in SERIES.into_iter().filter(|s| *s != "all") {
        for (r, name, dashed) in named {
            series(&mut right, points(r, &lv, s, tpot), color(s), format!("{s} ({name})"), dashed)?;
        }
    }
    legend(&mut right)?;
    root.present().map_err(err(&path.display().to_string()))
}
