//! SVG and PNG plots. Text is laid out with an embedded DejaVu Sans Mono
//! through ab_glyph, so no fontconfig or freetype is needed on the machine.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

fn ensure_font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| "embedded font is invalid".to_string())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// One line of a chart.
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub series: Vec<Series>,
}

const W: u32 = 960;
const H: u32 = 600;

/// Writes `<dir>/<stem>.svg` and `<dir>/<stem>.png`; returns both paths.
pub fn render(chart: &Chart, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    ensure_font()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let svg = dir.join(format!("{stem}.svg"));
    let png = dir.join(format!("{stem}.png"));
    {
        let root = SVGBackend::new(&svg, (W, H)).into_drawing_area();
        draw(&root, chart)?;
        root.present()
            .map_err(|e| anyhow!("writing {}: {e:?}", svg.display()))?;
    }
    {
        let root = BitMapBackend::new(&png, (W, H)).into_drawing_area();
        draw(&root, chart)?;
        root.present()
            .map_err(|e| anyhow!("writing {}: {e:?}", png.display()))?;
    }
    Ok(vec![svg, png])
}

fn bounds(chart: &Chart) -> (f64, f64, f64) {
    let pts = chart.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0f64);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1) = (0.0, 1.0);
    }
    if chart.log_x {
        x0 = x0.max(0.1);
        x1 = x1.max(x0 * 10.0);
    } else if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    (x0, x1, if y1 > 0.0 { y1 * 1.1 } else { 1.0 })
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, chart: &Chart) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("plotting {}: {e:?}", chart.title);
    root.fill(&WHITE).map_err(err)?;
    let (x0, x1, y1) = bounds(chart);
    let mut b = ChartBuilder::on(root);
    b.caption(&chart.title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(90);
    macro_rules! body {
        ($ctx:expr) => {{
            let mut ctx = $ctx;
            ctx.configure_mesh()
                .x_desc(chart.x_label.as_str())
                .y_desc(chart.y_label.as_str())
                .label_style(("sans-serif", 14))
                .axis_desc_style(("sans-serif", 16))
                .y_label_formatter(&|v| short(*v))
                .draw()
                .map_err(err)?;
            for (i, s) in chart.series.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                ctx.draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(err)?
                .label(s.label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
                ctx.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(err)?;
            }
            if chart.series.len() > 1 || chart.series.iter().any(|s| !s.label.is_empty()) {
                ctx.configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 14))
                    .position(SeriesLabelPosition::LowerRight)
                    .draw()
                    .map_err(err)?;
            }
        }};
    }
    if chart.log_x {
        body!(
            b.build_cartesian_2d((x0..x1).log_scale(), 0f64..y1)
                .map_err(err)?
        );
    } else {
        body!(b.build_cartesian_2d(x0..x1, 0f64..y1).map_err(err)?);
    }
    Ok(())
}

fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e3 {
        format!("{:.1}K", v / 1e3)
    } else if a >= 10.0 || a == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The three standard plots of a run: IOPS over time and latency CDF.
/// (IOPS against queue depth needs several runs: see `tiers` / `qd_chart`.)
pub fn run_plots(r: &crate::report::Report, dir: &Path) -> Result<Vec<PathBuf>> {
    let ivl = r.timeline.interval_ms as f64 / 1000.0;
    let mut files = render(
        &Chart {
            title: format!("{} — IOPS over time", r.job.name),
            x_label: "time (s)".into(),
            y_label: "IOPS".into(),
            log_x: false,
            series: vec![Series {
                label: format!(
                    "{:?} bs={} qd={} jobs={}",
                    r.job.rw, r.job.bs, r.job.qd, r.job.jobs
                ),
                points: r
                    .timeline
                    .iops
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| ((i as f64 + 1.0) * ivl, v))
                    .collect(),
            }],
        },
        dir,
        "iops_over_time",
    )?;
    files.extend(render(
        &Chart {
            title: format!("{} — latency CDF", r.job.name),
            x_label: "latency (µs, log)".into(),
            y_label: "fraction of I/Os".into(),
            log_x: true,
            series: vec![Series {
                label: format!(
                    "p50 {:.0}µs p99 {:.0}µs",
                    r.summary.all.p50_us, r.summary.all.p99_us
                ),
                points: r
                    .latency_cdf
                    .iter()
                    .map(|p| (p.latency_us, p.fraction))
                    .collect(),
            }],
        },
        dir,
        "latency_cdf",
    )?);
    Ok(files)
}

/// IOPS against queue depth, one line per series (e.g. per tier and
/// direction).
pub fn qd_chart(title: &str, series: Vec<Series>, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    render(
        &Chart {
            title: title.into(),
            x_label: "queue depth per job (log)".into(),
            y_label: "IOPS".into(),
            log_x: true,
            series,
        },
        dir,
        stem,
    )
}
