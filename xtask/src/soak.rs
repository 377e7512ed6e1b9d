//! `cargo xtask soak`: fdtrace traces a paced open/close churn and a slow
//! leaker for minutes and must come out as it went in: its own fd count and
//! memory flat, no lost events, no drift that persists, and figures that
//! match what the traced processes did.
//!
//! The traced processes are two `fdops` (tests/src/bin/fdops.rs) driven over
//! their stdin. The churner gets `churn N` every [`TICK`] (N openat + close of
//! /dev/null, [`CHURN_RATE`] a second on average), the leaker `open`
//! [`LEAK_RATE`] times a second, never closed. fdops replies with what each
//! command opened and closed, so the soak knows the true totals. The churn
//! comes in bursts of a few milliseconds, so the churner's table is still for
//! most of each tick and fdtrace's drift check, which needs a still table,
//! runs in most reports.
//!
//! Progress goes to stderr, the table to stdout; any failed check is printed
//! and makes the exit code 1.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::bench::child::{self, Proc, check_interrupted};
use crate::proc::{self, is_root};
use crate::setup::{self, Tools};
use crate::tasks::{Workspace, build_fdtrace};

/// openat + close pairs per second in the churner: the load of the soak
/// that held before this task existed.
const CHURN_RATE: u64 = 5000;
/// fds the leaker opens per second and never closes.
const LEAK_RATE: u64 = 1;
/// How far fdtrace's `leak_per_s` for the leaker may be from [`LEAK_RATE`].
/// fdtrace rounds it to 0.1; the leaker's opens land up to a tick late on a
/// loaded machine, which bends the least-squares slope by a few percent.
const LEAK_TOLERANCE: f64 = 0.15;
/// How often the soak sends commands (and samples fdtrace).
const TICK: Duration = Duration::from_millis(100);
/// fdtrace's report interval, as in production.
const INTERVAL: &str = "1s";
const INTERVAL_DUR: Duration = Duration::from_secs(1);
/// Churn before the start figures are taken: the first reports symbolize
/// each new stack once (blazesym maps and parses fdops's and libc's ELF and
/// DWARF) and grow fdtrace's tables to their working size. What the soak
/// looks for is growth after that.
const WARMUP: Duration = Duration::from_secs(10);
/// The shortest soak: the leak window needs reports to fit a slope.
const MIN_DURATION: Duration = Duration::from_secs(10);
const DEFAULT_DURATION: Duration = Duration::from_secs(300);
const QUICK_DURATION: Duration = Duration::from_secs(30);
/// A run had too few reports if it has fewer than this share of one per
/// interval (a stalled reporter; a loaded machine delays a few).
const MIN_REPORT_SHARE: f64 = 0.8;
/// The churn really ran if it reached this share of [`CHURN_RATE`].
const MIN_CHURN_SHARE: f64 = 0.9;
/// Reports after the churn stops, before the final comparison: the first may
/// have been taken before the last command's syscalls.
const TAIL_REPORTS: u64 = 2;

/// fdtrace's VmRSS may grow by this share of its start figure plus
/// [`RSS_SLACK_KIB`]. What grows without being a leak: the leaker's fds (an
/// entry and a label each, well under 1 KiB: 300 fds in 5 minutes are a few
/// hundred KiB), glibc malloc's arenas, which keep freed memory and fragment
/// a little more over the first few hundred reports, and pages of the
/// symbolizer's mapped ELF and DWARF files that count in VmRSS once touched.
/// 2 MiB covers those; 10% scales with a bigger heap. What it still catches,
/// on the start figure measured here (28 MiB, so 4.8 MiB of room): 4 bytes
/// kept per churned fd (1.5 million in 5 minutes), or 16 KiB per report.
const RSS_GROWTH_PCT: u64 = 10;
const RSS_SLACK_KIB: u64 = 2048;

/// How long a command to fdops may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long fdtrace may take to attach (it loads and verifies its programs).
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long fdtrace gets to detach after SIGINT before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long the churn runs after its 10 s warm-up [default: 5m, or 30s
    /// with --quick]
    #[arg(long, value_name = "DUR", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// A short run (30 s): a smoke check
    #[arg(long, conflicts_with = "duration")]
    quick: bool,
    /// Soak this fdtrace binary instead of building the workspace's
    #[arg(long, value_name = "PATH")]
    fdtrace: Option<PathBuf>,
}

/// `cargo xtask soak`.
pub fn soak(tools: &Tools, args: &Args) -> Result<ExitCode> {
    if !is_root() {
        bail!("the soak loads eBPF programs: run `cargo xtask soak` as root");
    }
    let duration = args.duration.unwrap_or(if args.quick {
        QUICK_DURATION
    } else {
        DEFAULT_DURATION
    });
    if duration < MIN_DURATION {
        bail!(
            "--duration must be at least {}",
            humantime::format_duration(MIN_DURATION)
        );
    }
    setup::setup(tools)?;
    let ws = Workspace::locate()?;
    let fdtrace = match args.fdtrace.as_deref() {
        Some(bin) if bin.is_file() => bin.to_path_buf(),
        Some(bin) => bail!("--fdtrace {}: no such file", bin.display()),
        None => build_fdtrace(&ws, tools, true)?,
    };
    let fdops = build_fdops(&ws, tools)?;
    child::install_signal_flag();
    child::become_subreaper();
    let result = run(&fdtrace, &fdops, duration);
    child::sweep_orphans();
    let figures = result?;
    print_table(&figures);
    let failures = verdict(&figures);
    if failures.is_empty() {
        println!("soak: passed");
        return Ok(ExitCode::SUCCESS);
    }
    for f in &failures {
        println!("soak: FAILED: {f}");
    }
    Ok(ExitCode::FAILURE)
}

fn build_fdops(ws: &Workspace, tools: &Tools) -> Result<PathBuf> {
    let args = [
        "build",
        "--release",
        "--package",
        "fdtrace-tests",
        "--bin",
        "fdops",
    ];
    proc::run(&mut ws.cargo(tools, &args)?)?;
    let bin = ws.target_dir.join("release").join("fdops");
    if !bin.is_file() {
        bail!("the build succeeded but {} is missing", bin.display());
    }
    Ok(bin)
}

/// fdtrace's own open fds and resident memory at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub fds: u64,
    pub rss_kib: u64,
}

impl Sample {
    fn max(self, o: Sample) -> Sample {
        Sample {
            fds: self.fds.max(o.fds),
            rss_kib: self.rss_kib.max(o.rss_kib),
        }
    }
}

/// `VmRSS` in KiB from the text of /proc/PID/status.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let rest = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim();
    rest.strip_suffix("kB")?.trim().parse().ok()
}

/// The number of entries in /proc/PID/fd.
fn proc_fd_count(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/fd");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        entry.with_context(|| format!("reading {dir}"))?;
        n += 1;
    }
    Ok(n)
}

fn sample(pid: u32) -> Result<Sample> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let rss_kib = parse_vm_rss(&status).with_context(|| format!("no VmRSS in {path}"))?;
    Ok(Sample {
        fds: proc_fd_count(pid)?,
        rss_kib,
    })
}

/// The smallest figures of samples spread over one report interval. Each
/// report opens /proc files of the traced processes for a moment, and one
/// sample may land inside that; an fd or memory that fdtrace keeps is in
/// every sample.
fn quiet_sample(pid: u32) -> Result<Sample> {
    const N: u32 = 5;
    let mut best = sample(pid)?;
    for _ in 1..N {
        std::thread::sleep(INTERVAL_DUR / N);
        let s = sample(pid)?;
        best = Sample {
            fds: best.fds.min(s.fds),
            rss_kib: best.rss_kib.min(s.rss_kib),
        };
    }
    Ok(best)
}

/// One `process` object of fdtrace's NDJSON, the fields the soak checks.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub open_fds: u64,
    pub opened_total: u64,
    pub closed_total: u64,
    pub drift: Option<i64>,
    pub leak_per_s: Option<f64>,
}

/// What fdtrace reported about one traced process.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Tracked {
    pub reports: u64,
    /// Reports whose drift was measured (not null).
    pub drift_measured: u64,
    pub drift_nonzero: u64,
    /// Consecutive reports with a non-zero drift, now and at most.
    run: u64,
    pub longest_nonzero_run: u64,
    pub leak_findings: u64,
    pub last: Option<Report>,
}

impl Tracked {
    fn add(&mut self, r: Report) {
        self.reports += 1;
        match r.drift {
            Some(0) => {
                self.drift_measured += 1;
                self.run = 0;
            }
            Some(_) => {
                self.drift_measured += 1;
                self.drift_nonzero += 1;
                self.run += 1;
                self.longest_nonzero_run = self.longest_nonzero_run.max(self.run);
            }
            // Not measured: neither breaks nor extends a run.
            None => {}
        }
        self.last = Some(r);
    }
}

/// Everything fdtrace's stdout said, line by line.
#[derive(Debug, Default)]
pub struct Monitor {
    pub procs: BTreeMap<u32, Tracked>,
    pub lost: u64,
    pub map_full: u64,
}

impl Monitor {
    /// Takes one line of fdtrace's stdout; fails on a line that is not the
    /// NDJSON the README describes.
    pub fn feed(&mut self, line: &str) -> Result<()> {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("fdtrace printed a line that is not JSON: {line}"))?;
        let bad = |what: &str| anyhow::anyhow!("fdtrace's {what} is missing or bad in {line}");
        let u64_of = |key: &str| v.get(key).and_then(|x| x.as_u64()).ok_or_else(|| bad(key));
        let pid = || -> Result<u32> { u32::try_from(u64_of("pid")?).map_err(|_| bad("pid")) };
        match v.get("type").and_then(|t| t.as_str()) {
            Some("process") => {
                let drift = match v.get("drift") {
                    Some(serde_json::Value::Null) => None,
                    Some(d) => Some(d.as_i64().ok_or_else(|| bad("drift"))?),
                    None => return Err(bad("drift")),
                };
                let report = Report {
                    open_fds: u64_of("open_fds")?,
                    opened_total: u64_of("opened_total")?,
                    closed_total: u64_of("closed_total")?,
                    drift,
                    leak_per_s: v.get("leak_per_s").and_then(|x| x.as_f64()),
                };
                self.procs.entry(pid()?).or_default().add(report);
            }
            Some("lost") => self.lost += u64_of("count")?,
            Some("map_full") => self.map_full += u64_of("count")?,
            Some("finding") if v.get("finding").and_then(|f| f.as_str()) == Some("leak") => {
                self.procs.entry(pid()?).or_default().leak_findings += 1;
            }
            Some(_) => {}
            None => return Err(bad("type")),
        }
        Ok(())
    }

    fn tracked(&self, pid: u32) -> Tracked {
        self.procs.get(&pid).cloned().unwrap_or_default()
    }

    fn reports_of(&self, pid: u32) -> u64 {
        self.procs.get(&pid).map_or(0, |t| t.reports)
    }
}

/// One traced fdops process at the end of the soak.
#[derive(Debug, Clone)]
pub struct Side {
    pub name: &'static str,
    pub pid: u32,
    pub tracked: Tracked,
    /// The leak rate fdtrace reported when the churn stopped.
    pub leak_at_stop: Option<f64>,
    /// Entries in /proc/PID/fd at the end (the process is idle).
    pub proc_fds: u64,
    /// What fdops says it opened and closed since fdtrace attached.
    pub opened: u64,
    pub closed: u64,
}

/// Everything the soak measured.
#[derive(Debug, Clone)]
pub struct Figures {
    pub duration: Duration,
    /// fdtrace once attached, after the warm-up (the start), at the end.
    pub attach: Sample,
    pub start: Sample,
    pub end: Sample,
    /// The largest figures of the per-tick samples.
    pub peak: Sample,
    pub lost: u64,
    pub map_full: u64,
    pub churner: Side,
    pub leaker: Side,
    /// open+close pairs per second the churner made, warm-up included.
    pub churn_rate: f64,
    /// How fdtrace ended on SIGINT (None: exit code 0).
    pub fdtrace_exit: Option<String>,
    /// fdtrace's stderr lines.
    pub stderr: Vec<String>,
}

/// The largest VmRSS that passes, for a start figure.
pub fn rss_bound(start_kib: u64) -> u64 {
    start_kib + start_kib * RSS_GROWTH_PCT / 100 + RSS_SLACK_KIB
}

/// The failed checks, as messages; empty when the soak held.
pub fn verdict(f: &Figures) -> Vec<String> {
    let mut out = Vec::new();
    if f.end.fds > f.start.fds {
        out.push(format!(
            "fdtrace's own fd count grew: {} -> {}",
            f.start.fds, f.end.fds
        ));
    }
    let bound = rss_bound(f.start.rss_kib);
    if f.end.rss_kib > bound {
        out.push(format!(
            "fdtrace's VmRSS grew past its bound: {} -> {} KiB (bound {bound} KiB: +{RSS_GROWTH_PCT}% + {RSS_SLACK_KIB} KiB)",
            f.start.rss_kib, f.end.rss_kib
        ));
    }
    if f.lost > 0 {
        out.push(format!("fdtrace lost {} events", f.lost));
    }
    if f.map_full > 0 {
        out.push(format!(
            "fdtrace's kernel maps were full {} times",
            f.map_full
        ));
    }
    if let Some(how) = &f.fdtrace_exit {
        out.push(format!(
            "fdtrace ended with {how} on SIGINT, not exit code 0"
        ));
    }
    let total = WARMUP + f.duration;
    let expected_reports = total.as_secs_f64() / INTERVAL_DUR.as_secs_f64();
    for s in [&f.churner, &f.leaker] {
        let t = &s.tracked;
        let who = format!("{} (pid {})", s.name, s.pid);
        if (t.reports as f64) < expected_reports * MIN_REPORT_SHARE {
            out.push(format!(
                "{who}: {} reports in {:.0} s, want about one per {INTERVAL}",
                t.reports,
                total.as_secs_f64()
            ));
        }
        if t.longest_nonzero_run >= 2 {
            out.push(format!(
                "{who}: a non-zero drift in {} reports running ({} non-zero in all)",
                t.longest_nonzero_run, t.drift_nonzero
            ));
        }
        if t.drift_measured == 0 {
            out.push(format!(
                "{who}: no report measured the drift (always null): the check never ran"
            ));
        }
        let Some(last) = &t.last else {
            out.push(format!("{who}: fdtrace never reported it"));
            continue;
        };
        if last.open_fds != s.proc_fds {
            out.push(format!(
                "{who}: fdtrace reports {} open fds, /proc/{}/fd has {}",
                last.open_fds, s.pid, s.proc_fds
            ));
        }
        if (last.opened_total, last.closed_total) != (s.opened, s.closed) {
            out.push(format!(
                "{who}: fdtrace counted {} opened, {} closed; fdops did {} and {}",
                last.opened_total, last.closed_total, s.opened, s.closed
            ));
        }
    }
    let want = LEAK_RATE as f64;
    match f.leaker.leak_at_stop {
        Some(r) if (r - want).abs() <= want * LEAK_TOLERANCE => {}
        other => out.push(format!(
            "leaker: fdtrace's leak_per_s is {}, want {want} within {:.0}%",
            other.map_or("null".to_owned(), |r| r.to_string()),
            LEAK_TOLERANCE * 100.0
        )),
    }
    if f.leaker.tracked.leak_findings == 0 {
        out.push("leaker: fdtrace reported no leak finding".to_owned());
    }
    if f.churner.tracked.leak_findings > 0 {
        out.push(format!(
            "churner: fdtrace reported {} leak findings for a process that closes every fd",
            f.churner.tracked.leak_findings
        ));
    }
    if f.churn_rate < CHURN_RATE as f64 * MIN_CHURN_SHARE {
        out.push(format!(
            "the churner made {:.0} open+close/s, want {CHURN_RATE}: the machine is too busy for this soak",
            f.churn_rate
        ));
    }
    out
}

fn print_table(f: &Figures) {
    println!(
        "soak: {} after a {} warm-up; churner pid {} ({CHURN_RATE} open+close/s, made {:.0}/s), \
         leaker pid {} ({LEAK_RATE} fd/s); fdtrace --json --interval {INTERVAL}",
        humantime::format_duration(f.duration),
        humantime::format_duration(WARMUP),
        f.churner.pid,
        f.churn_rate,
        f.leaker.pid,
    );
    println!();
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "fdtrace", "attach", "start", "end", "peak", "bound"
    );
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "open fds", f.attach.fds, f.start.fds, f.end.fds, f.peak.fds, f.start.fds
    );
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "VmRSS (KiB)",
        f.attach.rss_kib,
        f.start.rss_kib,
        f.end.rss_kib,
        f.peak.rss_kib,
        rss_bound(f.start.rss_kib)
    );
    println!();
    println!(
        "{:<8} {:>7} {:>13} {:>8} {:>6} {:>13} {:>19} {:>19} {:>6} {:>8}",
        "process",
        "reports",
        "drift checked",
        "non-zero",
        "run",
        "open fds/proc",
        "opened fdtrace/real",
        "closed fdtrace/real",
        "leak/s",
        "findings"
    );
    for s in [&f.churner, &f.leaker] {
        let t = &s.tracked;
        let open = t
            .last
            .as_ref()
            .map_or("-".to_owned(), |l| l.open_fds.to_string());
        let opened = t.last.as_ref().map_or(0, |l| l.opened_total);
        let closed = t.last.as_ref().map_or(0, |l| l.closed_total);
        // + 0.0 turns a -0.0 slope into 0.0.
        let leak = s
            .leak_at_stop
            .map_or("null".to_owned(), |r| format!("{:.1}", r + 0.0));
        println!(
            "{:<8} {:>7} {:>13} {:>8} {:>6} {:>13} {:>19} {:>19} {:>6} {:>8}",
            s.name,
            t.reports,
            t.drift_measured,
            t.drift_nonzero,
            t.longest_nonzero_run,
            format!("{open}/{}", s.proc_fds),
            format!("{opened}/{}", s.opened),
            format!("{closed}/{}", s.closed),
            leak,
            t.leak_findings
        );
    }
    println!();
    println!(
        "lost events: {}; map_full: {}; fdtrace exit on SIGINT: {}",
        f.lost,
        f.map_full,
        f.fdtrace_exit.as_deref().unwrap_or("0")
    );
    if !f.stderr.is_empty() {
        println!("fdtrace's stderr ({} lines):", f.stderr.len());
        for l in &f.stderr {
            println!("  {l}");
        }
    }
}

/// The fields of an fdops reply line that the soak uses.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub ok: bool,
    pub pid: u32,
    pub nfds: u64,
    pub opened: u64,
    pub closed: u64,
}

/// Parses `@fdops ok|err|ready pid=P tid=T nfds=N opened=A closed=B ...`.
pub fn parse_reply(line: &str) -> Result<Reply> {
    let mut words = line.split_whitespace();
    if words.next() != Some("@fdops") {
        bail!("not an fdops reply: {line}");
    }
    let ok = match words.next() {
        Some("ok" | "ready") => true,
        Some("err") => false,
        _ => bail!("not an fdops reply: {line}"),
    };
    let field = |key: &str| -> Result<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no number {key}= in fdops's reply `{line}`"))
    };
    Ok(Reply {
        ok,
        pid: u32::try_from(field("pid")?).context("pid out of range")?,
        nfds: field("nfds")?,
        opened: field("opened")?,
        closed: field("closed")?,
    })
}

/// An fdops process the soak sends commands to.
struct Fdops {
    name: &'static str,
    proc: Proc,
    input: std::io::PipeWriter,
    pid: u32,
    /// fds fdops had when it said it was ready.
    ready_nfds: u64,
    /// What it opened and closed since the counts were last reset.
    opened: u64,
    closed: u64,
}

impl Fdops {
    fn start(bin: &Path, name: &'static str) -> Result<Self> {
        // The soak keeps the write end itself: Proc owns only the output.
        let (reader, input) = std::io::pipe().context("creating a pipe for fdops")?;
        let mut cmd = Command::new(bin);
        cmd.stdin(reader)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut proc = Proc::spawn(name, &mut cmd)?;
        let line = proc
            .stdout()?
            .wait_for(REPLY_TIMEOUT, |l| l.starts_with("@fdops "));
        let line = line.map_err(|e| proc.fail(format!("no ready line: {e:#}")))?;
        let ready = parse_reply(&line)?;
        Ok(Self {
            name,
            pid: ready.pid,
            ready_nfds: ready.nfds,
            proc,
            input,
            opened: 0,
            closed: 0,
        })
    }

    /// Sends one command and waits for its reply; fails on an `err` reply.
    fn command(&mut self, cmd: &str) -> Result<()> {
        self.input
            .write_all(format!("{cmd}\n").as_bytes())
            .with_context(|| format!("writing `{cmd}` to {}", self.name))?;
        let line = self
            .proc
            .stdout()?
            .wait_for(REPLY_TIMEOUT, |l| l.starts_with("@fdops "));
        let line = line.map_err(|e| self.proc.fail(format!("no reply to `{cmd}`: {e:#}")))?;
        let reply = parse_reply(&line)?;
        self.opened += reply.opened;
        self.closed += reply.closed;
        if !reply.ok {
            return Err(self.proc.fail(format!("`{cmd}` failed: {line}")));
        }
        Ok(())
    }

    /// Makes room for `fds` open fds (the leaker's whole run).
    fn ensure_fd_limit(&self, fds: u64) -> Result<()> {
        let pid = libc::pid_t::try_from(self.pid).context("pid out of range")?;
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: reads the limit of our child into a valid rlimit.
        if unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut lim) } != 0 {
            return Err(std::io::Error::last_os_error()).context("prlimit(RLIMIT_NOFILE)");
        }
        if lim.rlim_cur >= fds {
            return Ok(());
        }
        if lim.rlim_max < fds {
            bail!(
                "the {} needs {fds} fds and its hard limit is {}: choose a shorter --duration",
                self.name,
                lim.rlim_max
            );
        }
        lim.rlim_cur = fds;
        // SAFETY: sets the soft limit of our child from a valid rlimit.
        if unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error()).context("prlimit(RLIMIT_NOFILE)");
        }
        Ok(())
    }
}

/// What the churn loop sends, paced from the start of the churn so that a
/// late tick is made up by the next one.
struct Pacer {
    started: Instant,
    /// Pairs sent, and pairs given up after a stall.
    churned: u64,
    skipped: u64,
    leaked: u64,
}

impl Pacer {
    fn new(started: Instant) -> Self {
        Self {
            started,
            churned: 0,
            skipped: 0,
            leaked: 0,
        }
    }

    /// Takes the commands due at `now`: (churn pairs, fds to leak).
    fn take(&mut self, now: Instant) -> (u64, u64) {
        let ns = now.duration_since(self.started).as_nanos();
        let per_s =
            |rate: u64| u64::try_from(ns * u128::from(rate) / 1_000_000_000).unwrap_or(u64::MAX);
        let due = per_s(CHURN_RATE);
        let mut churn = due.saturating_sub(self.churned + self.skipped);
        // At most a second's worth at once: the backlog of a long stall is
        // given up (the churn rate check sees it), not sent in one burst
        // that would keep the table busy through reports.
        if churn > CHURN_RATE {
            self.skipped += churn - CHURN_RATE;
            churn = CHURN_RATE;
        }
        self.churned += churn;
        let leak = per_s(LEAK_RATE).saturating_sub(self.leaked);
        self.leaked += leak;
        (churn, leak)
    }
}

/// Starts the processes, runs the churn, and gathers the figures.
fn run(fdtrace_bin: &Path, fdops_bin: &Path, duration: Duration) -> Result<Figures> {
    let mut churner = Fdops::start(fdops_bin, "churner")?;
    let mut leaker = Fdops::start(fdops_bin, "leaker")?;
    let total = WARMUP + duration;
    let leaked = (total.as_secs_f64() * LEAK_RATE as f64).ceil() as u64;
    // Headroom for fdops's own fds and a late tick.
    leaker.ensure_fd_limit(leaker.ready_nfds + leaked + 64)?;

    let mut cmd = Command::new(fdtrace_bin);
    cmd.args(["--json", "--interval", INTERVAL])
        .args(["--pid", &churner.pid.to_string()])
        .args(["--pid", &leaker.pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("soak: $ {}", proc::describe(&cmd));
    let mut ft = Proc::spawn("fdtrace", &mut cmd)?;
    let mut mon = Monitor::default();
    let first = ft
        .stdout()?
        .wait_for(ATTACH_TIMEOUT, |l| l.starts_with('{'));
    let first = first.map_err(|e| ft.fail(format!("no first report: {e:#}")))?;
    mon.feed(&first)?;
    let attach = quiet_sample(ft.pid())?;
    eprintln!(
        "soak: fdtrace attached: {} fds, VmRSS {} KiB; {} warm-up, then {}",
        attach.fds,
        attach.rss_kib,
        humantime::format_duration(WARMUP),
        humantime::format_duration(duration)
    );

    let mut stderr = Vec::new();
    let mut peak = attach;
    let mut start = None;
    let mut pacer = Pacer::new(Instant::now());
    let mut next_tick = pacer.started;
    let mut last_progress = pacer.started;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        let elapsed = now.duration_since(pacer.started);
        if elapsed >= total {
            break;
        }
        if start.is_none() && elapsed >= WARMUP {
            let s = quiet_sample(ft.pid())?;
            eprintln!(
                "soak: warm-up done: fdtrace has {} fds, VmRSS {} KiB",
                s.fds, s.rss_kib
            );
            start = Some(s);
        }
        let (churn, leak) = pacer.take(now);
        if churn > 0 {
            churner.command(&format!("churn {churn}"))?;
        }
        for _ in 0..leak {
            leaker.command("open")?;
        }
        for line in ft.stdout()?.arrived() {
            mon.feed(&line)?;
        }
        stderr.extend(ft.stderr()?.arrived());
        if !ft.running()? {
            return Err(ft.fail("exited during the soak"));
        }
        peak = peak.max(sample(ft.pid())?);
        if now.duration_since(last_progress) >= Duration::from_secs(30) {
            last_progress = now;
            let cur = sample(ft.pid())?;
            eprintln!(
                "soak: {:>4} s: fdtrace {} fds, VmRSS {} KiB; {} lost",
                elapsed.as_secs(),
                cur.fds,
                cur.rss_kib,
                mon.lost
            );
        }
        next_tick += TICK;
        std::thread::sleep(next_tick.saturating_duration_since(Instant::now()));
    }
    let churn_rate = pacer.churned as f64 / pacer.started.elapsed().as_secs_f64();
    let start = start.context("the soak ended before its warm-up did")?;
    let leak_at_stop = |pid: u32| mon.tracked(pid).last.and_then(|r| r.leak_per_s);
    let leak_at_stop = (leak_at_stop(churner.pid), leak_at_stop(leaker.pid));

    // Both processes are idle now: wait for reports that saw their last
    // commands, then compare with /proc.
    let want = |m: &Monitor, pid| m.reports_of(pid) + TAIL_REPORTS;
    let (want_c, want_l) = (want(&mon, churner.pid), want(&mon, leaker.pid));
    let deadline = Instant::now() + INTERVAL_DUR * (TAIL_REPORTS as u32 + 5);
    while mon.reports_of(churner.pid) < want_c || mon.reports_of(leaker.pid) < want_l {
        check_interrupted()?;
        if Instant::now() >= deadline {
            return Err(ft.fail(format!(
                "no {TAIL_REPORTS} reports on both processes after the churn stopped"
            )));
        }
        for line in ft.stdout()?.arrived() {
            mon.feed(&line)?;
        }
        std::thread::sleep(TICK);
    }
    let proc_fds = (proc_fd_count(churner.pid)?, proc_fd_count(leaker.pid)?);
    let end = quiet_sample(ft.pid())?;
    stderr.extend(ft.stderr()?.arrived());

    let status = ft.stop(STOP_GRACE)?;
    let rest = ft.stdout()?.rest(STOP_GRACE);
    for line in rest.map_err(|e| ft.fail(format!("reading its last lines: {e:#}")))? {
        mon.feed(&line)?;
    }
    stderr.extend(ft.stderr()?.arrived());
    let fdtrace_exit = (!status.success()).then(|| status.to_string());

    let side = |f: &Fdops, leak_at_stop, proc_fds| Side {
        name: f.name,
        pid: f.pid,
        tracked: mon.tracked(f.pid),
        leak_at_stop,
        proc_fds,
        opened: f.opened,
        closed: f.closed,
    };
    Ok(Figures {
        duration,
        attach,
        start,
        end,
        peak: peak.max(end),
        lost: mon.lost,
        map_full: mon.map_full,
        churner: side(&churner, leak_at_stop.0, proc_fds.0),
        leaker: side(&leaker, leak_at_stop.1, proc_fds.1),
        churn_rate,
        fdtrace_exit,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss() {
        let status =
            "Name:\tfdtrace\nVmPeak:\t  30000 kB\nVmRSS:\t   21344 kB\nRssAnon:\t 9000 kB\n";
        assert_eq!(parse_vm_rss(status), Some(21344));
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }

    #[test]
    fn parses_fdops_replies() {
        let r = parse_reply("@fdops ok pid=12 tid=12 nfds=5 opened=500 closed=500").unwrap();
        assert_eq!(
            r,
            Reply {
                ok: true,
                pid: 12,
                nfds: 5,
                opened: 500,
                closed: 500
            }
        );
        let r =
            parse_reply("@fdops err pid=12 tid=13 nfds=5 opened=1 closed=0 msg=EMFILE").unwrap();
        assert!(!r.ok);
        assert_eq!((r.opened, r.closed), (1, 0));
        assert!(parse_reply("fdloop open ns_per_iter=1").is_err());
        assert!(parse_reply("@fdops ok pid=12 tid=12 nfds=5 opened=x closed=0").is_err());
    }

    fn process_line(pid: u32, open: u64, drift: &str) -> String {
        format!(
            r#"{{"type":"process","ts":1.0,"pid":{pid},"open_fds":{open},"opened_total":10,"closed_total":7,"drift":{drift},"leak_per_s":1.0}}"#
        )
    }

    #[test]
    fn drift_runs_count_only_consecutive_non_zero_reports() {
        let mut m = Monitor::default();
        // null neither breaks nor extends a run; 0 breaks it.
        for d in ["1", "0", "2", "null", "0", "null", "-1"] {
            m.feed(&process_line(7, 3, d)).unwrap();
        }
        let t = m.tracked(7);
        assert_eq!(t.reports, 7);
        assert_eq!(t.drift_measured, 5);
        assert_eq!(t.drift_nonzero, 3);
        assert_eq!(t.longest_nonzero_run, 1);
        for d in ["3", "null", "1"] {
            m.feed(&process_line(7, 3, d)).unwrap();
        }
        assert_eq!(m.tracked(7).longest_nonzero_run, 3);
    }

    #[test]
    fn monitor_sums_losses_and_findings() {
        let mut m = Monitor::default();
        m.feed(r#"{"type":"lost","ts":1.0,"count":17}"#).unwrap();
        m.feed(r#"{"type":"lost","ts":2.0,"count":3}"#).unwrap();
        m.feed(r#"{"type":"map_full","ts":2.0,"map":"fds","count":2,"max_entries":9}"#)
            .unwrap();
        m.feed(r#"{"type":"finding","ts":2.0,"pid":9,"finding":"leak","site":"ab"}"#)
            .unwrap();
        m.feed(r#"{"type":"finding","ts":2.0,"pid":9,"finding":"close_wait","count":1}"#)
            .unwrap();
        m.feed(r#"{"type":"site","ts":2.0,"pid":9}"#).unwrap();
        assert_eq!((m.lost, m.map_full), (20, 2));
        assert_eq!(m.tracked(9).leak_findings, 1);
        assert_eq!(m.tracked(9).reports, 0);
    }

    #[test]
    fn monitor_refuses_what_is_not_its_ndjson() {
        let mut m = Monitor::default();
        assert!(m.feed("PID COMM").is_err());
        assert!(m.feed(r#"{"ts":1.0}"#).is_err());
        assert!(m.feed(r#"{"type":"lost","count":-1}"#).is_err());
        assert!(
            m.feed(r#"{"type":"process","pid":1,"open_fds":1}"#)
                .is_err()
        );
        let no_drift =
            r#"{"type":"process","pid":1,"open_fds":1,"opened_total":1,"closed_total":0}"#;
        assert!(m.feed(no_drift).is_err());
    }

    fn side(name: &'static str, pid: u32, open: u64, leak: f64, findings: u64) -> Side {
        let mut t = Tracked::default();
        for _ in 0..300 {
            t.add(Report {
                open_fds: open,
                opened_total: 100,
                closed_total: 90,
                drift: Some(0),
                leak_per_s: Some(leak),
            });
        }
        t.leak_findings = findings;
        Side {
            name,
            pid,
            tracked: t,
            leak_at_stop: Some(leak),
            proc_fds: open,
            opened: 100,
            closed: 90,
        }
    }

    fn good() -> Figures {
        let s = Sample {
            fds: 39,
            rss_kib: 20_000,
        };
        Figures {
            duration: Duration::from_secs(300),
            attach: s,
            start: s,
            end: s,
            peak: s,
            lost: 0,
            map_full: 0,
            churner: side("churner", 10, 4, 0.0, 0),
            leaker: side("leaker", 11, 314, 1.0, 1),
            churn_rate: 5000.0,
            fdtrace_exit: None,
            stderr: Vec::new(),
        }
    }

    #[test]
    fn a_held_soak_passes() {
        assert_eq!(verdict(&good()), Vec::<String>::new());
    }

    #[test]
    fn rss_bound_is_ten_percent_and_two_mib() {
        assert_eq!(rss_bound(20_000), 20_000 + 2_000 + 2048);
        let mut f = good();
        f.end.rss_kib = rss_bound(20_000);
        assert!(verdict(&f).is_empty());
        f.end.rss_kib += 1;
        assert_eq!(verdict(&f).len(), 1);
    }

    /// Each broken figure fails exactly one check, with a message naming it.
    #[test]
    fn every_broken_figure_fails() {
        type Break = fn(&mut Figures);
        let cases: [(Break, &str); 14] = [
            (|f| f.end.fds += 1, "fd count grew"),
            (|f| f.lost = 1, "lost 1 events"),
            (|f| f.map_full = 3, "full 3 times"),
            (|f| f.fdtrace_exit = Some("signal 9".into()), "signal 9"),
            (|f| f.leaker.proc_fds += 1, "/proc/11/fd has 315"),
            (|f| f.churner.opened += 1, "fdops did 101 and 90"),
            (|f| f.churner.closed -= 1, "fdops did 100 and 89"),
            (|f| f.leaker.leak_at_stop = Some(0.8), "leak_per_s is 0.8"),
            (|f| f.leaker.leak_at_stop = None, "leak_per_s is null"),
            (|f| f.leaker.tracked.leak_findings = 0, "no leak finding"),
            (|f| f.churner.tracked.leak_findings = 2, "2 leak findings"),
            (|f| f.churn_rate = 4000.0, "made 4000 open+close/s"),
            (|f| f.churner.tracked.reports = 200, "200 reports in 310 s"),
            (
                |f| {
                    f.churner.tracked.add(Report {
                        drift: Some(1),
                        ..f.churner.tracked.last.clone().unwrap()
                    });
                    f.churner.tracked.add(Report {
                        drift: Some(1),
                        ..f.churner.tracked.last.clone().unwrap()
                    });
                },
                "2 reports running",
            ),
        ];
        for (breaking, want) in cases {
            let mut f = good();
            breaking(&mut f);
            let v = verdict(&f);
            assert_eq!(v.len(), 1, "{want}: {v:?}");
            assert!(v[0].contains(want), "{want}: {v:?}");
        }
        let mut f = good();
        f.leaker.tracked = Tracked::default();
        f.leaker.tracked.reports = 300;
        let v = verdict(&f);
        assert!(v.iter().any(|m| m.contains("never ran")), "{v:?}");
        assert!(v.iter().any(|m| m.contains("never reported")), "{v:?}");
    }

    #[test]
    fn pacer_makes_up_late_ticks_but_not_a_long_stall() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut p = Pacer::new(t0);
        assert_eq!(p.take(ms(100)), (500, 0));
        assert_eq!(p.take(ms(100)), (0, 0));
        // A late tick: made up.
        assert_eq!(p.take(ms(400)), (1500, 0));
        // A stall of 2.6 s: one second's worth, the rest given up.
        assert_eq!(p.take(ms(3000)), (CHURN_RATE, 3));
        assert_eq!(p.skipped, 8000);
        assert_eq!(p.take(ms(3100)), (500, 0));
        assert_eq!(p.take(ms(3999)), (4495, 0));
        assert_eq!(p.take(ms(4000)), (5, 1));
    }
}
