//! `--json`: one object per line, each a [`Record`].
use std::io::{self, Write};

use super::{
    Sink,
    records::{Record, StartRecord, SummaryRecord},
};
use crate::analysis::{Notice, Report, Start, Summary};

pub struct Ndjson<W: Write> {
    out: io::BufWriter<W>,
}

impl<W: Write> Ndjson<W> {
    pub fn new(w: W) -> Self {
        Ndjson {
            // A node's report is hundreds of KB: written a pipe's worth at
            // a time, not in 8 KB writes.
            out: io::BufWriter::with_capacity(64 * 1024, w),
        }
    }

    fn line(&mut self, r: &Record) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, r)?;
        self.out.write_all(b"\n")
    }
}

impl<W: Write> Sink for Ndjson<W> {
    fn start(&mut self, start: &Start) -> io::Result<()> {
        self.line(&Record::Start(StartRecord::from(start)))?;
        self.out.flush()
    }

    fn notice(&mut self, notice: &Notice) -> io::Result<()> {
        self.line(&Record::from(notice))
    }

    fn report(&mut self, report: &Report) -> io::Result<()> {
        Record::of_report(report, |r| self.line(&r))?;
        self.out.flush()
    }

    fn summary(&mut self, summary: &Summary) -> io::Result<()> {
        self.line(&Record::Summary(SummaryRecord::from(summary)))?;
        self.out.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
