//! `--quiet`: no view and no NDJSON, but what went wrong still goes to
//! stderr, one line each, so that a daemon's log (`kubectl logs`) shows it:
//! the events and fds the kernel side lost, and calls that failed with
//! EMFILE or ENFILE.
use std::io::{self, Write};

use super::{Sink, terminal::loss_warning};
use crate::analysis::{Notice, Report, Start, Summary};

pub struct Warnings<W: Write> {
    out: W,
}

impl<W: Write> Warnings<W> {
    pub fn new(out: W) -> Self {
        Warnings { out }
    }
}

impl<W: Write> Sink for Warnings<W> {
    fn start(&mut self, _: &Start) -> io::Result<()> {
        Ok(())
    }

    fn notice(&mut self, notice: &Notice) -> io::Result<()> {
        match notice {
            Notice::FdError {
                pid,
                syscall,
                errno,
                resource,
                ..
            } => {
                let errno = match errno {
                    crate::analysis::Errno::Emfile => "EMFILE (its fd limit)",
                    crate::analysis::Errno::Enfile => "ENFILE (the system's fd limit)",
                };
                let on = resource.as_deref().map_or(String::new(), |r| {
                    format!(" on {}", crate::escape::terminal(r))
                });
                writeln!(
                    self.out,
                    "fdtrace: warning: pid {pid}: {syscall}{on} failed with {errno}"
                )
            }
            _ => Ok(()),
        }
    }

    fn report(&mut self, report: &Report) -> io::Result<()> {
        for l in &report.losses {
            writeln!(self.out, "fdtrace: {}", loss_warning(l))?;
        }
        Ok(())
    }

    fn summary(&mut self, _: &Summary) -> io::Result<()> {
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{Errno, Loss};

    #[test]
    fn losses_and_fd_errors_one_line_each_escaped() {
        let mut w = Warnings::new(Vec::new());
        w.report(&Report {
            losses: vec![
                Loss::RingBuffer { count: 7 },
                Loss::ProcsMapFull {
                    count: 2,
                    max_entries: 16,
                },
            ],
            ..Default::default()
        })
        .unwrap();
        w.notice(&Notice::FdError {
            ts: 1.0,
            pid: 42,
            tid: 42,
            syscall: "openat",
            errno: Errno::Emfile,
            resource: Some("/tmp/a\nb\x1b[2J".into()),
            stack: Default::default(),
        })
        .unwrap();
        w.notice(&Notice::Exec {
            ts: 1.0,
            pid: 42,
            comm: "x".into(),
        })
        .unwrap();
        let text = String::from_utf8(w.out).unwrap();
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "fdtrace: warning: 7 events lost (ring buffer full); counts stay exact, fork/exec/exit notices may be missing",
                "fdtrace: warning: the procs map is full (16 entries): 2 not tracked; raise --max-procs",
                "fdtrace: warning: pid 42: openat on /tmp/a\\nb\\x1b[2J failed with EMFILE (its fd limit)",
            ]
        );
    }
}
