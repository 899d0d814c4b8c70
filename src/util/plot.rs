//! SVG charts for the analyses and the report (line, scatter, grouped bars with 95% intervals),
//! drawn with `plotters`' SVG backend and no font system: text is written as SVG `<text>` and
//! laid out by the viewer. Every function returns the SVG document as a string and accepts
//! empty input, non-finite values (left out), single points and constant data without panicking.

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::{Error, Result};

/// One named series of `(x, y)` points (a line, or a group of scatter points).
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One bar per group: `(value, optional 95% interval (low, high))`, in the order of the groups.
#[derive(Clone, Debug, PartialEq)]
pub struct BarSeries {
    pub name: String,
    pub values: Vec<(f64, Option<(f64, f64)>)>,
}

impl Series {
    /// A series from its name and points.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
        }
    }
}

const SIZE: (u32, u32) = (860, 520);
const FONT: &str = "sans-serif";

/// Tableau-10, the distinct colours series are drawn in (cycled).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The colour of series `i`.
pub fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn chart_err(title: &str) -> impl Fn(String) -> Error + '_ {
    move |e| Error::msg(format!("drawing chart `{title}`: {e}"))
}

/// A drawing range covering the finite values, padded by 5%; `(0, 1)` when there are none and a
/// unit-scale window around a constant.
fn axis_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    if !(span > f64::EPSILON * hi.abs().max(lo.abs()).max(1e-300)) || !span.is_finite() {
        let pad = (lo.abs() * 0.1).max(0.5);
        return (lo - pad, hi + pad);
    }
    (lo - 0.05 * span, hi + 0.05 * span)
}

/// A tick label: integers without a decimal point, other values with at most four decimals.
fn tick(v: &f64) -> String {
    let v = *v;
    if v == 0.0 {
        return "0".into();
    }
    if (v - v.round()).abs() < 1e-9 * v.abs().max(1.0) && v.abs() < 1e9 {
        return format!("{:.0}", v);
    }
    if v.abs() >= 1e-3 && v.abs() < 1e6 {
        let s = format!("{v:.4}");
        return s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{v:.2e}")
}

/// The corner of the plot with the fewest points near it, for the legend (it covers about a
/// third of the width and a quarter of the height).
fn legend_corner(points: &[(f64, f64)], x: (f64, f64), y: (f64, f64)) -> SeriesLabelPosition {
    let fx = |v: f64| (v - x.0) / (x.1 - x.0);
    let fy = |v: f64| (v - y.0) / (y.1 - y.0);
    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let crowd = |right: bool, upper: bool| {
        points
            .iter()
            .filter(|p| finite(p))
            .filter(|(px, py)| {
                let (a, b) = (fx(*px), fy(*py));
                (if right { a > 0.6 } else { a < 0.4 }) && (if upper { b > 0.7 } else { b < 0.3 })
            })
            .count()
    };
    corners
        .into_iter()
        .min_by_key(|(_, r, u)| crowd(*r, *u))
        .map(|(c, _, _)| c)
        .unwrap_or(SeriesLabelPosition::UpperRight)
}

fn finite(p: &(f64, f64)) -> bool {
    p.0.is_finite() && p.1.is_finite()
}

/// Runs of consecutive finite points (a non-finite point breaks the line).
fn segments(points: &[(f64, f64)]) -> Vec<Vec<(f64, f64)>> {
    let mut out = vec![];
    let mut cur = vec![];
    for p in points {
        if finite(p) {
            cur.push(*p);
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

type Chart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// Draw `fill` on a fresh white SVG canvas and return the document.
fn render(
    title: &str,
    fill: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> Result<()>,
) -> Result<String> {
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, SIZE).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| chart_err(title)(e.to_string()))?;
        fill(&root)?;
        root.present()
            .map_err(|e| chart_err(title)(e.to_string()))?;
    }
    Ok(buf)
}

/// Axes with a title and labelled, gridded axes over the given ranges.
fn axes<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
    title: &str,
    x: (f64, f64),
    y: (f64, f64),
) -> Result<Chart<'a, 'b>> {
    ChartBuilder::on(root)
        .caption(title, (FONT, 22))
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x.0..x.1, y.0..y.1)
        .map_err(|e| chart_err(title)(e.to_string()))
}

fn legend<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    title: &str,
    corner: SeriesLabelPosition,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(corner)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.5))
        .label_font((FONT, 14))
        .draw()
        .map_err(|e| chart_err(title)(e.to_string()))
}

/// A line chart: one line (with point markers) per series, a legend naming them.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<String> {
    line_chart_with_bands(title, x_label, y_label, series, &[])
}

/// A line chart with a shaded band per series (`bands[i]`: `(x, low, high)` points of series
/// `i`'s interval, drawn under the lines in the series' colour; a missing or empty entry draws
/// none). Non-finite band points are left out.
pub fn line_chart_with_bands(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    bands: &[Vec<(f64, f64, f64)>],
) -> Result<String> {
    let all = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|p| finite(p))
    };
    let band_pts = || {
        bands
            .iter()
            .flatten()
            .filter(|b| b.0.is_finite() && b.1.is_finite() && b.2.is_finite())
    };
    let x = axis_range(all().map(|p| p.0));
    let y = axis_range(
        all()
            .map(|p| p.1)
            .chain(band_pts().flat_map(|b| [b.1, b.2])),
    );
    let err = chart_err(title);
    render(title, |root| {
        let mut chart = axes(root, title, x, y)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .x_label_formatter(&tick)
            .y_label_formatter(&tick)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (i, band) in bands.iter().enumerate().take(series.len()) {
            let pts: Vec<&(f64, f64, f64)> = band
                .iter()
                .filter(|b| b.0.is_finite() && b.1.is_finite() && b.2.is_finite())
                .collect();
            if pts.len() < 2 {
                continue;
            }
            let outline: Vec<(f64, f64)> = pts
                .iter()
                .map(|b| (b.0, b.2))
                .chain(pts.iter().rev().map(|b| (b.0, b.1)))
                .collect();
            chart
                .draw_series(std::iter::once(Polygon::new(
                    outline,
                    colour(i).mix(0.18).filled(),
                )))
                .map_err(|e| err(e.to_string()))?;
        }
        for (i, s) in series.iter().enumerate() {
            let c = colour(i);
            let segs = segments(&s.points);
            // The first draw carries the legend entry (even when the series has no finite point).
            let first = segs.first().cloned().unwrap_or_default();
            chart
                .draw_series(LineSeries::new(first, c.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(2))
                });
            for seg in segs.iter().skip(1) {
                chart
                    .draw_series(LineSeries::new(seg.clone(), c.stroke_width(2)))
                    .map_err(|e| err(e.to_string()))?;
            }
            chart
                .draw_series(
                    s.points
                        .iter()
                        .filter(|p| finite(p))
                        .map(|p| Circle::new(*p, 3, c.filled())),
                )
                .map_err(|e| err(e.to_string()))?;
        }
        if !series.is_empty() {
            let pts: Vec<(f64, f64)> = all().copied().collect();
            legend(&mut chart, title, legend_corner(&pts, x, y))?;
        }
        Ok(())
    })
}

/// A scatter plot: one colour per group, a legend naming the groups.
pub fn scatter(title: &str, x_label: &str, y_label: &str, groups: &[Series]) -> Result<String> {
    let all = || {
        groups
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|p| finite(p))
    };
    let x = axis_range(all().map(|p| p.0));
    let y = axis_range(all().map(|p| p.1));
    let err = chart_err(title);
    render(title, |root| {
        let mut chart = axes(root, title, x, y)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .x_label_formatter(&tick)
            .y_label_formatter(&tick)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (i, g) in groups.iter().enumerate() {
            let c = colour(i);
            chart
                .draw_series(
                    g.points
                        .iter()
                        .filter(|p| finite(p))
                        .map(|p| Circle::new(*p, 4, c.mix(0.75).filled())),
                )
                .map_err(|e| err(e.to_string()))?
                .label(g.name.as_str())
                .legend(move |(x, y)| Circle::new((x + 8, y), 4, c.filled()));
        }
        if !groups.is_empty() {
            let pts: Vec<(f64, f64)> = all().copied().collect();
            legend(&mut chart, title, legend_corner(&pts, x, y))?;
        }
        Ok(())
    })
}

/// Grouped bars: one cluster per group (x axis), one bar per series in each cluster, with the
/// series' 95% interval drawn as an error bar where given (the paper-style "harmfulness per
/// defence, grouped by attack" figure). Every series needs one value per group.
pub fn bar_chart(
    title: &str,
    y_label: &str,
    groups: &[String],
    bars: &[BarSeries],
) -> Result<String> {
    for b in bars {
        if b.values.len() != groups.len() {
            return Err(Error::msg(format!(
                "bar chart `{title}`: series `{}` has {} values for {} groups",
                b.name,
                b.values.len(),
                groups.len()
            )));
        }
    }
    let ng = groups.len();
    let nb = bars.len().max(1);
    let ys = bars.iter().flat_map(|b| {
        b.values.iter().flat_map(|(v, ci)| {
            let (lo, hi) = ci.unwrap_or((f64::NAN, f64::NAN));
            [*v, lo, hi]
        })
    });
    let y = axis_range(ys.chain([0.0]));
    // Bars start at zero when zero is in view, else at the bottom of the window.
    let base = 0f64.clamp(y.0, y.1);
    let x = (-0.5, ng.max(1) as f64 - 0.5);
    let width = 0.8 / nb as f64;
    let err = chart_err(title);
    render(title, |root| {
        let mut chart = axes(root, title, x, y)?;
        let name_at = |v: &f64| -> String {
            let r = v.round();
            if (v - r).abs() < 1e-6 && r >= 0.0 && (r as usize) < ng {
                groups[r as usize].clone()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(ng.max(1))
            .x_label_formatter(&name_at)
            .y_desc(y_label)
            .y_label_formatter(&tick)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (j, b) in bars.iter().enumerate() {
            let c = colour(j);
            let rects = b.values.iter().enumerate().filter_map(|(g, (v, _))| {
                let x0 = g as f64 - 0.4 + j as f64 * width;
                v.is_finite().then(|| {
                    Rectangle::new(
                        [(x0 + 0.05 * width, base), (x0 + 0.95 * width, *v)],
                        c.filled(),
                    )
                })
            });
            chart
                .draw_series(rects)
                .map_err(|e| err(e.to_string()))?
                .label(b.name.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled()));
            let whiskers = b.values.iter().enumerate().filter_map(|(g, (_, ci))| {
                let (lo, hi) = (*ci)?;
                if !(lo.is_finite() && hi.is_finite()) {
                    return None;
                }
                let xc = g as f64 - 0.4 + (j as f64 + 0.5) * width;
                let cap = 0.2 * width;
                Some(PathElement::new(
                    vec![
                        (xc - cap, lo),
                        (xc + cap, lo),
                        (xc, lo),
                        (xc, hi),
                        (xc - cap, hi),
                        (xc + cap, hi),
                    ],
                    BLACK.stroke_width(1),
                ))
            });
            chart
                .draw_series(whiskers)
                .map_err(|e| err(e.to_string()))?;
        }
        if !bars.is_empty() {
            // A bar fills its column from the base up to its value (or interval top).
            let mut pts = vec![];
            for (j, b) in bars.iter().enumerate() {
                for (g, (v, ci)) in b.values.iter().enumerate() {
                    let xc = g as f64 - 0.4 + (j as f64 + 0.5) * width;
                    let top = ci.map_or(*v, |(lo, hi)| v.max(lo).max(hi));
                    if top.is_finite() {
                        let steps = 8;
                        for k in 0..=steps {
                            pts.push((xc, base + (top - base) * k as f64 / steps as f64));
                        }
                    }
                }
            }
            legend(&mut chart, title, legend_corner(&pts, x, y))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svgish(svg: &str, needles: &[&str]) {
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        for n in needles {
            assert!(svg.contains(n), "`{n}` missing from the SVG");
        }
    }

    #[test]
    fn bands_are_drawn_under_their_series_and_widen_the_axis() {
        let s = vec![Series::new("a", vec![(0.0, 1.0), (5.0, 2.0)])];
        let band = vec![vec![(0.0, 0.5, 1.5), (5.0, 1.0, 9.0)]];
        let svg = line_chart_with_bands("t", "x", "y", &s, &band).unwrap();
        assert!(svg.contains("<polygon"), "{svg}");
        let has_tick = |svg: &str, t: &str| svg.contains(&format!(">\n{t}\n</text>"));
        assert!(has_tick(&svg, "8"), "the axis reaches the band: {svg}");
        let plain = line_chart("t", "x", "y", &s).unwrap();
        assert!(!plain.contains("<polygon") && !has_tick(&plain, "8"));
        // A one-point or non-finite band draws nothing and does not panic.
        let bad = vec![vec![(0.0, f64::NAN, 1.0), (5.0, 1.0, 2.0)]];
        assert!(!line_chart_with_bands("t", "x", "y", &s, &bad)
            .unwrap()
            .contains("<polygon"));
    }

    #[test]
    fn line_chart_has_title_axes_and_legend() {
        let s = vec![
            Series::new("base model", vec![(0.0, 1.0), (1.0, 2.0), (2.0, 1.5)]),
            Series::new("defended", vec![(0.0, 0.5), (1.0, f64::NAN), (2.0, 3.0)]),
        ];
        let svg = line_chart("Logit lens", "layer", "mean log-prob", &s).unwrap();
        svgish(
            &svg,
            &[
                "<text",
                "Logit lens",
                "layer",
                "mean log-prob",
                "base model",
                "defended",
            ],
        );
        // Two distinct colours.
        assert!(
            svg.contains("#1F77B4") || svg.contains("#1f77b4"),
            "first colour"
        );
        assert!(
            svg.contains("#FF7F0E") || svg.contains("#ff7f0e"),
            "second colour"
        );
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        let cases: Vec<Vec<Series>> = vec![
            vec![],
            vec![Series::new("empty", vec![])],
            vec![Series::new("single", vec![(3.0, 7.0)])],
            vec![Series::new(
                "constant",
                vec![(1.0, 2.0), (2.0, 2.0), (3.0, 2.0)],
            )],
            vec![Series::new(
                "all nan",
                vec![(f64::NAN, f64::NAN), (1.0, f64::INFINITY)],
            )],
            vec![Series::new("zeros", vec![(0.0, 0.0), (0.0, 0.0)])],
            vec![Series::new("tiny", vec![(0.0, 1e-12), (1.0, 2e-12)])],
        ];
        for s in &cases {
            let name = s.first().map_or("none", |s| s.name.as_str());
            let svg = line_chart("t", "x", "y", s).unwrap();
            svgish(&svg, &["t", name.trim_start_matches("none")]);
            let svg = scatter("t", "x", "y", s).unwrap();
            svgish(&svg, &["t", name.trim_start_matches("none")]);
        }
        let svg = bar_chart("b", "y", &[], &[]).unwrap();
        svgish(&svg, &["b"]);
        let svg = bar_chart(
            "b",
            "y",
            &["g".into()],
            &[BarSeries {
                name: "nan".into(),
                values: vec![(f64::NAN, Some((f64::NAN, 1.0)))],
            }],
        )
        .unwrap();
        svgish(&svg, &["nan"]);
    }

    #[test]
    fn scatter_names_groups() {
        let g = vec![
            Series::new("harmful", vec![(0.0, 0.0), (1.0, 1.0)]),
            Series::new("harmless", vec![(-1.0, 0.5)]),
        ];
        let svg = scatter("PCA", "PC1", "PC2", &g).unwrap();
        svgish(
            &svg,
            &["PCA", "PC1", "PC2", "harmful", "harmless", "<circle"],
        );
    }

    #[test]
    fn bar_chart_names_every_group_and_draws_error_bars() {
        for ng in 1..=7 {
            let groups: Vec<String> = (0..ng).map(|i| format!("attack-{i}")).collect();
            let bars = vec![
                BarSeries {
                    name: "RepNoise".into(),
                    values: (0..ng)
                        .map(|i| (0.1 * i as f64, Some((0.0, 0.2 + 0.1 * i as f64))))
                        .collect(),
                },
                BarSeries {
                    name: "base".into(),
                    values: (0..ng)
                        .map(|i| (0.7, if i % 2 == 0 { None } else { Some((0.6, 0.8)) }))
                        .collect(),
                },
            ];
            let svg = bar_chart("Harmfulness after attack", "harmfulness", &groups, &bars).unwrap();
            let mut needles = vec![
                "Harmfulness after attack",
                "harmfulness",
                "RepNoise",
                "base",
                "<rect",
                "<polyline",
            ];
            needles.extend(groups.iter().map(|g| g.as_str()));
            svgish(&svg, &needles);
        }
        let e = bar_chart(
            "x",
            "y",
            &["a".into(), "b".into()],
            &[BarSeries {
                name: "short".into(),
                values: vec![(1.0, None)],
            }],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("short") && e.contains("1 values for 2 groups"),
            "{e}"
        );
    }

    #[test]
    fn ticks_and_legend_corner() {
        assert_eq!(tick(&5.0), "5");
        assert_eq!(tick(&-20.0), "-20");
        assert_eq!(tick(&0.25), "0.25");
        assert_eq!(tick(&0.0), "0");
        assert_eq!(tick(&1.5e-7), "1.50e-7");
        // Points crowd the upper right: the legend goes elsewhere.
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (0.9 + 0.01 * i as f64, 0.9)).collect();
        let c = legend_corner(&pts, (0.0, 1.0), (0.0, 1.0));
        assert!(!matches!(c, SeriesLabelPosition::UpperRight));
        assert!(matches!(
            legend_corner(&[], (0.0, 1.0), (0.0, 1.0)),
            SeriesLabelPosition::UpperRight
        ));
    }

    #[test]
    fn ranges_are_finite_and_non_empty() {
        assert_eq!(axis_range([].into_iter()), (0.0, 1.0));
        let (a, b) = axis_range([2.0, 2.0].into_iter());
        assert!(a < 2.0 && b > 2.0);
        let (a, b) = axis_range([f64::NAN, 1.0, 3.0].into_iter());
        assert!(a < 1.0 && b > 3.0 && a > 0.8);
        assert_eq!(
            segments(&[(0.0, 1.0), (1.0, f64::NAN), (2.0, 1.0), (3.0, 1.0)]).len(),
            2
        );
    }
}
