//! Small hand-written SVG line charts for the benchmark reports: axes with ticks and labels,
//! linear or logarithmic axes, one line per series through the medians, min–max error bars,
//! distinct markers and dashes (so overlapping series stay visible) and a legend.
use std::fmt::Write as _;

/// One measured point: the median `y` and the range `lo..=hi` of the repetitions.
#[derive(Clone, Copy, Debug)]
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub lo: f64,
    pub hi: f64,
}

#[derive(Clone, Copy, Debug)]
pub enum Marker {
    Circle,
    Square,
    Triangle,
    Diamond,
}

pub struct Series {
    pub name: String,
    pub color: &'static str,
    /// An SVG stroke-dasharray, or None for a solid line.
    pub dash: Option<&'static str>,
    pub marker: Marker,
    pub points: Vec<Point>,
}

pub struct Chart {
    pub title: String,
    pub subtitle: String,
    pub x_label: String,
    pub y_label: String,
    pub x_log: bool,
    pub y_log: bool,
    pub series: Vec<Series>,
}

const WIDTH: f64 = 920.0;
const HEIGHT: f64 = 540.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 640.0; // plot area; the legend sits to the right of it
const TOP: f64 = 80.0;
const BOTTOM: f64 = 470.0;
/// Space between the plot frame and the first/last x value, so markers stay inside.
const PAD: f64 = 24.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A "nice" tick step (1, 2 or 5 × 10^k) giving about `target` intervals over `span`.
fn nice_step(span: f64, target: f64) -> f64 {
    let raw = (span / target).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    mag * if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    }
}

/// The nearest value of the 1-2-5 series (…, 5, 10, 20, 50, …) at or below `v` (or at or above).
fn one_two_five(v: f64, up: bool) -> f64 {
    let decade = 10f64.powf(v.log10().floor());
    let candidates = [decade, 2.0 * decade, 5.0 * decade, 10.0 * decade];
    if up {
        candidates.into_iter().find(|&c| c >= v * 0.9999).unwrap_or(10.0 * decade)
    } else {
        candidates.into_iter().rev().find(|&c| c <= v * 1.0001).unwrap_or(decade)
    }
}

fn fmt_tick(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 { 0 } else { (-step.log10().floor()) as usize };
    format!("{v:.decimals$}")
}

/// Renders the chart as a standalone SVG document.
pub fn svg(chart: &Chart) -> String {
    let points = || chart.series.iter().flat_map(|s| s.points.iter());
    let (mut x_min, mut x_max) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.x), b.max(p.x)));
    let y_top = points().fold(0.0f64, |m, p| m.max(p.hi).max(p.y));
    if !x_min.is_finite() {
        (x_min, x_max) = (1.0, 10.0);
    }
    // x scale
    let (x0, x1) = if chart.x_log {
        let lo = 10f64.powf(x_min.max(1e-9).log10().floor());
        let mut hi = 10f64.powf(x_max.max(1e-9).log10().ceil());
        if hi <= lo {
            hi = lo * 10.0;
        }
        (lo, hi)
    } else if x_max > x_min {
        (x_min, x_max)
    } else {
        (x_min - 1.0, x_max + 1.0)
    };
    let sx = |x: f64| {
        let t = if chart.x_log { (x.log10() - x0.log10()) / (x1.log10() - x0.log10()) } else { (x - x0) / (x1 - x0) };
        LEFT + PAD + t * (RIGHT - LEFT - 2.0 * PAD)
    };
    // y scale: linear from 0 to a round value above the largest max, or logarithmic between
    // 1-2-5 values around all the points; ticks with the step their labels need.
    let (y0, y1, y_ticks): (f64, f64, Vec<(f64, f64)>) = if chart.y_log {
        let y_bottom = points().fold(f64::INFINITY, |m, p| m.min(p.lo).min(p.y)).max(1e-9);
        let y_top = y_top.max(y_bottom * 1.01);
        let lo = one_two_five(y_bottom, false);
        let hi = one_two_five(y_top, true);
        let mut ticks = Vec::new();
        let mut decade = 10f64.powf(lo.log10().floor());
        // Labels at 1, 2, 5 × 10^k; over a narrow range at every integer multiple.
        let multiples: &[f64] = if hi / lo <= 20.0 { &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0] } else { &[1.0, 2.0, 5.0] };
        while decade <= hi * 1.0001 {
            for &m in multiples {
                let v = decade * m;
                if v >= lo * 0.9999 && v <= hi * 1.0001 {
                    ticks.push((v, decade));
                }
            }
            decade *= 10.0;
        }
        (lo, hi, ticks)
    } else {
        let step = nice_step(if y_top > 0.0 { y_top * 1.05 } else { 1.0 }, 6.0);
        let hi = ((y_top * 1.05) / step).ceil().max(1.0) * step;
        let ticks = (0..=((hi / step).round() as usize)).map(|i| (i as f64 * step, step)).collect();
        (0.0, hi, ticks)
    };
    let sy = |y: f64| {
        let t = if chart.y_log { (y.log10() - y0.log10()) / (y1.log10() - y0.log10()) } else { (y - y0) / (y1 - y0) };
        BOTTOM - t * (BOTTOM - TOP)
    };

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"#
    );
    let _ = writeln!(s, "<title>{}</title>", esc(&chart.title));
    let _ = writeln!(s, r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="32" font-size="18" font-weight="bold">{}</text>"#, LEFT, esc(&chart.title));
    let _ = writeln!(s, r##"<text x="{}" y="54" font-size="12" fill="#555">{}</text>"##, LEFT, esc(&chart.subtitle));

    // grid and y ticks
    for &(y, y_step) in &y_ticks {
        let py = sy(y);
        let _ = writeln!(s, r##"<line x1="{LEFT}" y1="{py:.1}" x2="{RIGHT}" y2="{py:.1}" stroke="#e4e4e4"/>"##);
        let _ = writeln!(s, r##"<line x1="{:.1}" y1="{py:.1}" x2="{LEFT}" y2="{py:.1}" stroke="#333"/>"##, LEFT - 5.0);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="end">{}</text>"#,
            LEFT - 8.0,
            py + 4.0,
            fmt_tick(y, y_step)
        );
    }
    // x ticks
    let mut major = Vec::new();
    let mut minor = Vec::new();
    if chart.x_log {
        let mut decade = x0;
        while decade <= x1 * 1.0001 {
            major.push(decade);
            for m in 2..10 {
                let v = decade * m as f64;
                if v < x1 {
                    minor.push(v);
                }
            }
            decade *= 10.0;
        }
    } else {
        let step = nice_step(x1 - x0, 8.0);
        let mut v = (x0 / step).ceil() * step;
        while v <= x1 + step * 0.001 {
            major.push(v);
            v += step;
        }
    }
    for v in &minor {
        let px = sx(*v);
        let _ = writeln!(s, r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{BOTTOM}" stroke="#f2f2f2"/>"##);
        let _ = writeln!(s, r##"<line x1="{px:.1}" y1="{BOTTOM}" x2="{px:.1}" y2="{:.1}" stroke="#333"/>"##, BOTTOM + 3.0);
    }
    for v in &major {
        let px = sx(*v);
        let _ = writeln!(s, r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{BOTTOM}" stroke="#e4e4e4"/>"##);
        let _ = writeln!(s, r##"<line x1="{px:.1}" y1="{BOTTOM}" x2="{px:.1}" y2="{:.1}" stroke="#333"/>"##, BOTTOM + 6.0);
        let _ = writeln!(
            s,
            r#"<text x="{px:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text>"#,
            BOTTOM + 20.0,
            fmt_tick(*v, if chart.x_log { 1.0 } else { nice_step(x1 - x0, 8.0) })
        );
    }
    // axes and their labels
    let _ = writeln!(s, r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#333"/>"##, RIGHT - LEFT, BOTTOM - TOP);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" font-size="13" text-anchor="middle">{}</text>"#,
        (LEFT + RIGHT) / 2.0,
        BOTTOM + 44.0,
        esc(&chart.x_label)
    );
    let (ly_x, ly_y) = (22.0, (TOP + BOTTOM) / 2.0);
    let _ = writeln!(
        s,
        r#"<text x="{ly_x}" y="{ly_y}" font-size="13" text-anchor="middle" transform="rotate(-90 {ly_x} {ly_y})">{}</text>"#,
        esc(&chart.y_label)
    );

    // series: dodge them sideways a little so error bars at the same x stay apart
    let n = chart.series.len() as f64;
    for (i, series) in chart.series.iter().enumerate() {
        let dx = (i as f64 - (n - 1.0) / 2.0) * 6.0;
        let color = series.color;
        let dash = series.dash.map(|d| format!(r#" stroke-dasharray="{d}""#)).unwrap_or_default();
        let path: Vec<String> = series.points.iter().map(|p| format!("{:.1},{:.1}", sx(p.x) + dx, sy(p.y))).collect();
        let _ = writeln!(s, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2.2"{dash}/>"#, path.join(" "));
        for p in &series.points {
            let (px, py) = (sx(p.x) + dx, sy(p.y));
            let (plo, phi) = (sy(p.lo), sy(p.hi));
            let _ = writeln!(s, r#"<line x1="{px:.1}" y1="{plo:.1}" x2="{px:.1}" y2="{phi:.1}" stroke="{color}" stroke-width="1.4"/>"#);
            for cap in [plo, phi] {
                let _ = writeln!(
                    s,
                    r#"<line x1="{:.1}" y1="{cap:.1}" x2="{:.1}" y2="{cap:.1}" stroke="{color}" stroke-width="1.4"/>"#,
                    px - 4.0,
                    px + 4.0
                );
            }
            s.push_str(&marker(series.marker, px, py, color));
        }
    }

    // legend
    let lx = RIGHT + 24.0;
    let _ = writeln!(s, r#"<text x="{lx}" y="{}" font-size="13" font-weight="bold">Legend</text>"#, TOP + 4.0);
    for (i, series) in chart.series.iter().enumerate() {
        let ly = TOP + 30.0 + i as f64 * 28.0;
        let dash = series.dash.map(|d| format!(r#" stroke-dasharray="{d}""#)).unwrap_or_default();
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="2.2"{dash}/>"#,
            lx + 34.0,
            series.color
        );
        s.push_str(&marker(series.marker, lx + 17.0, ly, series.color));
        let _ = writeln!(s, r#"<text x="{}" y="{}" font-size="13">{}</text>"#, lx + 44.0, ly + 4.5, esc(&series.name));
    }
    let note_y = TOP + 30.0 + n * 28.0 + 6.0;
    for (i, line) in ["line: median of repetitions", "bars: min–max"].iter().enumerate() {
        let _ = writeln!(s, r##"<text x="{lx}" y="{}" font-size="11" fill="#555">{line}</text>"##, note_y + i as f64 * 16.0);
    }
    s.push_str("</svg>\n");
    s
}

fn marker(m: Marker, x: f64, y: f64, color: &str) -> String {
    match m {
        Marker::Circle => format!(r#"<circle cx="{x:.1}" cy="{y:.1}" r="4.5" fill="{color}" stroke="white" stroke-width="1"/>"#) + "\n",
        Marker::Square => format!(
            r#"<rect x="{:.1}" y="{:.1}" width="8.5" height="8.5" fill="{color}" stroke="white" stroke-width="1"/>"#,
            x - 4.25,
            y - 4.25
        ) + "\n",
        Marker::Triangle => format!(
            r#"<polygon points="{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" fill="{color}" stroke="white" stroke-width="1"/>"#,
            x,
            y - 5.5,
            x - 5.0,
            y + 4.0,
            x + 5.0,
            y + 4.0
        ) + "\n",
        Marker::Diamond => format!(
            r#"<polygon points="{:.1},{:.1} {:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" fill="{color}" stroke="white" stroke-width="1"/>"#,
            x,
            y - 5.5,
            x + 5.0,
            y,
            x,
            y + 5.5,
            x - 5.0,
            y
        ) + "\n",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(100.0, 5.0), 20.0);
        assert_eq!(nice_step(180.0, 6.0), 50.0);
        assert_eq!(nice_step(7.0, 6.0), 2.0);
        assert_eq!(fmt_tick(0.5, 0.5), "0.5");
        assert_eq!(fmt_tick(150.0, 50.0), "150");
    }

    #[test]
    fn renders_a_well_formed_document() {
        let chart = Chart {
            title: "t <&>".into(),
            subtitle: "s".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            x_log: true,
            y_log: false,
            series: vec![Series {
                name: "a".into(),
                color: "#000",
                dash: Some("6 3"),
                marker: Marker::Triangle,
                points: vec![Point { x: 1.0, y: 2.0, lo: 1.5, hi: 2.5 }, Point { x: 1000.0, y: 3.0, lo: 3.0, hi: 3.0 }],
            }],
        };
        let svg = svg(&chart);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;&amp;&gt;"));
        assert!(svg.contains(">1000<"), "a tick per decade up to 1000");
        let log = super::svg(&Chart { y_log: true, ..chart });
        assert!(log.contains(">1<") && log.contains(">2<") && log.contains(">5<"), "1-2-5 ticks on a log y axis");
    }

    #[test]
    fn one_two_five_series() {
        assert_eq!(one_two_five(9.8, false), 5.0);
        assert_eq!(one_two_five(243.4, true), 500.0);
        assert_eq!(one_two_five(10.0, false), 10.0);
        assert_eq!(one_two_five(180.0, true), 200.0);
    }
}
