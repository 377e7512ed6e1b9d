//! Phase 5: where reports go. Every sink is fed the same data: [`Start`]
//! once, a [`Notice`] per event, a [`Report`] per interval, [`Summary`] at
//! the end. A new sink is a new module here implementing [`Sink`].
mod metrics;
mod ndjson;
pub mod records;
mod terminal;
mod top;
mod warnings;

use std::io;

pub use metrics::{Bounds as MetricsBounds, Metrics};
pub use ndjson::Ndjson;
pub use terminal::Terminal;
pub use top::{Console, Top};
pub use warnings::Warnings;

use crate::analysis::{Notice, Report, Start, Summary};

pub trait Sink {
    fn start(&mut self, start: &Start) -> io::Result<()>;
    fn notice(&mut self, notice: &Notice) -> io::Result<()>;
    fn report(&mut self, report: &Report) -> io::Result<()>;
    fn summary(&mut self, summary: &Summary) -> io::Result<()>;
    /// What was written reaches the reader.
    fn flush(&mut self) -> io::Result<()>;
}

/// Every sink of the session, fed in turn.
pub struct Sinks(pub Vec<Box<dyn Sink>>);

impl Sinks {
    pub fn start(&mut self, start: &Start) -> io::Result<()> {
        self.0.iter_mut().try_for_each(|s| s.start(start))
    }

    pub fn notice(&mut self, notice: &Notice) -> io::Result<()> {
        self.0.iter_mut().try_for_each(|s| s.notice(notice))
    }

    pub fn report(&mut self, report: &Report) -> io::Result<()> {
        self.0.iter_mut().try_for_each(|s| s.report(report))
    }

    pub fn summary(&mut self, summary: &Summary) -> io::Result<()> {
        self.0.iter_mut().try_for_each(|s| s.summary(summary))
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.0.iter_mut().try_for_each(|s| s.flush())
    }
}

/// Unix time now, to the millisecond.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0)
        .unwrap_or(0.0)
}
