//! The status of a process against its own fd limit.
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// When a process counts as heading for EMFILE.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    pub warn_pct: f64,
    pub crit_pct: f64,
    pub warn_within: Duration,
    pub crit_within: Duration,
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    // Failing on `ok` would fail every run.
    #[value(skip)]
    Ok,
    Warning,
    Critical,
    Exhausted,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warning => "warning",
            Status::Critical => "critical",
            Status::Exhausted => "exhausted",
        }
    }
}

/// `open` fds against `soft` limit, `secs` the forecast time to EMFILE,
/// `failed` whether an EMFILE/ENFILE failure was seen.
pub fn status(
    open: u64,
    soft: Option<u64>,
    secs: Option<f64>,
    failed: bool,
    th: &Thresholds,
) -> Status {
    if failed {
        return Status::Exhausted;
    }
    let pct = soft
        .filter(|&l| l > 0)
        .map(|l| open as f64 * 100.0 / l as f64)
        .unwrap_or(0.0);
    let within = |d: Duration| secs.is_some_and(|s| s <= d.as_secs_f64());
    if pct >= th.crit_pct || within(th.crit_within) {
        Status::Critical
    } else if pct >= th.warn_pct || within(th.warn_within) {
        Status::Warning
    } else {
        Status::Ok
    }
}

/// `open` as a percentage of `soft`, one decimal.
pub fn pct_used(open: u64, soft: Option<u64>) -> Option<f64> {
    soft.filter(|&l| l > 0)
        .map(|l| (open as f64 * 100.0 / l as f64 * 10.0).round() / 10.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TH: Thresholds = Thresholds {
        warn_pct: 80.0,
        crit_pct: 90.0,
        warn_within: Duration::from_secs(3600),
        crit_within: Duration::from_secs(300),
    };

    #[test]
    fn ok_below_every_threshold() {
        assert_eq!(status(10, Some(1024), None, false, &TH), Status::Ok);
        assert_eq!(status(10, Some(1024), Some(3601.0), false, &TH), Status::Ok);
    }

    #[test]
    fn warning_at_warn_pct() {
        assert_eq!(status(819, Some(1024), None, false, &TH), Status::Ok);
        assert_eq!(status(820, Some(1000), None, false, &TH), Status::Warning);
        assert_eq!(status(830, Some(1024), None, false, &TH), Status::Warning);
    }

    #[test]
    fn critical_at_crit_pct() {
        assert_eq!(status(900, Some(1000), None, false, &TH), Status::Critical);
        assert_eq!(status(930, Some(1024), None, false, &TH), Status::Critical);
    }

    #[test]
    fn warning_within_warn_within() {
        assert_eq!(
            status(10, Some(1024), Some(3600.0), false, &TH),
            Status::Warning
        );
        assert_eq!(
            status(10, Some(1024), Some(1000.0), false, &TH),
            Status::Warning
        );
    }

    #[test]
    fn critical_within_crit_within() {
        assert_eq!(
            status(10, Some(1024), Some(300.0), false, &TH),
            Status::Critical
        );
        assert_eq!(
            status(10, Some(1024), Some(0.0), false, &TH),
            Status::Critical
        );
    }

    #[test]
    fn exhausted_after_a_failure_whatever_the_figures() {
        assert_eq!(status(10, Some(1024), None, true, &TH), Status::Exhausted);
        assert_eq!(status(0, None, None, true, &TH), Status::Exhausted);
    }

    #[test]
    fn no_limit_counts_as_no_pressure() {
        assert_eq!(status(1_000_000, None, None, false, &TH), Status::Ok);
        assert_eq!(status(10, Some(0), None, false, &TH), Status::Ok);
        assert_eq!(pct_used(10, None), None);
        assert_eq!(pct_used(10, Some(0)), None);
    }

    #[test]
    fn pct_used_has_one_decimal() {
        assert_eq!(pct_used(57, Some(1024)), Some(5.6));
        assert_eq!(pct_used(1024, Some(1024)), Some(100.0));
    }

    #[test]
    fn statuses_order_by_severity() {
        assert!(Status::Ok < Status::Warning);
        assert!(Status::Warning < Status::Critical);
        assert!(Status::Critical < Status::Exhausted);
    }
}
