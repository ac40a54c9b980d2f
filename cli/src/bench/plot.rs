//! `--plot FILE.png`: GB/s against fragment size, one line per mechanism, the limit dashed.
//! Text is drawn with a TrueType font of the system (KVX_PLOT_FONT, or a common one such as
//! Debian's fonts-dejavu-core).

use std::sync::OnceLock;

use plotters::prelude::*;

/// One line of a panel: (fragment bytes, GB/s) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(u64, f64)>,
}

/// One chart: a title, its lines, and the limit.
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
    pub limit: Vec<(u64, f64)>,
}

const FONTS: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
];

/// Registers a system font as "sans-serif", once.
fn font() -> Result<(), String> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let chosen = std::env::var("KVX_PLOT_FONT").ok();
        let candidates = chosen.iter().map(String::as_str).chain(FONTS);
        for path in candidates {
            if let Ok(bytes) = std::fs::read(path) {
                // The font lives for the rest of the process, as plotters requires.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{path} is not a TrueType font"));
            }
        }
        Err(
            "--plot needs a TrueType font: install fonts-dejavu-core (Debian, Ubuntu) or set \
             KVX_PLOT_FONT to a .ttf file"
                .into(),
        )
    })
    .clone()
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draws `panels` side by side into the PNG at `path`.
pub fn draw(path: &std::path::Path, panels: &[Panel]) -> Result<(), String> {
    font()?;
    let err = |e: &dyn std::fmt::Display| format!("plotting {}: {e}", path.display());
    let width = 640 * panels.len().max(1) as u32;
    let root = BitMapBackend::new(path, (width, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (panel, area) in panels.iter().zip(&areas) {
        let all = panel
            .series
            .iter()
            .flat_map(|s| s.points.iter())
            .chain(&panel.limit);
        let (mut lo, mut hi, mut top) = (u64::MAX, 0u64, 0f64);
        for &(x, y) in all {
            lo = lo.min(x);
            hi = hi.max(x);
            if y.is_finite() {
                top = top.max(y);
            }
        }
        if lo > hi {
            continue; // nothing measured
        }
        let (lo, hi) = (
            lo as f64 / 1024.0,
            (hi as f64 / 1024.0).max(lo as f64 / 1024.0 * 2.0),
        );
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d((lo * 0.8..hi * 1.25).log_scale(), 0.0..top * 1.1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("fragment (KiB)")
            .y_desc("GB/s")
            .draw()
            .map_err(|e| err(&e))?;
        let xy = |p: &[(u64, f64)]| -> Vec<(f64, f64)> {
            p.iter()
                .filter(|(_, y)| y.is_finite())
                .map(|&(x, y)| (x as f64 / 1024.0, y))
                .collect()
        };
        for (i, s) in panel.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(xy(&s.points), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(s.name.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color));
            chart
                .draw_series(
                    xy(&s.points)
                        .into_iter()
                        .map(|p| Circle::new(p, 3, color.filled())),
                )
                .map_err(|e| err(&e))?;
        }
        let limit = xy(&panel.limit);
        if !limit.is_empty() {
            chart
                .draw_series(DashedLineSeries::new(limit, 6, 4, BLACK.stroke_width(1)))
                .map_err(|e| err(&e))?
                .label("limit (one large copy)")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::MiddleRight)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}
