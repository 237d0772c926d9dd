//! `eva_report.svg`: where the rank went, as three aligned heatmaps over blocks × module types
//! (rank, explained variance captured, step of convergence), written by hand as plain SVG 1.1.
//!
//! Hand-written rather than drawn with `plotters`: the picture is rectangles and text on a grid,
//! about as many lines here as the plotting calls would take, and this way eva gains no
//! dependency tree (plotters' text layout wants a font backend), the output is byte-for-byte
//! deterministic, and every cell carries a `<title>` naming its layer.

use super::grid::{captured, Grid};
use super::report::{LayerReport, Report};
use std::fmt::Write as _;

/// Height of one grid row, px.
const ROW: f64 = 18.0;
/// Margin around the picture, px.
const MARGIN: f64 = 16.0;
/// Grid area the cell width aims at, px (cells stay between `MIN_CELL` and `MAX_CELL`).
const TARGET_WIDTH: f64 = 1000.0;
const MIN_CELL: f64 = 14.0;
const MAX_CELL: f64 = 44.0;
/// Not converged: outline and fill.
const RED: &str = "#d62728";
/// Rank 0 (dropped layer).
const EMPTY: &str = "#eeeeee";
const FONT: &str = "DejaVu Sans, Verdana, Arial, sans-serif";

/// Viridis (matplotlib), 10 stops: perceptually uniform and readable in grey.
const VIRIDIS: [[u8; 3]; 10] = [
    [68, 1, 84],
    [72, 40, 120],
    [62, 73, 137],
    [49, 104, 142],
    [38, 130, 142],
    [31, 158, 137],
    [53, 183, 121],
    [110, 206, 88],
    [181, 222, 43],
    [253, 231, 37],
];
/// ColorBrewer Blues, light to dark.
const BLUES: [[u8; 3]; 5] = [
    [222, 235, 247],
    [158, 202, 225],
    [107, 174, 214],
    [49, 130, 189],
    [8, 48, 107],
];

fn ramp(stops: &[[u8; 3]], t: f64) -> [u8; 3] {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * (stops.len() - 1) as f64;
    let i = (x.floor() as usize).min(stops.len() - 2);
    let f = x - i as f64;
    let mut c = [0u8; 3];
    for k in 0..3 {
        c[k] = (stops[i][k] as f64 * (1.0 - f) + stops[i + 1][k] as f64 * f).round() as u8;
    }
    c
}

fn hex(c: [u8; 3]) -> String {
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

/// Black or white, whichever reads better on `c` (relative luminance, sRGB weights).
fn ink(c: [u8; 3]) -> &'static str {
    let l = 0.2126 * c[0] as f64 + 0.7152 * c[1] as f64 + 0.0722 * c[2] as f64;
    if l > 140.0 {
        "#000000"
    } else {
        "#ffffff"
    }
}

/// Escapes text for SVG content and attributes.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' => {}
            c => out.push(c),
        }
    }
    out
}

/// Approximate width of `s` at `size` px (DejaVu Sans averages ~0.62 em per character).
fn text_width(s: &str, size: f64) -> f64 {
    s.chars().count() as f64 * size * 0.62
}

/// What a panel shows in a cell.
struct Paint {
    fill: String,
    text: String,
    ink: &'static str,
}

/// One heatmap of the grid.
struct Panel<'r> {
    title: String,
    /// Legend: low and high labels and the color ramp.
    legend: (String, String, &'static [[u8; 3]]),
    paint: Box<dyn Fn(&LayerReport) -> Paint + 'r>,
}

/// Renders the picture of `report`.
pub fn render(report: &Report) -> String {
    let grid = Grid::new(report);
    let ranks: Vec<usize> = report.layers.iter().map(|l| l.rank).collect();
    let max_rank = ranks.iter().copied().max().unwrap_or(0).max(1);
    let max_captured = report.layers.iter().map(captured).fold(0.0, f64::max);
    let steps = report.steps.max(1);
    let unconverged = report
        .layers
        .iter()
        .filter(|l| l.converged_step.is_none() && !l.degenerate)
        .count();
    let uncertain = report
        .layers
        .iter()
        .filter(|l| !l.allocation_certain)
        .count();

    let cell = (TARGET_WIDTH / grid.width.max(1) as f64)
        .floor()
        .clamp(MIN_CELL, MAX_CELL);
    let cell_font = if cell < 20.0 { 9.0 } else { 10.0 };
    let label_w = (grid
        .rows
        .iter()
        .map(|r| text_width(r, 11.0))
        .fold(40.0, f64::max)
        + 10.0)
        .ceil();
    let x0 = MARGIN + label_w;
    let grid_w = grid.width as f64 * cell;
    let fits = |s: &str| text_width(s, cell_font) + 3.0 <= cell;

    let title = "EVA: where the rank went".to_string();
    let line1 = format!(
        "{} layers in {} blocks · budget {} (r {} × {} layers) · rho {} · tau {}",
        report.layers.len(),
        grid.columns.len(),
        report.rank_budget,
        report.r,
        report.layers.len(),
        report.rho,
        report.tau
    );
    let line2 = format!(
        "ranks {}..{}, sum {} · {} steps of {} units ({} of {} units), stop: {} · {} not converged · {} not certified",
        ranks.iter().min().unwrap_or(&0),
        ranks.iter().max().unwrap_or(&0),
        ranks.iter().sum::<usize>(),
        report.steps,
        report.batch_size,
        report.units_seen,
        report.units_total,
        report.stop_reason,
        unconverged,
        uncertain
    );
    let line3 = format!("source: {}", report.source);
    let foot = "outline red: not converged · outline dashed: allocation not certified (sketch bounds) · hover a cell for its layer";
    let header_w = [
        text_width(&title, 15.0),
        text_width(&line1, 11.0),
        text_width(&line2, 11.0),
        text_width(&line3, 11.0),
        text_width(foot, 10.0),
    ]
    .into_iter()
    .fold(0.0, f64::max);
    let width = (x0 + grid_w + MARGIN)
        .max(MARGIN * 2.0 + header_w)
        .max(MARGIN * 2.0 + 200.0)
        .ceil();

    let panels = [
        Panel {
            title: "Rank per layer (0 = dropped from the adapter)".into(),
            legend: ("0".into(), max_rank.to_string(), &VIRIDIS),
            paint: Box::new(move |l: &LayerReport| {
                let c = ramp(&VIRIDIS, l.rank as f64 / max_rank as f64);
                if l.rank == 0 {
                    Paint {
                        fill: EMPTY.into(),
                        text: "0".into(),
                        ink: "#777777",
                    }
                } else {
                    Paint {
                        fill: hex(c),
                        text: l.rank.to_string(),
                        ink: ink(c),
                    }
                }
            }),
        },
        Panel {
            title: "Explained variance captured, % (sum of the kept components' ratios)".into(),
            legend: ("0".into(), format!("{:.0}", max_captured * 100.0), &VIRIDIS),
            paint: Box::new(move |l: &LayerReport| {
                let v = captured(l);
                let c = ramp(
                    &VIRIDIS,
                    if max_captured > 0.0 {
                        v / max_captured
                    } else {
                        0.0
                    },
                );
                if l.rank == 0 {
                    Paint {
                        fill: EMPTY.into(),
                        text: String::new(),
                        ink: "#777777",
                    }
                } else {
                    Paint {
                        fill: hex(c),
                        text: format!("{:.0}", v * 100.0),
                        ink: ink(c),
                    }
                }
            }),
        },
        Panel {
            title: "Converged at step (× = not converged)".into(),
            legend: ("1".into(), steps.to_string(), &BLUES),
            paint: Box::new(move |l: &LayerReport| match l.converged_step {
                Some(s) => {
                    let c = ramp(
                        &BLUES,
                        if steps > 1 {
                            (s as f64 - 1.0) / (steps as f64 - 1.0)
                        } else {
                            1.0
                        },
                    );
                    Paint {
                        fill: hex(c),
                        text: s.to_string(),
                        ink: ink(c),
                    }
                }
                None => Paint {
                    fill: RED.into(),
                    text: "×".into(),
                    ink: "#ffffff",
                },
            }),
        },
    ];

    // Column labels: every `stride`-th block, so that labels stay ≥ 24 px apart.
    let stride = [1, 2, 5, 10, 20, 50, 100]
        .into_iter()
        .find(|s| *s as f64 * cell >= 24.0)
        .unwrap_or(100);
    let panel_h = 18.0 + 14.0 + grid.rows.len() as f64 * ROW + 30.0;
    let top = MARGIN + 70.0;
    let height = (top + panels.len() as f64 * panel_h + 24.0).ceil();

    let mut s = String::new();
    let _ = writeln!(s, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="{FONT}">"#
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r#"<text x="{MARGIN}" y="{}" font-size="15" font-weight="bold">{}</text>"#,
        MARGIN + 12.0,
        esc(&title)
    );
    for (i, line) in [&line1, &line2, &line3].into_iter().enumerate() {
        let _ = writeln!(
            s,
            r##"<text x="{MARGIN}" y="{}" font-size="11" fill="#333333">{}</text>"##,
            MARGIN + 30.0 + 14.0 * i as f64,
            esc(line)
        );
    }

    for (p, panel) in panels.iter().enumerate() {
        let y = top + p as f64 * panel_h;
        let _ = writeln!(
            s,
            r#"<text x="{MARGIN}" y="{}" font-size="12" font-weight="bold">{}</text>"#,
            y + 12.0,
            esc(&panel.title)
        );
        let gy = y + 32.0;
        // Block numbers above the grid.
        for (i, b) in grid.columns.iter().enumerate() {
            if i % stride == 0 {
                let cx = x0 + (i as f64 + 0.5) * cell;
                let _ = writeln!(
                    s,
                    r##"<text x="{cx}" y="{}" font-size="9" fill="#555555" text-anchor="middle">{b}</text>"##,
                    gy - 4.0
                );
            }
        }
        if p == 0 && !grid.columns.is_empty() {
            let _ = writeln!(
                s,
                r##"<text x="{}" y="{}" font-size="9" fill="#555555" text-anchor="end">block</text>"##,
                x0 - 6.0,
                gy - 4.0
            );
        }
        for (r, label) in grid.rows.iter().enumerate() {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" font-size="11" text-anchor="end">{}</text>"#,
                x0 - 6.0,
                gy + r as f64 * ROW + ROW / 2.0 + 4.0,
                esc(label)
            );
        }
        for c in &grid.cells {
            let l = c.layer;
            let paint = (panel.paint)(l);
            let (cx, cy) = (x0 + c.column as f64 * cell, gy + c.row as f64 * ROW);
            let tip = format!(
                "{}: rank {}, captured {:.1}%, {}{}",
                l.name,
                l.rank,
                captured(l) * 100.0,
                l.converged_step
                    .map_or("not converged".to_string(), |s| format!(
                        "converged at step {s}"
                    )),
                if l.allocation_certain {
                    ""
                } else {
                    ", allocation not certified"
                }
            );
            let _ = write!(
                s,
                r##"<g><title>{}</title><rect x="{cx}" y="{cy}" width="{}" height="{}" fill="{}" stroke="#ffffff" stroke-width="1"/>"##,
                esc(&tip),
                cell,
                ROW,
                paint.fill
            );
            if p == 0 && l.converged_step.is_none() {
                let _ = write!(
                    s,
                    r#"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="{RED}" stroke-width="2"/>"#,
                    cx + 1.5,
                    cy + 1.5,
                    cell - 3.0,
                    ROW - 3.0
                );
            }
            if p == 0 && !l.allocation_certain {
                let _ = write!(
                    s,
                    r##"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#000000" stroke-width="1.2" stroke-dasharray="3,2"/>"##,
                    cx + 3.0,
                    cy + 3.0,
                    cell - 6.0,
                    ROW - 6.0
                );
            }
            if !paint.text.is_empty() && fits(&paint.text) {
                let _ = write!(
                    s,
                    r#"<text x="{}" y="{}" font-size="{cell_font}" fill="{}" text-anchor="middle">{}</text>"#,
                    cx + cell / 2.0,
                    cy + ROW / 2.0 + cell_font * 0.36,
                    paint.ink,
                    esc(&paint.text)
                );
            }
            let _ = writeln!(s, "</g>");
        }
        // Legend: the color ramp with its ends.
        let ly = gy + grid.rows.len() as f64 * ROW + 10.0;
        let (lo, hi, stops) = &panel.legend;
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" font-size="9" fill="#555555" text-anchor="end">{}</text>"##,
            x0 - 4.0,
            ly + 8.0,
            esc(lo)
        );
        for k in 0..32 {
            let c = ramp(stops, k as f64 / 31.0);
            let _ = write!(
                s,
                r#"<rect x="{}" y="{ly}" width="5" height="9" fill="{}"/>"#,
                x0 + k as f64 * 5.0,
                hex(c)
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" font-size="9" fill="#555555">{}</text>"##,
            x0 + 164.0,
            ly + 8.0,
            esc(hi)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{MARGIN}" y="{}" font-size="10" fill="#555555">{}</text>"##,
        height - 10.0,
        esc(foot)
    );
    let _ = writeln!(s, "</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramps_reach_their_ends_and_text_is_escaped() {
        assert_eq!(ramp(&VIRIDIS, 0.0), VIRIDIS[0]);
        assert_eq!(ramp(&VIRIDIS, 1.0), VIRIDIS[9]);
        assert_eq!(ramp(&VIRIDIS, f64::NAN), VIRIDIS[0]);
        assert_eq!(esc("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&apos;");
        assert_eq!(ink(VIRIDIS[0]), "#ffffff");
        assert_eq!(ink(VIRIDIS[9]), "#000000");
    }
}
