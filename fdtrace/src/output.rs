//! What fdtrace prints: a readable table on a terminal, NDJSON with --json.
use std::{
    io::{self, Write as _},
    time::SystemTime,
};

use fdtrace_common::{FD_KINDS, FdKind};
use serde_json::{Map, Value, json};

use crate::leaks::{Finding, Status};

/// One process at one report.
pub struct ProcessRow<'a> {
    pub pid: u32,
    pub ppid: Option<u32>,
    pub comm: &'a str,
    pub open_fds: u64,
    pub soft_limit: Option<u64>,
    pub hard_limit: Option<u64>,
    pub by_kind: &'a [u64; FD_KINDS],
    pub opened: u64,
    pub closed: u64,
    pub opened_per_s: f64,
    pub closed_per_s: f64,
    pub emfile: u64,
    pub enfile: u64,
    pub drift: Option<i64>,
    pub status: Status,
    pub leak_per_s: f64,
    pub seconds_to_emfile: Option<f64>,
    /// Fds created over the --stack-rate budget (no call-site stack).
    pub stacks_not_sampled: u64,
    /// Shares its fd table with another process (clone CLONE_FILES without
    /// CLONE_THREAD): its counts may drift, and are resynced.
    pub shares_fd_table: bool,
}

/// One call site at one report.
pub struct SiteRow<'a> {
    pub pid: u32,
    pub id: &'a str,
    pub kind: &'a str,
    pub resource: &'a str,
    pub stack: &'a [String],
    pub open_fds: u64,
    pub leak_per_s: f64,
    pub oldest_age_s: f64,
}

/// A call that failed with EMFILE or ENFILE.
pub struct FdErrorRow<'a> {
    pub pid: u32,
    pub tid: u32,
    pub syscall: &'a str,
    pub errno: &'a str,
    pub resource: Option<&'a str>,
    pub stack: &'a [String],
}

impl ProcessRow<'_> {
    fn pct_used(&self) -> Option<f64> {
        self.soft_limit
            .filter(|&l| l > 0)
            .map(|l| (self.open_fds as f64 * 100.0 / l as f64 * 10.0).round() / 10.0)
    }
}

/// Totals of one process for the closing summary.
pub struct SummaryRow {
    pub pid: u32,
    pub comm: String,
    pub open_fds: u64,
    pub opened: u64,
    pub closed: u64,
    pub emfile: u64,
    pub exited: bool,
    pub status: Status,
    pub leak_per_s: f64,
    pub seconds_to_emfile: Option<f64>,
    /// Worst sites: (kind, resource, stack, open, rate, oldest age).
    pub sites: Vec<(String, String, Vec<String>, u64, f64, f64)>,
    pub findings: Vec<Finding>,
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// "3h12m", "45s": how long until EMFILE.
fn eta(secs: Option<f64>) -> String {
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

pub struct Output {
    json: bool,
    out: io::BufWriter<io::Stdout>,
    header_due: bool,
}

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0)
        .unwrap_or(0.0)
}

/// HH:MM:SS (UTC) of a unix time.
fn clock(ts: f64) -> String {
    let s = ts as u64 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn kinds_map(by_kind: &[u64; FD_KINDS]) -> Map<String, Value> {
    FdKind::ALL
        .iter()
        .zip(by_kind)
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| (k.name().to_string(), json!(n)))
        .collect()
}

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

impl Output {
    pub fn new(json: bool) -> Self {
        Output {
            json,
            out: io::BufWriter::new(io::stdout()),
            header_due: true,
        }
    }

    fn line(&mut self, v: Value) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, &v)?;
        self.out.write_all(b"\n")
    }

    /// Ends one report: the rows reach the reader together.
    pub fn flush(&mut self) -> io::Result<()> {
        self.header_due = true;
        self.out.flush()
    }

    pub fn process(&mut self, ts: f64, r: &ProcessRow) -> io::Result<()> {
        if self.json {
            return self.line(json!({
                "type": "process", "ts": ts, "pid": r.pid, "ppid": r.ppid, "comm": r.comm,
                "open_fds": r.open_fds, "fd_soft_limit": r.soft_limit, "fd_hard_limit": r.hard_limit,
                "pct_used": r.pct_used(), "by_kind": kinds_map(r.by_kind),
                "opened_total": r.opened, "closed_total": r.closed,
                "opened_per_s": (r.opened_per_s * 10.0).round() / 10.0,
                "closed_per_s": (r.closed_per_s * 10.0).round() / 10.0,
                "emfile_errors": r.emfile, "enfile_errors": r.enfile, "drift": r.drift,
                "status": r.status.name(), "leak_per_s": round1(r.leak_per_s),
                "seconds_to_emfile": r.seconds_to_emfile.map(f64::round),
                "stacks_not_sampled": r.stacks_not_sampled, "shares_fd_table": r.shares_fd_table,
            }));
        }
        if self.header_due {
            self.header_due = false;
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
            )?;
        }
        let limit = r.soft_limit.map_or("-".into(), |l| l.to_string());
        let used = r.pct_used().map_or("-".into(), |p| format!("{p:.1}%"));
        let drift = r.drift.map_or("?".into(), |d| d.to_string());
        writeln!(
            self.out,
            "{:<8} {:>7} {:<15} {:>15} {:>6} {:>8.1} {:>8.1} {:>+7.1} {:>9} {:<9} {:>6} {:>5}  {}",
            clock(ts),
            r.pid,
            r.comm,
            format!("{}/{}", r.open_fds, limit),
            used,
            r.opened_per_s,
            r.closed_per_s,
            r.leak_per_s,
            eta(r.seconds_to_emfile),
            r.status.name(),
            r.emfile + r.enfile,
            drift,
            kinds_text(r.by_kind)
        )
    }

    /// A call site under its process: every one in NDJSON, the growing ones
    /// on a terminal.
    pub fn site(&mut self, ts: f64, s: &SiteRow) -> io::Result<()> {
        if self.json {
            return self.line(json!({
                "type": "site", "ts": ts, "pid": s.pid, "site": s.id, "kind": s.kind,
                "resource": s.resource, "stack": s.stack, "open_fds": s.open_fds,
                "leak_per_s": round1(s.leak_per_s), "oldest_age_s": s.oldest_age_s.round(),
            }));
        }
        if s.leak_per_s < 0.05 {
            return Ok(());
        }
        let at = s
            .stack
            .first()
            .map_or(String::new(), |f| format!("  at {f}"));
        writeln!(
            self.out,
            "{:>17} {:+.1} fds/s  {} {}  ({} open, oldest {:.0}s){at}",
            "site", s.leak_per_s, s.kind, s.resource, s.open_fds, s.oldest_age_s
        )
    }

    pub fn finding(&mut self, ts: f64, pid: u32, f: &Finding) -> io::Result<()> {
        if self.json {
            let mut v = json!({
                "type": "finding", "ts": ts, "pid": pid, "finding": f.kind,
                "message": f.message, "recommendation": f.recommendation,
            });
            if let Some(site) = &f.site {
                v["site"] = json!(site);
            }
            if let Some(n) = f.count {
                v["count"] = json!(n);
            }
            if let Some(fds) = &f.fds {
                v["fds"] = json!(fds);
            }
            return self.line(v);
        }
        writeln!(
            self.out,
            "{:<8} {pid:>7} FINDING {}: {}",
            clock(ts),
            f.kind,
            f.message
        )?;
        writeln!(self.out, "{:>17} fix: {}", "", f.recommendation)
    }

    pub fn fork(&mut self, ts: f64, pid: u32, ppid: u32) -> io::Result<()> {
        if self.json {
            return self.line(json!({"type": "fork", "ts": ts, "pid": pid, "ppid": ppid}));
        }
        writeln!(
            self.out,
            "{:<8} {pid:>7} forked from {ppid} (now traced)",
            clock(ts)
        )
    }

    pub fn exec(&mut self, ts: f64, pid: u32, comm: &str) -> io::Result<()> {
        if self.json {
            return self.line(json!({"type": "exec", "ts": ts, "pid": pid, "comm": comm}));
        }
        writeln!(self.out, "{:<8} {pid:>7} exec {comm}", clock(ts))
    }

    pub fn exit(
        &mut self,
        ts: f64,
        pid: u32,
        comm: &str,
        open: u64,
        opened: u64,
        closed: u64,
    ) -> io::Result<()> {
        if self.json {
            return self.line(json!({
                "type": "exit", "ts": ts, "pid": pid, "comm": comm,
                "open_fds": open, "opened_total": opened, "closed_total": closed,
            }));
        }
        writeln!(
            self.out,
            "{:<8} {pid:>7} {comm} exited holding {open} fds (opened {opened}, closed {closed} while traced)",
            clock(ts)
        )
    }

    pub fn fd_error(&mut self, ts: f64, e: &FdErrorRow) -> io::Result<()> {
        if self.json {
            return self.line(json!({
                "type": "emfile", "ts": ts, "pid": e.pid, "tid": e.tid, "syscall": e.syscall,
                "errno": e.errno, "resource": e.resource, "stack": e.stack,
            }));
        }
        let why = if e.errno == "EMFILE" {
            "the process is at its RLIMIT_NOFILE"
        } else {
            "the system-wide fs.file-max is reached"
        };
        let what = e.resource.map_or(String::new(), |r| format!(" ({r})"));
        let at = e
            .stack
            .first()
            .map_or(String::new(), |f| format!(" at {f}"));
        writeln!(
            self.out,
            "{:<8} {:>7} {}{what} failed with {}{at}: {why}",
            clock(ts),
            e.pid,
            e.syscall,
            e.errno
        )
    }

    pub fn rlimit(
        &mut self,
        ts: f64,
        pid: u32,
        soft: Option<u64>,
        hard: Option<u64>,
    ) -> io::Result<()> {
        if self.json {
            return self.line(json!({
                "type": "rlimit", "ts": ts, "pid": pid, "fd_soft_limit": soft, "fd_hard_limit": hard,
            }));
        }
        let show = |l: Option<u64>| l.map_or("unlimited".to_string(), |v| v.to_string());
        writeln!(
            self.out,
            "{:<8} {pid:>7} RLIMIT_NOFILE now {} (hard {})",
            clock(ts),
            show(soft),
            show(hard)
        )
    }

    /// Events the kernel could not deliver (ring buffer full).
    pub fn lost(&mut self, ts: f64, count: u64) -> io::Result<()> {
        if self.json {
            return self.line(json!({"type": "lost", "ts": ts, "count": count}));
        }
        writeln!(
            self.out,
            "{:<8} warning: {count} events lost (ring buffer full); counts stay exact, fork/exec/exit notices may be missing",
            clock(ts)
        )
    }

    /// Fds or processes the kernel maps had no room for.
    pub fn map_full(
        &mut self,
        ts: f64,
        map: &str,
        count: u64,
        max_entries: u32,
        flag: &str,
    ) -> io::Result<()> {
        if self.json {
            return self.line(json!({
                "type": "map_full", "ts": ts, "map": map, "count": count, "max_entries": max_entries,
            }));
        }
        writeln!(
            self.out,
            "{:<8} warning: the {map} map is full ({max_entries} entries): {count} not tracked; raise {flag}",
            clock(ts)
        )
    }

    /// A resync after a confirmed `drift`, or (None) after the kernel side
    /// said it could not follow a change exactly.
    pub fn resynced(&mut self, ts: f64, pid: u32, drift: Option<i64>) -> io::Result<()> {
        if self.json {
            return Ok(()); // the process object carries the drift
        }
        let why = match drift {
            Some(d) => format!("drift {d:+} against /proc/{pid}/fd"),
            None => "a change the kernel side could not follow exactly".into(),
        };
        writeln!(self.out, "{:<8} {pid:>7} {why}; resynced", clock(ts))
    }

    pub fn summary(&mut self, secs: f64, rows: &[SummaryRow]) -> io::Result<()> {
        if self.json || rows.is_empty() {
            return self.out.flush();
        }
        writeln!(self.out, "\nSummary ({secs:.1}s traced):")?;
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
        for r in rows {
            writeln!(
                self.out,
                "{:>7} {:<15} {:>8} {:>8} {:>8} {:>+8} {:>+7.1} {:>9} {:<9} {:>6}  {}",
                r.pid,
                r.comm,
                r.open_fds,
                r.opened,
                r.closed,
                r.opened as i64 - r.closed as i64,
                r.leak_per_s,
                eta(r.seconds_to_emfile),
                r.status.name(),
                r.emfile,
                if r.exited { "exited" } else { "running" }
            )?;
        }
        for r in rows
            .iter()
            .filter(|r| !r.sites.is_empty() || !r.findings.is_empty())
        {
            writeln!(self.out, "\n{} ({}): {}", r.pid, r.comm, r.status.name())?;
            for (kind, resource, stack, open, rate, age) in &r.sites {
                writeln!(
                    self.out,
                    "  {rate:+.1} fds/s  {kind} {resource}: {open} open, oldest {age:.0}s"
                )?;
                for frame in stack.iter().take(8) {
                    writeln!(self.out, "      {frame}")?;
                }
            }
            for f in &r.findings {
                writeln!(self.out, "  {}: {}", f.kind, f.message)?;
                writeln!(self.out, "    fix: {}", f.recommendation)?;
            }
        }
        self.out.flush()
    }
}
