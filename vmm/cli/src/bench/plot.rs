//! `bench --plot FILE.svg`: the block paths' throughput (MB/s) and latency (p50, p99) over the
//! queue depths they ran at, one colour per path, the min-max of the runs as error bars; drawn
//! with `plotters`' SVG backend (no fonts needed: the text stays SVG text).

use std::path::Path;

use plotters::coord::ranged1d::{SegmentValue, SegmentedCoord, ValueFormatter};
use plotters::coord::types::RangedCoordusize;
use plotters::prelude::*;
use serde_json::Value;

use super::check::is_block;

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("no block result has a queue depth to plot")]
    Empty,
    #[error("cannot draw")]
    Draw(#[source] DrawingAreaErrorKind<std::io::Error>),
}

impl From<DrawingAreaErrorKind<std::io::Error>> for PlotError {
    fn from(e: DrawingAreaErrorKind<std::io::Error>) -> Self {
        PlotError::Draw(e)
    }
}

const SIZE: (u32, u32) = (1200, 500);
/// Distinguishable line colours, one per path (cycled).
const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// One path's figure at each queue depth it ran at: (index of the depth, median, min, max).
struct Series {
    path: String,
    name: String,
    /// A secondary figure (p99 beside p50): a dashed line in the path's colour.
    thin: bool,
    points: Vec<(usize, f64, f64, f64)>,
}

/// The distinct queue depths of the block results, in increasing order.
fn depths(results: &[Value]) -> Vec<u64> {
    let mut qds: Vec<u64> = results
        .iter()
        .filter(|r| r["path"].as_str().is_some_and(is_block))
        .filter_map(|r| r["qd"].as_u64())
        .collect();
    qds.sort_unstable();
    qds.dedup();
    qds
}

/// `key` of every block path over `qds` (a run without the figure leaves a gap).
fn series(results: &[Value], qds: &[u64], key: &str, suffix: &str) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for r in results {
        let (Some(path), Some(qd)) = (r["path"].as_str(), r["qd"].as_u64()) else {
            continue;
        };
        let (Some(median), Some(at)) = (r[key].as_f64(), qds.iter().position(|&q| q == qd)) else {
            continue;
        };
        if !is_block(path) {
            continue;
        }
        let min = r["min"][key].as_f64().unwrap_or(median);
        let max = r["max"][key].as_f64().unwrap_or(median);
        let name = format!("{path}{suffix}");
        match out.iter_mut().find(|s| s.name == name) {
            Some(s) => s.points.push((at, median, min, max)),
            None => out.push(Series {
                path: path.to_string(),
                name,
                thin: suffix == " p99",
                points: vec![(at, median, min, max)],
            }),
        }
    }
    for s in &mut out {
        s.points.sort_by_key(|p| p.0);
    }
    out
}

/// Draws the chart of `summary["results"]` into `path`.
pub fn draw(path: &Path, summary: &Value) -> Result<(), PlotError> {
    let results = summary["results"].as_array().cloned().unwrap_or_default();
    let qds = depths(&results);
    if qds.is_empty() {
        return Err(PlotError::Empty);
    }
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "splitvisor bench: {} bs={}, {} s x {} run(s) (median, min-max)",
        super::table::cell(&summary["rw"]),
        super::table::cell(&summary["bs"]),
        super::table::cell(&summary["seconds"]),
        super::table::cell(&summary["repeat"]),
    );
    let root = root.titled(&title, ("sans-serif", 24))?;
    let (left, right) = root.split_horizontally(SIZE.0 / 2);
    let throughput = series(&results, &qds, "mb_per_s", "");
    let paths: Vec<String> = throughput.iter().map(|s| s.path.clone()).collect();
    let spec = Panel {
        caption: "throughput",
        unit: "MB/s",
        log: false,
    };
    panel(&left, &qds, &spec, &throughput, &paths)?;
    let mut latency = series(&results, &qds, "lat_p50_us", " p50");
    latency.extend(series(&results, &qds, "lat_p99_us", " p99"));
    let spec = Panel {
        caption: "latency (p99 dashed)",
        unit: "microseconds (log scale)",
        log: true,
    };
    panel(&right, &qds, &spec, &latency, &paths)?;
    root.present()?;
    Ok(())
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// The x axis: one segment per queue depth, labelled with it.
type Depths = SegmentedCoord<RangedCoordusize>;
type Chart<'a, 'b, Y> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<Depths, Y>>;

/// One panel: throughput on a linear axis from 0, or latency on a logarithmic one (p99 is
/// often ten times p50 and would flatten it).
struct Panel<'a> {
    caption: &'a str,
    unit: &'a str,
    log: bool,
}

fn panel(
    area: &Area,
    qds: &[u64],
    spec: &Panel,
    all: &[Series],
    paths: &[String],
) -> Result<(), PlotError> {
    let values = || all.iter().flat_map(|s| s.points.iter());
    let top = values().map(|p| p.3).fold(0.0f64, f64::max) * 1.1 + 1e-9;
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(spec.caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70);
    let x = (0..qds.len() - 1).into_segmented();
    if spec.log {
        let bottom = values().map(|p| p.2).fold(top, f64::min).max(1e-3) / 1.5;
        let mut chart = builder.build_cartesian_2d(x, (bottom..top).log_scale())?;
        lines(&mut chart, qds, spec, all, paths)
    } else {
        let mut chart = builder.build_cartesian_2d(x, 0.0..top)?;
        lines(&mut chart, qds, spec, all, paths)
    }
}

/// The mesh, a line per series (p99 dashed) with error bars, and the legend.
fn lines<'b, Y>(
    chart: &mut Chart<'b, 'b, Y>,
    qds: &[u64],
    spec: &Panel,
    all: &[Series],
    paths: &[String],
) -> Result<(), PlotError>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let label = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) => qds.get(*i).map(|q| q.to_string()).unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .x_desc("queue depth")
        .y_desc(spec.unit)
        .x_label_formatter(&label)
        .draw()?;
    for (i, s) in all.iter().enumerate() {
        // One colour per path across both panels.
        let i = paths.iter().position(|p| *p == s.path).unwrap_or(i);
        let color = COLORS[i % COLORS.len()];
        let at = |p: &(usize, f64, f64, f64)| SegmentValue::CenterOf(p.0);
        let points = s.points.iter().map(|p| (at(p), p.1));
        let drawn = if s.thin {
            chart.draw_series(DashedLineSeries::new(points, 8, 5, color.stroke_width(2)))?
        } else {
            chart.draw_series(LineSeries::new(points, color.stroke_width(2)))?
        };
        drawn
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(
            s.points
                .iter()
                .map(|p| ErrorBar::new_vertical(at(p), p.2, p.1, p.3, color.filled(), 8)),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn draws_every_path_over_the_depths_it_ran_at() {
        let summary = json!({"rw": "randread", "bs": "4k", "seconds": 1, "repeat": 2, "results": [
            {"path": "virtio", "qd": 1, "mb_per_s": 20.0, "lat_p50_us": 50.0, "lat_p99_us": 90.0,
             "min": {"mb_per_s": 19.0}, "max": {"mb_per_s": 22.0}},
            {"path": "virtio", "qd": 32, "mb_per_s": 300.0, "lat_p50_us": 400.0, "lat_p99_us": 900.0},
            {"path": "ata", "qd": 1, "mb_per_s": 2.0, "lat_p50_us": 900.0, "lat_p99_us": 1900.0},
            {"path": "net-switch-64", "qd": null, "tx_packets_per_s": 5},
        ]});
        let results = summary["results"].as_array().expect("array").clone();
        assert_eq!(depths(&results), [1, 32]);
        let s = series(&results, &[1, 32], "mb_per_s", "");
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[0].points,
            [(0, 20.0, 19.0, 22.0), (1, 300.0, 300.0, 300.0)]
        );
        assert_eq!(s[1].points, [(0, 2.0, 2.0, 2.0)]);
        let path = std::env::temp_dir().join(format!("sv-plot-{}.svg", std::process::id()));
        draw(&path, &summary).expect("drawn");
        let svg = std::fs::read_to_string(&path).expect("read back");
        let _ = std::fs::remove_file(&path);
        assert!(
            svg.contains("<svg") && svg.trim_end().ends_with("</svg>"),
            "{svg}"
        );
        for text in ["virtio p50", "ata p99", "queue depth", "MB/s"] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(
            svg.lines().any(|l| l.trim() == "32"),
            "no tick label for QD 32"
        );
        let empty = json!({"results": [{"path": "net-switch-64", "qd": null}]});
        assert!(matches!(draw(&path, &empty), Err(PlotError::Empty)));
    }
}
