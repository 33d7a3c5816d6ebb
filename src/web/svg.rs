//! Charts drawn on the server as SVG: the geometry is computed here and the template writes
//! the elements (so every label goes through the template engine's escaping).

use serde::Serialize;

/// The drawing area of a bar chart, in SVG user units (scaled to the page width by CSS).
pub const WIDTH: f64 = 600.0;
pub const HEIGHT: f64 = 160.0;

/// One bar, ready to draw.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Bar {
    pub x: f64,
    pub y: f64,
    pub width: f64,
    pub height: f64,
    /// The bar's key (a day), shown as its tooltip and under the first and last bar.
    pub label: String,
    /// The value as text (credits, exact).
    pub value: String,
}

/// Bars for `(label, value, value text)` points, the tallest at full height; a zero value
/// still gets a 1-unit sliver so the day is visible.
pub fn bars(points: &[(String, f64, String)]) -> Vec<Bar> {
    if points.is_empty() {
        return Vec::new();
    }
    let max = points.iter().map(|p| p.1).fold(0.0_f64, f64::max);
    let slot = WIDTH / points.len() as f64;
    let width = (slot * 0.8).max(1.0);
    points
        .iter()
        .enumerate()
        .map(|(i, (label, value, text))| {
            let h = if max > 0.0 {
                (value.max(0.0) / max * (HEIGHT - 10.0)).max(1.0)
            } else {
                1.0
            };
            Bar {
                x: round(i as f64 * slot + (slot - width) / 2.0),
                y: round(HEIGHT - h),
                width: round(width),
                height: round(h),
                label: label.clone(),
                value: text.clone(),
            }
        })
        .collect()
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallest_bar_fills_the_chart() {
        let b = bars(&[
            ("d1".into(), 1.0, "1".into()),
            ("d2".into(), 4.0, "4".into()),
            ("d3".into(), 0.0, "0".into()),
        ]);
        assert_eq!(b.len(), 3);
        assert_eq!(b[1].height, HEIGHT - 10.0);
        assert_eq!(b[1].y, 10.0);
        assert_eq!(b[2].height, 1.0);
        assert!(b[0].x < b[1].x && b[1].x < b[2].x);
        assert!(bars(&[]).is_empty());
    }
}
