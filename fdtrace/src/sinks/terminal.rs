//! The readable table on a terminal, rendered from the same data as NDJSON.
use std::{
    collections::{BTreeMap, HashMap},
    io::{self, Write},
};

use fdtrace_common::{FD_KINDS, FdKind};

use super::Sink;
use crate::analysis::{
    Ending, Errno, Finding, GROWING_RATE, Loss, Notice, ProcessFigures, PythonFrames, Report,
    Resync, SiteReport, Start, Summary, display_rate,
    short_lived::{self, CommandGroup},
};
use crate::escape::terminal as safe;

pub struct Terminal<W: Write> {
    out: io::BufWriter<W>,
    /// Fork and exec lines of forked processes not in a report yet: printed
    /// with their first report, dropped if they exit before it, so that a
    /// fork storm (a shell loop, a build) does not flood the terminal.
    pending: HashMap<u32, Vec<String>>,
    /// Forked processes that exited before their first report since the
    /// last report, by command: a line each at the next report.
    short_lived: BTreeMap<String, CommandGroup>,
}

impl<W: Write> Terminal<W> {
    pub fn new(w: W) -> Self {
        Terminal {
            out: io::BufWriter::new(w),
            pending: HashMap::new(),
            short_lived: BTreeMap::new(),
        }
    }

    /// Lines of forked processes that exited before a report, one per
    /// command.
    fn short_lived(&mut self, ts: f64) -> io::Result<()> {
        for g in std::mem::take(&mut self.short_lived).into_values() {
            writeln!(
                self.out,
                "{:<8} {:>7} {} exited before a report (opened {}, closed {} fds)",
                clock(ts),
                format!("{}x", g.processes),
                safe(&g.comm),
                g.opened,
                g.closed
            )?;
        }
        Ok(())
    }

    fn header(&mut self) -> io::Result<()> {
        writeln!(
            self.out,
            "\n{:<8} {:>7} {:<15} {:>15} {:>6} {:>8} {:>8} {:>7} {:>8} {:<9} {:>6} {:>5}  BY KIND",
            "TIME",
            "PID",
            "COMM",
            "FDS/LIMIT",
            "USED",
            "OPEN/s",
            "CLOSE/s",
            "LEAK/s",
            "EMFILE IN",
            "STATUS",
            "EMFILE",
            "DRIFT"
        )
    }

    fn process(&mut self, ts: f64, r: &ProcessFigures) -> io::Result<()> {
        let limit = r.soft_limit.map_or("-".into(), |l| l.to_string());
        let used = r.pct_used.map_or("-".into(), |p| format!("{p:.1}%"));
        let drift = r.drift.map_or("?".into(), |d| d.to_string());
        writeln!(
            self.out,
            "{:<8} {:>7} {:<15} {:>15} {:>6} {:>8.1} {:>8.1} {:>+7.1} {:>9} {:<9} {:>6} {:>5}  {}",
            clock(ts),
            r.pid,
            safe(&r.comm),
            format!("{}/{}", r.open_fds, limit),
            used,
            display_rate(r.opened_per_s),
            display_rate(r.closed_per_s),
            display_rate(r.leak_per_s),
            eta(r.seconds_to_emfile),
            r.status.name(),
            r.emfile + r.enfile,
            drift,
            kinds_text(&r.by_kind)
        )
    }

    /// The growing sites only.
    fn site(&mut self, s: &SiteReport) -> io::Result<()> {
        if s.leak_per_s < GROWING_RATE {
            return Ok(());
        }
        let at = match &s.python {
            Some(py) => python_at(py).map_or(String::new(), |f| format!("  at {}", safe(&f))),
            None => s
                .stack
                .first()
                .map_or(String::new(), |f| format!("  at {}", safe(f))),
        };
        writeln!(
            self.out,
            "{:>17} {:+.1} fds/s  {} {}  ({} open, oldest {:.0}s){at}",
            "site",
            display_rate(s.leak_per_s),
            s.kind.name(),
            safe(&s.resource),
            s.open_fds,
            s.oldest_age_s
        )
    }

    fn finding(&mut self, ts: f64, pid: u32, f: &Finding) -> io::Result<()> {
        writeln!(
            self.out,
            "{:<8} {pid:>7} FINDING {}: {}",
            clock(ts),
            f.kind.name(),
            safe(&f.message)
        )?;
        writeln!(self.out, "{:>17} fix: {}", "", f.recommendation)
    }

    fn resync(&mut self, ts: f64, pid: u32, r: Resync) -> io::Result<()> {
        let why = match r {
            Resync::Drift(d) => format!("drift {d:+} against /proc/{pid}/fd"),
            Resync::Inexact => "a change the kernel side could not follow exactly".into(),
        };
        writeln!(self.out, "{:<8} {pid:>7} {why}; resynced", clock(ts))
    }

    fn loss(&mut self, ts: f64, l: &Loss) -> io::Result<()> {
        writeln!(self.out, "{:<8} {}", clock(ts), loss_warning(l))
    }
}

/// The warning line of a loss (the terminal's, and stderr's under --quiet).
pub fn loss_warning(l: &Loss) -> String {
    let (map, count, max_entries, flag) = match *l {
        Loss::RingBuffer { count } => {
            return format!(
                "warning: {count} events lost (ring buffer full); counts stay exact, fork/exec/exit notices may be missing"
            );
        }
        Loss::FdsMapFull { count, max_entries } => ("fds", count, max_entries, "--max-fds"),
        Loss::ProcsMapFull { count, max_entries } => ("procs", count, max_entries, "--max-procs"),
    };
    format!(
        "warning: the {map} map is full ({max_entries} entries): {count} not tracked; raise {flag}"
    )
}

impl<W: Write> Sink for Terminal<W> {
    /// What was asked is on the command line already.
    fn start(&mut self, _: &Start) -> io::Result<()> {
        Ok(())
    }

    fn notice(&mut self, n: &Notice) -> io::Result<()> {
        match n {
            Notice::Fork { ts, pid, ppid } => {
                let line = format!("{:<8} {pid:>7} forked from {ppid} (now traced)", clock(*ts));
                self.pending.insert(*pid, vec![line]);
                Ok(())
            }
            Notice::Exec { ts, pid, comm } => {
                let line = format!("{:<8} {pid:>7} exec {}", clock(*ts), safe(comm));
                match self.pending.get_mut(pid) {
                    Some(lines) => {
                        lines.push(line);
                        Ok(())
                    }
                    None => writeln!(self.out, "{line}"),
                }
            }
            Notice::Exit {
                pid,
                comm,
                totals: t,
                ending: Ending::Exited,
                ..
            } if self.pending.remove(pid).is_some() => {
                let g = self
                    .short_lived
                    .entry(comm.clone())
                    .or_insert_with(|| CommandGroup {
                        comm: comm.clone(),
                        ..CommandGroup::default()
                    });
                g.processes += 1;
                g.opened += t.opened;
                g.closed += t.closed;
                Ok(())
            }
            Notice::Exit {
                ts,
                pid,
                comm,
                totals: t,
                ending,
            } => writeln!(
                self.out,
                "{:<8} {pid:>7} {} {} holding {} fds (opened {}, closed {} while traced)",
                clock(*ts),
                safe(comm),
                ending_text(Some(*ending)),
                t.open_fds,
                t.opened,
                t.closed
            ),
            Notice::FdError {
                ts,
                pid,
                syscall,
                errno,
                resource,
                stack,
                ..
            } => {
                let why = match errno {
                    Errno::Emfile => "the process is at its RLIMIT_NOFILE",
                    Errno::Enfile => "the system-wide fs.file-max is reached",
                };
                let what = resource
                    .as_ref()
                    .map_or(String::new(), |r| format!(" ({})", safe(r)));
                let at = stack
                    .first()
                    .map_or(String::new(), |f| format!(" at {}", safe(f)));
                writeln!(
                    self.out,
                    "{:<8} {pid:>7} {syscall}{what} failed with {}{at}: {why}",
                    clock(*ts),
                    errno.name()
                )
            }
            Notice::Rlimit {
                ts,
                pid,
                soft_limit,
                hard_limit,
            } => {
                let show = |l: &Option<u64>| l.map_or("unlimited".to_string(), |v| v.to_string());
                writeln!(
                    self.out,
                    "{:<8} {pid:>7} RLIMIT_NOFILE now {} (hard {})",
                    clock(*ts),
                    show(soft_limit),
                    show(hard_limit)
                )
            }
            Notice::Finding { ts, pid, finding } => self.finding(*ts, *pid, finding),
            Notice::Python { ts, pid, message } => {
                writeln!(self.out, "{:<8} {pid:>7} note: {message}", clock(*ts))
            }
        }
    }

    fn report(&mut self, r: &Report) -> io::Result<()> {
        for l in &r.losses {
            self.loss(r.ts, l)?;
        }
        self.short_lived(r.ts)?;
        for p in &r.processes {
            for line in self.pending.remove(&p.figures.pid).unwrap_or_default() {
                writeln!(self.out, "{line}")?;
            }
        }
        if !r.processes.is_empty() {
            self.header()?;
        }
        for p in &r.processes {
            self.process(r.ts, &p.figures)?;
            for s in &p.sites {
                self.site(s)?;
            }
            for f in &p.findings {
                self.finding(r.ts, p.figures.pid, f)?;
            }
            if let Some(rs) = p.resync {
                self.resync(r.ts, p.figures.pid, rs)?;
            }
        }
        self.out.flush()
    }

    fn summary(&mut self, s: &Summary) -> io::Result<()> {
        self.short_lived.clear();
        if s.processes.is_empty() {
            return self.out.flush();
        }
        let groups = short_lived::group(&s.processes);
        writeln!(
            self.out,
            "\nSummary ({:.1}s traced, ended by {}):",
            s.duration_s,
            s.ended.text()
        )?;
        writeln!(
            self.out,
            "{:>7} {:<15} {:>8} {:>8} {:>8} {:>8} {:>7} {:>9} {:<9} {:>6}  STATE",
            "PID",
            "COMM",
            "OPEN",
            "OPENED",
            "CLOSED",
            "NET",
            "LEAK/s",
            "EMFILE IN",
            "STATUS",
            "EMFILE"
        )?;
        for p in &groups.reported {
            let t = &p.totals;
            writeln!(
                self.out,
                "{:>7} {:<15} {:>8} {:>8} {:>8} {:>+8} {:>+7.1} {:>9} {:<9} {:>6}  {}",
                p.pid,
                safe(&p.comm),
                t.open_fds,
                t.opened,
                t.closed,
                t.opened as i64 - t.closed as i64,
                display_rate(p.leak_per_s),
                eta(p.seconds_to_emfile),
                p.status.name(),
                p.emfile + p.enfile,
                if p.exited {
                    ending_text(p.ending)
                } else {
                    "running".into()
                }
            )?;
        }
        for g in &groups.commands {
            writeln!(
                self.out,
                "{:>7} {:<15} {:>8} {:>8} {:>8} {:>+8}  exited before a report",
                format!("{}x", g.processes),
                safe(&g.comm),
                0,
                g.opened,
                g.closed,
                g.opened as i64 - g.closed as i64,
            )?;
        }
        for g in &s.folded {
            writeln!(
                self.out,
                "{:>7} {:<15} {:>8} {:>8} {:>8} {:>+8} {:>7} {:>9} {:<9} {:>6}  exited earlier, totalled",
                format!("{}x", g.processes),
                g.comm.as_deref().map_or("(other)".into(), safe),
                0,
                g.opened,
                g.closed,
                g.opened as i64 - g.closed as i64,
                "",
                "",
                g.status.name(),
                g.emfile + g.enfile,
            )?;
        }
        for p in groups
            .reported
            .iter()
            .filter(|p| !p.sites.is_empty() || !p.findings.is_empty())
        {
            writeln!(
                self.out,
                "\n{} ({}): {}",
                p.pid,
                safe(&p.comm),
                p.status.name()
            )?;
            for site in &p.sites {
                writeln!(
                    self.out,
                    "  {:+.1} fds/s  {} {}: {} open, oldest {:.0}s",
                    display_rate(site.leak_per_s),
                    site.kind.name(),
                    safe(&site.resource),
                    site.open_fds,
                    site.oldest_age_s
                )?;
                if let Some(py) = &site.python {
                    if let Some(at) = python_at(py) {
                        writeln!(self.out, "    at {at}")?;
                    }
                    for frame in py.stack.iter().take(8) {
                        writeln!(self.out, "      {frame}")?;
                    }
                }
                for frame in site.stack.iter().take(8) {
                    writeln!(self.out, "      {}", safe(frame))?;
                }
            }
            for f in &p.findings {
                writeln!(
                    self.out,
                    "  {}: {} (first seen {})",
                    f.kind.name(),
                    safe(&f.message),
                    clock(f.first_seen_ts)
                )?;
                writeln!(self.out, "    fix: {}", f.recommendation)?;
            }
        }
        if !groups.findings.is_empty() {
            writeln!(self.out, "\nProcesses that exited before a report:")?;
        }
        for shared in &groups.findings {
            let f = shared.finding;
            writeln!(
                self.out,
                "  {} in {} process{}: {} (first seen {})",
                f.kind.name(),
                shared.processes,
                if shared.processes == 1 { "" } else { "es" },
                safe(&f.message),
                clock(f.first_seen_ts)
            )?;
            writeln!(self.out, "    fix: {}", f.recommendation)?;
        }
        self.out.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// "exited", "exited with code 7", "killed by signal 9", "zombie".
fn ending_text(e: Option<Ending>) -> String {
    match e {
        Some(Ending::Code(c)) => format!("exited with code {c}"),
        Some(Ending::Signal(s)) => format!("killed by signal {s}"),
        Some(Ending::Zombie) => "zombie (exited, not reaped)".into(),
        Some(Ending::LeftSelection) => "left the selected cgroups (no longer traced)".into(),
        Some(Ending::Exited) | None => "exited".into(),
    }
}

/// "3h12m", "45s": how long until EMFILE.
/// Where a Python site is in the user's code: "fetch_data_wrong
/// (/srv/agent.py:12) via httpx AsyncClient.get"; its innermost frame when
/// no frame is the user's.
pub(super) fn python_at(py: &PythonFrames) -> Option<String> {
    match (&py.user_frame, &py.via) {
        (Some(f), Some(via)) => Some(format!("{f} via {via}")),
        (Some(f), None) => Some(f.clone()),
        (None, _) => py.stack.first().cloned(),
    }
}

pub(super) fn eta(secs: Option<f64>) -> String {
    match secs {
        None => "-".into(),
        Some(s) if s >= 86_400.0 * 99.0 => ">99d".into(),
        Some(s) => {
            let s = s.max(0.0) as u64;
            match s {
                0..60 => format!("{s}s"),
                60..3600 => format!("{}m{:02}s", s / 60, s % 60),
                3600..86_400 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
                _ => format!("{}d{:02}h", s / 86_400, s / 3600 % 24),
            }
        }
    }
}

/// HH:MM:SS (UTC) of a unix time.
pub(super) fn clock(ts: f64) -> String {
    let s = ts as u64 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// "socket:40 file:12": open fds per kind, most first.
fn kinds_text(by_kind: &[u64; FD_KINDS]) -> String {
    let mut parts: Vec<(u64, &str)> = FdKind::ALL
        .iter()
        .zip(by_kind)
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| (*n, k.name()))
        .collect();
    parts.sort_by_key(|p| std::cmp::Reverse(p.0));
    parts
        .iter()
        .map(|(n, k)| format!("{k}:{n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_in_the_largest_useful_unit() {
        assert_eq!(eta(None), "-");
        assert_eq!(eta(Some(45.4)), "45s");
        assert_eq!(eta(Some(106.0)), "1m46s");
        assert_eq!(eta(Some(3.0 * 3600.0 + 12.0 * 60.0)), "3h12m");
        assert_eq!(eta(Some(2.0 * 86_400.0 + 5.0 * 3600.0)), "2d05h");
        assert_eq!(eta(Some(100.0 * 86_400.0)), ">99d");
        assert_eq!(eta(Some(-3.0)), "0s");
    }

    #[test]
    fn clock_is_utc_time_of_day() {
        assert_eq!(clock(1_767_225_600.5), "00:00:00");
        assert_eq!(clock(1_767_225_600.0 + 3723.0), "01:02:03");
    }

    #[test]
    fn kinds_most_first() {
        let mut k = [0u64; FD_KINDS];
        k[FdKind::File as usize] = 4;
        k[FdKind::Socket as usize] = 169;
        k[FdKind::Pipe as usize] = 1;
        assert_eq!(kinds_text(&k), "socket:169 file:4 pipe:1");
        assert_eq!(kinds_text(&[0; FD_KINDS]), "");
    }

    #[test]
    fn a_flat_rate_prints_without_sign_noise() {
        let mut out = Vec::new();
        {
            let mut t = Terminal::new(&mut out);
            let s = SiteReport {
                id: "x".into(),
                kind: FdKind::File,
                resource: "/tmp/a".into(),
                stack: Default::default(),
                python: None,
                open_fds: 3,
                leak_per_s: 2.0,
                oldest_age_s: 4.2,
            };
            t.site(&s).unwrap();
            t.site(&SiteReport {
                leak_per_s: 0.01,
                ..s
            })
            .unwrap();
            t.out.flush().unwrap();
        }
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("+2.0 fds/s  file /tmp/a  (3 open, oldest 4s)"));
    }

    #[test]
    fn a_python_site_shows_the_user_frame_and_the_library_call() {
        let py = |user: Option<&str>, via: Option<&str>| PythonFrames {
            stack: vec!["socket.__init__ (/usr/lib/python3.12/socket.py:232)".into()],
            user_frame: user.map(str::to_owned),
            via: via.map(str::to_owned),
        };
        assert_eq!(
            python_at(&py(
                Some("fetch_data_wrong (/srv/agent.py:12)"),
                Some("httpx AsyncClient.get")
            ))
            .as_deref(),
            Some("fetch_data_wrong (/srv/agent.py:12) via httpx AsyncClient.get")
        );
        assert_eq!(
            python_at(&py(Some("f (/srv/a.py:1)"), None)).as_deref(),
            Some("f (/srv/a.py:1)")
        );
        // No frame of the user's: the innermost one.
        assert_eq!(
            python_at(&py(None, None)).as_deref(),
            Some("socket.__init__ (/usr/lib/python3.12/socket.py:232)")
        );
    }
}
