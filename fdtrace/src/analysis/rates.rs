//! Rates and the forecast: least-squares slopes over a sliding window of
//! samples, and the time left until EMFILE at that rate.
use std::{collections::VecDeque, time::Duration};

/// Slopes smaller than this in magnitude (one fd in about 17 minutes) are
/// rounding noise of the fit over a flat series: reported as 0, so an idle
/// process gets no forecast.
pub const MIN_RATE: f64 = 0.001;

/// (seconds since fdtrace started, value) samples within a sliding window.
#[derive(Clone, Debug)]
pub struct Series {
    samples: VecDeque<(f64, f64)>,
    window: f64,
}

impl Series {
    pub fn new(window: Duration) -> Self {
        Series {
            samples: VecDeque::new(),
            window: window.as_secs_f64(),
        }
    }

    /// Adds a sample and drops those older than the window before it.
    pub fn push(&mut self, t: f64, y: f64) {
        self.samples.push_back((t, y));
        while self
            .samples
            .front()
            .is_some_and(|&(t0, _)| t0 < t - self.window)
        {
            self.samples.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Some sample in the window is above 0.
    pub fn any_positive(&self) -> bool {
        self.samples.iter().any(|&(_, y)| y > 0.0)
    }

    /// Least-squares slope, per second; 0 below [`MIN_RATE`].
    pub fn slope(&self) -> f64 {
        let s = slope(self.samples.iter().copied());
        if s.abs() < MIN_RATE { 0.0 } else { s }
    }
}

/// Least-squares slope of (t, y) points: 0 for fewer than two points or a
/// single instant.
pub fn slope(points: impl Iterator<Item = (f64, f64)> + Clone) -> f64 {
    let n = points.clone().count() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mt, my) = points
        .clone()
        .fold((0.0, 0.0), |(a, b), (t, y)| (a + t / n, b + y / n));
    let (mut num, mut den) = (0.0, 0.0);
    for (t, y) in points {
        num += (t - mt) * (y - my);
        den += (t - mt) * (t - mt);
    }
    if den == 0.0 { 0.0 } else { num / den }
}

/// Seconds until `open` reaches `soft_limit` at `rate` fds/s; None when the
/// count is not growing or there is no limit.
pub fn seconds_to_emfile(soft_limit: Option<u64>, open: u64, rate: f64) -> Option<f64> {
    match soft_limit {
        Some(l) if rate >= MIN_RATE => Some(l.saturating_sub(open) as f64 / rate),
        _ => None,
    }
}

/// A rate as printed: one decimal, and never "-0.0".
pub fn display_rate(x: f64) -> f64 {
    // -0.0 + 0.0 is +0.0 in IEEE 754.
    (x * 10.0).round() / 10.0 + 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(window_s: u64, points: &[(f64, f64)]) -> Series {
        let mut s = Series::new(Duration::from_secs(window_s));
        for &(t, y) in points {
            s.push(t, y);
        }
        s
    }

    #[test]
    fn slope_of_a_line() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 5.0 + 2.0 * i as f64)).collect();
        assert!((series(60, &pts).slope() - 2.0).abs() < 1e-9);
    }

    #[test]
    fn slope_of_a_falling_line_is_negative() {
        let pts: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, 50.0 - 3.0 * i as f64)).collect();
        assert!((series(60, &pts).slope() + 3.0).abs() < 1e-9);
    }

    #[test]
    fn slope_of_noise_around_a_level_is_small() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, [3.0, 5.0][i % 2])).collect();
        assert!(series(60, &pts).slope().abs() < 0.25);
    }

    #[test]
    fn slope_needs_two_instants() {
        assert_eq!(series(60, &[(1.0, 4.0)]).slope(), 0.0);
        assert_eq!(series(60, &[]).slope(), 0.0);
        assert_eq!(slope([(2.0, 1.0), (2.0, 9.0)].into_iter()), 0.0);
    }

    #[test]
    fn window_drops_old_samples() {
        // Growth that stopped 20 s ago is out of a 10 s window.
        let mut pts: Vec<(f64, f64)> = (0..20).map(|i| (i as f64, i as f64)).collect();
        pts.extend((20..40).map(|i| (i as f64, 20.0)));
        let s = series(10, &pts);
        assert_eq!(s.len(), 11);
        assert_eq!(s.slope(), 0.0);
        assert!(series(100, &pts).slope() > 0.3);
    }

    #[test]
    fn window_keeps_the_sample_at_its_edge() {
        let s = series(2, &[(0.0, 1.0), (1.0, 1.0), (2.0, 1.0)]);
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn rounding_noise_is_no_rate() {
        // A flat series whose fit leaves a slope of 1e-5 fds/s.
        let pts: Vec<(f64, f64)> = (0..60)
            .map(|i| (i as f64, 100.0 + 1e-5 * i as f64))
            .collect();
        let s = series(60, &pts);
        assert_eq!(s.slope(), 0.0);
        assert_eq!(seconds_to_emfile(Some(1024), 100, s.slope()), None);
    }

    #[test]
    fn forecast_at_a_growing_rate() {
        assert_eq!(seconds_to_emfile(Some(1024), 24, 10.0), Some(100.0));
        assert_eq!(seconds_to_emfile(Some(1024), 2000, 10.0), Some(0.0));
    }

    #[test]
    fn no_forecast_without_growth_or_limit() {
        assert_eq!(seconds_to_emfile(Some(1024), 24, 0.0), None);
        assert_eq!(seconds_to_emfile(Some(1024), 24, -2.0), None);
        assert_eq!(seconds_to_emfile(Some(1024), 24, 0.0009), None);
        assert_eq!(seconds_to_emfile(None, 24, 5.0), None);
    }

    #[test]
    fn displayed_rates_have_no_negative_zero() {
        assert_eq!(display_rate(-0.04).to_string(), "0");
        assert_eq!(format!("{:+.1}", display_rate(-0.04)), "+0.0");
        assert_eq!(display_rate(2.96), 3.0);
        assert_eq!(display_rate(-1.26), -1.3);
    }
}
