//! `cargo xtask bench --node`: what watching a whole node costs.
//!
//! A synthetic node of [`NODE_PROCS`] `fdloop node` processes (most idle
//! with 20-200 fds, some churning, a few leaking) is watched for a minute by
//! Debian's process-exporter, scraped once a second with every process
//! grouped by name, and by `fdtrace --all`: the CPU and memory of each
//! watcher's process, how soon each leaker shows (a `leak` finding from
//! fdtrace; process-exporter has no leak notion, so the first scrape whose
//! count grew), and whether every count matches /proc once the node is
//! still. Then the tax of whole-node tracing on nginx and on a fork+exec
//! loop ([`super::tax`]) and the heavier bpftrace tracker's program time
//! ([`super::progtime::node_measure`]).

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use super::child::{Proc, check_interrupted};
use super::extras::{count_fds, cpu_time, rss_kib};
use super::{ATTACH_TIMEOUT, Bins, STOP_GRACE};
use crate::soak::Monitor;

/// Processes of the synthetic node.
pub const NODE_PROCS: usize = 300;
/// Of which churners and leakers; the rest are idle.
const CHURNERS: usize = 16;
const LEAKERS: usize = 4;
/// fd operations a second of a churner (opens + closes).
const CHURN_OPS: u64 = 1000;
/// fds a second a leaker opens and never closes.
pub const LEAK_RATE: u64 = 5;
/// The fds an idle process holds range over these.
const IDLE_FDS: (u64, u64) = (20, 200);
/// Idle processes share this many names (process-exporter groups by name).
const IDLE_NAMES: usize = 20;
/// How long each watcher is measured, and with --quick.
const WINDOW: Duration = Duration::from_secs(60);
const QUICK_WINDOW: Duration = Duration::from_secs(20);
/// After a watcher's first sample, before its CPU is counted: its start
/// (fdtrace's walk of every table, process-exporter's first full read) is
/// reported apart.
const WARMUP: Duration = Duration::from_secs(3);
/// The first leaker starts this far into the window; the last one this long
/// before its end, so that it has time to be found.
const FIRST_LEAK_AT: Duration = Duration::from_secs(5);
const LAST_LEAK_BEFORE_END: Duration = Duration::from_secs(12);
/// Once the node is still, samples before the counts are compared: the
/// first may predate the last operations.
const SETTLE: Duration = Duration::from_secs(3);
/// The goals (issue 11 section 4).
pub const GOAL_CORE_PCT: f64 = 1.0;
pub const GOAL_SHARE_OF_PE: f64 = 0.25;
pub const GOAL_LEAK_FOUND: Duration = Duration::from_secs(10);
/// How long a reply of a node process may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a synthetic process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Idle,
    Churn,
    Leak,
}

impl Kind {
    fn arg(self) -> &'static str {
        match self {
            Kind::Idle => "idle",
            Kind::Churn => "churn",
            Kind::Leak => "leak",
        }
    }
}

/// One process of the plan: `fdloop node KIND NAME N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub kind: Kind,
    pub name: String,
    pub n: u64,
}

/// The idle and churning processes (leakers are made per watcher by
/// [`leakers`]). Idle fd counts spread evenly over [`IDLE_FDS`].
pub fn plan(idle: usize, churners: usize) -> Vec<Member> {
    let (lo, hi) = IDLE_FDS;
    let mut out = Vec::new();
    for i in 0..idle {
        let n = match idle {
            1 => lo,
            _ => lo + (hi - lo) * i as u64 / (idle as u64 - 1),
        };
        out.push(Member {
            kind: Kind::Idle,
            name: format!("fdn-idle-{}", i % IDLE_NAMES),
            n,
        });
    }
    for _ in 0..churners {
        out.push(Member {
            kind: Kind::Churn,
            name: "fdn-churn".into(),
            n: CHURN_OPS,
        });
    }
    out
}

/// The leakers, each with a name of its own (its own process-exporter group).
pub fn leakers(n: usize) -> Vec<Member> {
    (1..=n)
        .map(|k| Member {
            kind: Kind::Leak,
            name: format!("fdn-leak-{k}"),
            n: LEAK_RATE,
        })
        .collect()
}

/// When each of `n` leakers starts, spread from [`FIRST_LEAK_AT`] to
/// [`LAST_LEAK_BEFORE_END`] before the end of `window`.
pub fn leak_starts(n: usize, window: Duration) -> Vec<Duration> {
    let last = window
        .saturating_sub(LAST_LEAK_BEFORE_END)
        .max(FIRST_LEAK_AT);
    let span = last - FIRST_LEAK_AT;
    (0..n)
        .map(|k| match n {
            1 => FIRST_LEAK_AT,
            _ => FIRST_LEAK_AT + span * k as u32 / (n as u32 - 1),
        })
        .collect()
}

/// A running `fdloop node` process.
pub struct NodeProc {
    pub member: Member,
    pub proc: Proc,
    /// When it was last switched on (leakers), wall clock and monotonic.
    pub started: Option<(SystemTime, Instant)>,
    /// Its /proc/PID/fd count right before that.
    pub base: u64,
}

impl NodeProc {
    pub fn spawn(bins: &Bins, member: Member) -> Result<NodeProc> {
        let mut proc = Proc::spawn(
            &format!("fdloop node {}", member.name),
            Command::new(&bins.fdloop)
                .args(["node", member.kind.arg(), &member.name])
                .arg(member.n.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )?;
        let ready = proc
            .stdout()?
            .wait_for(REPLY_TIMEOUT, |l| l.starts_with("fdloop node "));
        ready.map_err(|e| proc.fail(format!("never said it was ready: {e:#}")))?;
        Ok(NodeProc {
            member,
            proc,
            started: None,
            base: 0,
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Toggles its activity and waits for its reply.
    pub fn toggle(&mut self) -> Result<()> {
        self.proc.poke()?;
        let reply = self
            .proc
            .stdout()?
            .wait_for(REPLY_TIMEOUT, |l| l.starts_with("fdloop node "));
        reply.map_err(|e| self.proc.fail(format!("no reply: {e:#}")))?;
        Ok(())
    }

    /// Switches a paused leaker on, noting when and from what count.
    fn start(&mut self) -> Result<()> {
        self.base = count_fds(self.pid())?;
        self.started = Some((SystemTime::now(), Instant::now()));
        self.toggle()
    }
}

/// The synthetic node: idle processes and churners, started and ready.
pub fn start_node(bins: &Bins) -> Result<Vec<NodeProc>> {
    let members = plan(NODE_PROCS - CHURNERS - LEAKERS, CHURNERS);
    eprintln!(
        "bench: node: starting {} idle processes and {CHURNERS} churners ({CHURN_OPS} fd ops/s each)",
        members.len() - CHURNERS
    );
    let mut out = Vec::with_capacity(members.len());
    for m in members {
        check_interrupted()?;
        out.push(NodeProc::spawn(bins, m)?);
    }
    Ok(out)
}

/// A watcher's figures over the window.
#[derive(Debug, Default)]
pub struct Watched {
    /// CPU of its process from its start to the window's start.
    pub start_cpu: Duration,
    pub cpu: Duration,
    pub wall: Duration,
    /// Highest VmRSS sampled.
    pub rss_kib: u64,
    /// Per leaker: its name, and when it showed after its start.
    pub leaks: Vec<(String, Option<Duration>)>,
    /// Processes whose count was compared with /proc at the end.
    pub compared: usize,
    pub mismatches: Vec<String>,
    /// fdtrace's drift checks over the window (None for process-exporter).
    pub drift: Option<Drift>,
    /// Other facts worth a line (scrapes that failed, losses, ...).
    pub notes: Vec<String>,
}

/// What the `drift` field of fdtrace's process objects said.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Drift {
    pub processes: usize,
    pub reports: u64,
    /// Reports whose drift was measured (0 or not).
    pub measured: u64,
    pub nonzero: u64,
    /// Processes with a non-zero drift in two reports running or more, as
    /// "PID (N running)".
    pub runs: Vec<String>,
}

impl Drift {
    fn of(mon: &Monitor) -> Drift {
        let t = mon.procs.values();
        Drift {
            processes: mon.procs.len(),
            reports: t.clone().map(|t| t.reports).sum(),
            measured: t.clone().map(|t| t.drift_measured).sum(),
            nonzero: t.map(|t| t.drift_nonzero).sum(),
            runs: mon
                .procs
                .iter()
                .filter(|(_, t)| t.longest_nonzero_run >= 2)
                .map(|(p, t)| format!("{p} ({} running)", t.longest_nonzero_run))
                .collect(),
        }
    }
}

/// One watcher: either measured, or why it could not run.
pub type WatchResult = std::result::Result<Watched, String>;

/// Both watchers over the same node, in one round.
pub struct Round {
    pub process_exporter: WatchResult,
    /// `fdtrace --all` as production runs it (with `--metrics` scraped
    /// when the binary has it).
    pub fdtrace: WatchResult,
    /// The same without `--metrics` (None when the binary has no such
    /// option): the difference is what serving and scraping cost.
    pub fdtrace_plain: Option<WatchResult>,
}

/// Every round over the same node.
pub struct NodeFigures {
    pub window: Duration,
    pub procs: usize,
    pub rounds: Vec<Round>,
    /// The exact fdtrace command line.
    pub fdtrace_cmd: String,
    /// Processes on the host when the watching began (both watch them all).
    pub host_procs: usize,
}

/// Rounds of the node watch by default, and with --quick: each is three
/// windows (process-exporter, fdtrace, fdtrace without --metrics).
pub const ROUNDS: u32 = 3;
pub const QUICK_ROUNDS: u32 = 1;

/// Watches the node `rounds` times with process-exporter and with
/// fdtrace, side by side: the order alternates from round to round, so
/// that a load that drifts over the run weighs on both alike.
pub fn watch_node(
    bins: &Bins,
    node: &mut [NodeProc],
    quick: bool,
    rounds: u32,
) -> Result<NodeFigures> {
    let window = if quick { QUICK_WINDOW } else { WINDOW };
    let host_procs = host_procs()? + LEAKERS;
    let args = fdtrace_all_args(bins);
    let fdtrace_cmd = format!("fdtrace {}", args.join(" "));
    let plain_args: Option<Vec<String>> = args_metrics(&fdtrace_cmd).map(|i| {
        args.iter()
            .enumerate()
            .filter(|&(j, _)| j != i && j != i + 1)
            .map(|(_, a)| a.clone())
            .collect()
    });
    let mut out = Vec::new();
    for r in 0..rounds {
        let watch_pe = |node: &mut [NodeProc]| -> Result<WatchResult> {
            eprintln!(
                "bench: node: round {}/{rounds}: process-exporter watches for {window:?}",
                r + 1
            );
            watch_process_exporter(bins, node, window)
        };
        let watch_ft = |node: &mut [NodeProc]| -> Result<(WatchResult, Option<WatchResult>)> {
            eprintln!(
                "bench: node: round {}/{rounds}: `{fdtrace_cmd}` watches for {window:?}",
                r + 1
            );
            let with = watch_fdtrace(bins, node, window, &args)?;
            let plain = match &plain_args {
                Some(plain) if with.is_ok() => {
                    eprintln!(
                        "bench: node: round {}/{rounds}: `fdtrace {}` (no --metrics) watches \
                         for {window:?}",
                        r + 1,
                        plain.join(" ")
                    );
                    Some(watch_fdtrace(bins, node, window, plain)?)
                }
                _ => None,
            };
            Ok((with, plain))
        };
        let (process_exporter, (fdtrace, fdtrace_plain)) = if r % 2 == 0 {
            let pe = watch_pe(node)?;
            (pe, watch_ft(node)?)
        } else {
            let ft = watch_ft(node)?;
            (watch_pe(node)?, ft)
        };
        out.push(Round {
            process_exporter,
            fdtrace,
            fdtrace_plain,
        });
    }
    Ok(NodeFigures {
        window,
        procs: node.len() + LEAKERS,
        rounds: out,
        fdtrace_cmd,
        host_procs,
    })
}

/// Processes on the host now (the numeric entries of /proc).
fn host_procs() -> Result<usize> {
    let dir = std::fs::read_dir("/proc").context("reading /proc")?;
    Ok(dir
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .count())
}

/// `--all --json --interval 1s`, and `--metrics 127.0.0.1:PORT` when this
/// fdtrace has that option (its scrape cost counts then, as in production).
fn fdtrace_all_args(bins: &Bins) -> Vec<String> {
    let mut args: Vec<String> = ["--all", "--json", "--interval", "1s"]
        .map(String::from)
        .into();
    let help = Command::new(&bins.fdtrace)
        .arg("--help")
        .stdin(Stdio::null())
        .output();
    let has_metrics = help.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--metrics"));
    if has_metrics && let Ok(port) = free_port() {
        args.push("--metrics".into());
        args.push(format!("127.0.0.1:{port}"));
    }
    args
}

/// The index of `--metrics` among the arguments of `fdtrace ARGS...`.
fn args_metrics(cmd: &str) -> Option<usize> {
    cmd.split_whitespace()
        .skip(1)
        .position(|a| a == "--metrics")
}

/// A loopback port free right now.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// `GET path` over HTTP/1.0 on loopback; the body of a 200 answer.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let timeout = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .with_context(|| format!("reading {addr}{path}"))?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .with_context(|| format!("{addr}{path}: no end of headers"))?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("{addr}{path}: {status}");
    }
    Ok(body.to_owned())
}

/// The value of `metric{...label="value"...} V` in a Prometheus text
/// exposition (None if absent or not a number).
pub fn prom_sample(text: &str, metric: &str, label: &str, value: &str) -> Option<f64> {
    let want = format!("{label}=\"{value}\"");
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(metric)?.strip_prefix('{')?;
        let (labels, v) = rest.split_once('}')?;
        let found = labels.split(',').any(|l| l.trim() == want);
        found.then(|| v.split_whitespace().next()?.parse().ok())?
    })
}

/// The first sample (seconds since the start, count) above `base`.
pub fn first_growth(samples: &[(f64, f64)], base: f64) -> Option<f64> {
    samples
        .iter()
        .find(|(t, v)| *t >= 0.0 && *v > base)
        .map(|(t, _)| *t)
}

/// Pauses `procs` (or resumes them) by toggling each.
fn toggle_all<'a>(procs: impl IntoIterator<Item = &'a mut NodeProc>) -> Result<()> {
    for p in procs {
        p.toggle()?;
    }
    Ok(())
}

fn churners(node: &mut [NodeProc]) -> impl Iterator<Item = &mut NodeProc> {
    node.iter_mut().filter(|p| p.member.kind == Kind::Churn)
}

/// The window's clock: pokes each leaker at its start and calls `tick`
/// about once a second until `window` has passed.
fn run_window(
    leaks: &mut [NodeProc],
    window: Duration,
    mut tick: impl FnMut(&[NodeProc]) -> Result<()>,
) -> Result<()> {
    let starts = leak_starts(leaks.len(), window);
    let t0 = Instant::now();
    let mut next_tick = t0;
    loop {
        check_interrupted()?;
        let el = t0.elapsed();
        for (l, at) in leaks.iter_mut().zip(&starts) {
            if l.started.is_none() && el >= *at {
                l.start()?;
            }
        }
        if el >= window {
            return Ok(());
        }
        if Instant::now() >= next_tick {
            tick(leaks)?;
            next_tick += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Seconds from `t` to `ts` (a Unix time in seconds).
fn since(t: SystemTime, ts: f64) -> f64 {
    let t = t
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    ts - t
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// process-exporter's config: every process (with a command line, so no
/// kernel thread) in a group named by its comm.
const PE_CONFIG: &str = "process_names:\n  - name: \"{{.Comm}}\"\n    cmdline:\n      - '.+'\n";
const PE_FDS_METRIC: &str = "namedprocess_namegroup_open_filedesc";

fn watch_process_exporter(
    bins: &Bins,
    node: &mut [NodeProc],
    window: Duration,
) -> Result<WatchResult> {
    let dir = scratch_dir("process-exporter")?;
    let config = dir.join("config.yml");
    std::fs::write(&config, PE_CONFIG).with_context(|| format!("writing {}", config.display()))?;
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let mut leaks = spawn_leakers(bins)?;
    let mut pe = Proc::spawn(
        "process-exporter",
        Command::new("prometheus-process-exporter")
            .arg("-config.path")
            .arg(&config)
            .args(["-web.listen-address", &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )?;
    let started = Instant::now();
    // Its first scrape reads every process: the start, reported apart.
    loop {
        check_interrupted()?;
        if http_get(addr, "/metrics").is_ok() {
            break;
        }
        if !pe.running()? {
            return Err(pe.fail("exited before its first scrape"));
        }
        if started.elapsed() > ATTACH_TIMEOUT {
            return Err(pe.fail("no scrape answered"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut scrape_errors = Vec::new();
    let mut scrape =
        |samples: &mut BTreeMap<String, Vec<(f64, f64)>>, leaks: &[NodeProc]| match http_get(
            addr, "/metrics",
        ) {
            Ok(text) => {
                for l in leaks {
                    let Some((t, _)) = l.started else { continue };
                    let v = prom_sample(&text, PE_FDS_METRIC, "groupname", &l.member.name);
                    if let Some(v) = v {
                        let key = l.member.name.clone();
                        samples
                            .entry(key)
                            .or_default()
                            .push((since(t, now_unix()), v));
                    }
                }
                Some(text)
            }
            Err(e) => {
                scrape_errors.push(format!("{e:#}"));
                None
            }
        };
    let mut samples = BTreeMap::new();
    std::thread::sleep(WARMUP);
    let start_cpu = cpu_time(pe.pid())?;
    let t0 = Instant::now();
    let mut rss = rss_kib(pe.pid())?;
    run_window(&mut leaks, window, |leaks| {
        scrape(&mut samples, leaks);
        rss = rss.max(rss_kib(pe.pid())?);
        Ok(())
    })?;
    let cpu = cpu_time(pe.pid())?.saturating_sub(start_cpu);
    let wall = t0.elapsed();
    // The node stands still, then one scrape is compared with /proc.
    toggle_all(churners(node).chain(leaks.iter_mut()))?;
    std::thread::sleep(SETTLE);
    let text = scrape(&mut samples, &leaks);
    let mut mismatches = Vec::new();
    let mut compared = 0;
    if let Some(text) = text {
        let mut by_name: BTreeMap<&str, u64> = BTreeMap::new();
        for p in node.iter().chain(&leaks) {
            *by_name.entry(&p.member.name).or_default() += count_fds(p.pid())?;
            compared += 1;
        }
        for (name, want) in by_name {
            match prom_sample(&text, PE_FDS_METRIC, "groupname", name) {
                Some(v) if v == want as f64 => {}
                got => mismatches.push(format!("group {name}: {got:?} against {want} in /proc")),
            }
        }
    } else {
        mismatches.push("the final scrape failed".into());
    }
    toggle_all(churners(node))?;
    if !pe.running()? {
        return Err(pe.fail("exited during the window"));
    }
    pe.stop(STOP_GRACE)?;
    let _ = std::fs::remove_dir_all(&dir);
    let mut notes = Vec::new();
    if !scrape_errors.is_empty() {
        notes.push(format!(
            "{} scrape(s) failed, the first: {}",
            scrape_errors.len(),
            scrape_errors[0]
        ));
    }
    Ok(Ok(Watched {
        start_cpu,
        cpu,
        wall,
        rss_kib: rss,
        leaks: leak_times(&leaks, &samples),
        compared,
        mismatches,
        drift: None,
        notes,
    }))
}

/// Per leaker, the first sample whose count grew past its start figure.
fn leak_times(
    leaks: &[NodeProc],
    samples: &BTreeMap<String, Vec<(f64, f64)>>,
) -> Vec<(String, Option<Duration>)> {
    leaks
        .iter()
        .map(|l| {
            let s = samples.get(&l.member.name).map_or(&[][..], Vec::as_slice);
            let t = first_growth(s, l.base as f64).map(Duration::from_secs_f64);
            (l.member.name.clone(), t)
        })
        .collect()
}

fn spawn_leakers(bins: &Bins) -> Result<Vec<NodeProc>> {
    leakers(LEAKERS)
        .into_iter()
        .map(|m| NodeProc::spawn(bins, m))
        .collect()
}

/// A fresh directory under the temp dir, for one component's files.
pub fn scratch_dir(what: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("fdtrace-bench-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Starts `fdtrace ARGS` and waits for its first JSON line. Ok(Err(why))
/// when it ends first: this fdtrace cannot trace the node (the option is
/// missing, or it fails), said as an explicit line in the report.
pub fn start_fdtrace_all(
    bins: &Bins,
    args: &[String],
) -> Result<std::result::Result<Proc, String>> {
    let mut ft = Proc::spawn(
        "fdtrace --all",
        Command::new(&bins.fdtrace)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    let first = ft
        .stdout()?
        .wait_for(ATTACH_TIMEOUT, |l| l.starts_with('{'));
    match first {
        Ok(_) => Ok(Ok(ft)),
        Err(e) => {
            check_interrupted()?;
            let status = ft.wait(STOP_GRACE).map(|(s, _)| s.to_string());
            // Its whole stderr, up to end of file (the reading thread may
            // not have passed it on yet).
            let tail = match status {
                Ok(_) => ft.stderr()?.rest(STOP_GRACE).unwrap_or_default().join("\n"),
                Err(_) => ft.stderr_tail(),
            };
            let first_err = tail
                .lines()
                .find(|l| l.contains("error"))
                .or(tail.lines().next())
                .unwrap_or("")
                .trim()
                .to_owned();
            let why = match status {
                Ok(s) if s.contains("exit status: 2") && tail.contains("--all") => {
                    format!("fdtrace --all not available: this fdtrace refuses it ({first_err})")
                }
                Ok(s) => format!("fdtrace --all failed: {s} before its first line: {first_err}"),
                Err(_) => format!("fdtrace --all printed no JSON line: {e:#}"),
            };
            Ok(Err(why))
        }
    }
}

fn watch_fdtrace(
    bins: &Bins,
    node: &mut [NodeProc],
    window: Duration,
    args: &[String],
) -> Result<WatchResult> {
    let mut leaks = spawn_leakers(bins)?;
    let mut ft = match start_fdtrace_all(bins, args)? {
        Ok(ft) => ft,
        Err(why) => return Ok(Err(why)),
    };
    let metrics: Option<SocketAddr> = args
        .iter()
        .position(|a| a == "--metrics")
        .and_then(|i| args.get(i + 1)?.parse().ok());
    let mut mon = Monitor::default();
    let mut found: BTreeMap<u32, f64> = BTreeMap::new();
    let (mut scrapes, mut scrape_errors) = (0u64, Vec::new());
    let mut scrape_secs: Vec<f64> = Vec::new();
    let mut drain = |ft: &mut Proc, mon: &mut Monitor| -> Result<()> {
        for line in ft.stdout()?.arrived() {
            mon.feed(&line)?;
            if let Some((pid, ts)) = leak_finding(&line) {
                found.entry(pid).or_insert(ts);
            }
        }
        Ok(())
    };
    std::thread::sleep(WARMUP);
    drain(&mut ft, &mut mon)?;
    let start_cpu = cpu_time(ft.pid())?;
    let t0 = Instant::now();
    let mut rss = rss_kib(ft.pid())?;
    let mut failed = None;
    run_window(&mut leaks, window, |_| {
        if let Err(e) = drain(&mut ft, &mut mon) {
            failed.get_or_insert(e);
        }
        if let Some(addr) = metrics {
            let t = Instant::now();
            match http_get(addr, "/metrics") {
                Ok(_) => {
                    scrapes += 1;
                    scrape_secs.push(t.elapsed().as_secs_f64());
                }
                Err(e) => scrape_errors.push(format!("{e:#}")),
            }
        }
        rss = rss.max(rss_kib(ft.pid())?);
        Ok(())
    })?;
    if let Some(e) = failed {
        return Err(ft.fail(format!("{e:#}")));
    }
    let cpu = cpu_time(ft.pid())?.saturating_sub(start_cpu);
    let wall = t0.elapsed();
    toggle_all(churners(node).chain(leaks.iter_mut()))?;
    drain(&mut ft, &mut mon)?;
    let reports_at_pause: BTreeMap<u32, u64> =
        mon.procs.iter().map(|(&p, t)| (p, t.reports)).collect();
    std::thread::sleep(SETTLE);
    drain(&mut ft, &mut mon)?;
    let mut mismatches = Vec::new();
    let mut compared = 0;
    for p in node.iter().chain(&leaks) {
        let pid = p.pid();
        let want = count_fds(pid)?;
        compared += 1;
        let t = mon.procs.get(&pid);
        let fresh = t.map_or(0, |t| t.reports) - reports_at_pause.get(&pid).copied().unwrap_or(0);
        // An idle table never changed: any report of it compares. One that
        // changed needs a report from after the node stood still (the last
        // report is compared: a report in flight at the pause is followed
        // by another if fdtrace reports changed processes only).
        let need = match p.member.kind {
            Kind::Idle => 0,
            _ => 1,
        };
        match t.and_then(|t| t.last.as_ref()) {
            Some(r) if fresh >= need && r.open_fds == want => {}
            Some(r) if fresh >= need => mismatches.push(format!(
                "pid {pid} ({}): open_fds {} against {want} in /proc",
                p.member.name, r.open_fds
            )),
            Some(_) => mismatches.push(format!(
                "pid {pid} ({}): no report since the node stood still",
                p.member.name
            )),
            None => mismatches.push(format!("pid {pid} ({}): never reported", p.member.name)),
        }
    }
    toggle_all(churners(node))?;
    if !ft.running()? {
        return Err(ft.fail("exited during the window"));
    }
    ft.stop(STOP_GRACE)?;
    let mut notes = Vec::new();
    if mon.lost > 0 || mon.map_full > 0 {
        notes.push(format!("lost={} map_full={}", mon.lost, mon.map_full));
    }
    if metrics.is_some() {
        notes.push(format!(
            "/metrics scraped once a second: {scrapes} answered, {} failed{}",
            scrape_errors.len(),
            scrape_errors
                .first()
                .map_or(String::new(), |e| format!(" (first: {e})"))
        ));
        let max = scrape_secs.iter().copied().fold(0.0, f64::max);
        if let Some(med) = crate::bench::median(&scrape_secs) {
            notes.push(format!(
                "a scrape of /metrics takes {:.2} ms (median; max {:.2} ms)",
                med * 1e3,
                max * 1e3
            ));
        }
    }
    let leaks_found = leaks
        .iter()
        .map(|l| {
            let t = l.started.and_then(|(at, _)| {
                let ts = *found.get(&l.pid())?;
                Some(Duration::from_secs_f64(since(at, ts).max(0.0)))
            });
            (l.member.name.clone(), t)
        })
        .collect();
    Ok(Ok(Watched {
        start_cpu,
        cpu,
        wall,
        rss_kib: rss,
        leaks: leaks_found,
        compared,
        mismatches,
        drift: Some(Drift::of(&mon)),
        notes,
    }))
}

/// (pid, ts) of a `leak` finding line.
pub fn leak_finding(line: &str) -> Option<(u32, f64)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v.get("type")?.as_str()? != "finding" || v.get("finding")?.as_str()? != "leak" {
        return None;
    }
    let pid = u32::try_from(v.get("pid")?.as_u64()?).ok()?;
    Some((pid, v.get("ts")?.as_f64()?))
}

fn pct(cpu: Duration, wall: Duration) -> f64 {
    100.0 * cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9)
}

/// The figures of one watcher over the rounds it ran in.
#[derive(Debug, Default, PartialEq)]
pub struct Summary {
    /// % of a core, per round that ran, and their median.
    pub core_pct: Vec<f64>,
    pub median_pct: Option<f64>,
    pub median_start_s: Option<f64>,
    pub max_rss_kib: u64,
    /// Every leaker's time to show, over all rounds (None: never).
    pub leaks: Vec<Option<Duration>>,
    pub compared: usize,
    pub mismatches: usize,
    /// Rounds that could not run, with why.
    pub failed: Vec<String>,
}

impl Summary {
    pub fn of<'a>(results: impl IntoIterator<Item = &'a WatchResult>) -> Summary {
        let mut s = Summary::default();
        let mut starts = Vec::new();
        for r in results {
            match r {
                Ok(w) => {
                    s.core_pct.push(pct(w.cpu, w.wall));
                    starts.push(w.start_cpu.as_secs_f64());
                    s.max_rss_kib = s.max_rss_kib.max(w.rss_kib);
                    s.leaks.extend(w.leaks.iter().map(|(_, t)| *t));
                    s.compared += w.compared;
                    s.mismatches += w.mismatches.len();
                }
                Err(why) => s.failed.push(why.clone()),
            }
        }
        s.median_pct = crate::bench::median(&s.core_pct);
        s.median_start_s = crate::bench::median(&starts);
        s
    }

    /// The slowest leak shown, if every one was.
    pub fn slowest_leak(&self) -> Option<Duration> {
        if self.leaks.iter().any(Option::is_none) {
            return None;
        }
        self.leaks.iter().flatten().max().copied()
    }

    fn median_leak(&self) -> Option<f64> {
        let shown: Vec<f64> = self
            .leaks
            .iter()
            .flatten()
            .map(Duration::as_secs_f64)
            .collect();
        crate::bench::median(&shown)
    }

    fn line(&self, name: &str) -> String {
        let Some(med) = self.median_pct else {
            return format!("  {name:<24} ERROR: {}", self.failed.join("; "));
        };
        let rounds: Vec<String> = self.core_pct.iter().map(|p| format!("{p:.2}")).collect();
        let never = self.leaks.iter().filter(|t| t.is_none()).count();
        format!(
            "  {name:<24} CPU {med:>5.2}% of a core (median; rounds {}), start {:.2} s; \
             RSS {} MiB; leak shown after {}{}; exact at the end: {}{}",
            rounds.join(" "),
            self.median_start_s.unwrap_or(0.0),
            self.max_rss_kib / 1024,
            self.median_leak()
                .map_or("-".into(), |m| format!("{m:.1} s median")),
            match (self.leaks.iter().flatten().max(), never) {
                (_, n) if n > 0 => format!(", {n} NEVER"),
                (Some(t), _) => format!(", {:.1} s at most", t.as_secs_f64()),
                (None, _) => String::new(),
            },
            if self.mismatches == 0 {
                format!("all {} counts OK", self.compared)
            } else {
                format!("{} MISMATCH(ES) of {}", self.mismatches, self.compared)
            },
            if self.failed.is_empty() {
                String::new()
            } else {
                format!(
                    " ({} round(s) failed: {})",
                    self.failed.len(),
                    self.failed.join("; ")
                )
            }
        )
    }
}

/// The drift checks of every fdtrace window, summed.
fn drift_total<'a>(results: impl IntoIterator<Item = &'a WatchResult>) -> Drift {
    let mut d = Drift::default();
    for w in results.into_iter().flatten() {
        if let Some(x) = &w.drift {
            d.processes = d.processes.max(x.processes);
            d.reports += x.reports;
            d.measured += x.measured;
            d.nonzero += x.nonzero;
            d.runs.extend(x.runs.iter().cloned());
        }
    }
    d
}

/// Whether fdtrace met the goals, from its summary and process-exporter's.
#[derive(Debug, PartialEq)]
pub struct Goals {
    pub core_pct: Option<f64>,
    pub share_of_pe: Option<f64>,
    pub slowest_leak: Option<Duration>,
    pub exact: bool,
    pub drift_bounded: bool,
}

impl Goals {
    pub fn judge(ft: &Summary, pe: &Summary, drift: &Drift) -> Goals {
        Goals {
            core_pct: ft.median_pct,
            share_of_pe: match (ft.median_pct, pe.median_pct) {
                (Some(f), Some(p)) if p > 0.0 => Some(f / p),
                _ => None,
            },
            slowest_leak: ft.slowest_leak(),
            exact: ft.mismatches == 0 && ft.compared > 0 && ft.failed.is_empty(),
            drift_bounded: drift.runs.is_empty() && drift.measured > 0,
        }
    }

    fn line(&self) -> String {
        format!(
            "  goals: fdtrace <= {GOAL_CORE_PCT}% of a core: {} {}; <= {GOAL_SHARE_OF_PE} of \
             process-exporter's CPU: {} {}; every leak found within {} s: {} {}; every count \
             exact: {}; drift never non-zero in two reports running: {}",
            self.core_pct.map_or("-".into(), |c| format!("{c:.2}%")),
            verdict(self.core_pct.is_some_and(|c| c <= GOAL_CORE_PCT)),
            self.share_of_pe.map_or("-".into(), |r| format!("{r:.2}")),
            verdict(self.share_of_pe.is_some_and(|r| r <= GOAL_SHARE_OF_PE)),
            GOAL_LEAK_FOUND.as_secs(),
            self.slowest_leak
                .map_or("some never or none ran".into(), |t| format!(
                    "slowest {:.1} s",
                    t.as_secs_f64()
                )),
            verdict(self.slowest_leak.is_some_and(|t| t <= GOAL_LEAK_FOUND)),
            verdict(self.exact),
            verdict(self.drift_bounded),
        )
    }
}

/// The node section of the report.
pub fn print(f: &NodeFigures) {
    println!();
    println!(
        "=== node: {} processes ({} idle holding {}-{} fds, {CHURNERS} churning {CHURN_OPS} fd \
         ops/s, {LEAKERS} leaking {LEAK_RATE} fds/s from staggered starts), {} round(s), each \
         watcher for {:.0} s a round ===",
        f.procs,
        f.procs - CHURNERS - LEAKERS,
        IDLE_FDS.0,
        IDLE_FDS.1,
        f.rounds.len(),
        f.window.as_secs_f64()
    );
    println!(
        "CPU is utime+stime of the watcher's process over the window (after its start and {} s \
         of warm-up, given apart), as % of one core; the median across rounds (the order of the \
         watchers alternates from round to round); memory the highest VmRSS sampled. fdtrace's \
         in-kernel work is charged to the traced tasks: see the program time below.",
        WARMUP.as_secs()
    );
    println!(
        "Both watch the whole host: {} processes with the node's (kernel threads included).",
        f.host_procs
    );
    let pe = Summary::of(f.rounds.iter().map(|r| &r.process_exporter));
    let ft = Summary::of(f.rounds.iter().map(|r| &r.fdtrace));
    println!("{}", pe.line("process-exporter"));
    println!(
        "  {:<24} (grouping by comm, scraped once a second; a leaker's time is the first scrape \
         whose count grew: it has no leak notion)",
        ""
    );
    println!("{}", ft.line("fdtrace"));
    println!(
        "  {:<24} (`{}`; a leaker's time is its first `leak` finding)",
        "", f.fdtrace_cmd
    );
    let plain: Vec<&WatchResult> = f
        .rounds
        .iter()
        .filter_map(|r| r.fdtrace_plain.as_ref())
        .collect();
    if !plain.is_empty() {
        let without = Summary::of(plain.iter().copied());
        println!("{}", without.line("fdtrace, no --metrics"));
        if let (Some(a), Some(b)) = (ft.median_pct, without.median_pct) {
            println!(
                "  {:<24} --metrics scraped every second: {a:.2}% of a core against {b:.2}% \
                 without, {:+.2}% ({}: goal under 0.5%)",
                "",
                a - b,
                verdict(a - b < 0.5)
            );
        }
    }
    let drift = drift_total(
        f.rounds
            .iter()
            .flat_map(|r| std::iter::once(&r.fdtrace).chain(r.fdtrace_plain.as_ref())),
    );
    println!(
        "  {:<24} drift checks: {} processes, {} process reports: {} measured ({} non-zero), \
         {} null (too busy to compare); non-zero in two \
         reports running: {}",
        "",
        drift.processes,
        drift.reports,
        drift.measured,
        drift.nonzero,
        drift.reports - drift.measured,
        if drift.runs.is_empty() {
            "none".to_string()
        } else {
            drift.runs.join(", ")
        }
    );
    for (i, r) in f.rounds.iter().enumerate() {
        let all = [
            ("process-exporter", Some(&r.process_exporter)),
            ("fdtrace", Some(&r.fdtrace)),
            ("fdtrace, no --metrics", r.fdtrace_plain.as_ref()),
        ];
        for (name, w) in all {
            let Some(Ok(w)) = w else { continue };
            for m in w.mismatches.iter().take(10) {
                println!("  round {} {name}: mismatch: {m}", i + 1);
            }
            for n in &w.notes {
                println!("  round {} {name}: {n}", i + 1);
            }
        }
    }
    println!("{}", Goals::judge(&ft, &pe, &drift).line());
}

pub fn verdict(ok: bool) -> &'static str {
    if ok { "MET" } else { "NOT MET" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_spreads_idle_fds_and_names() {
        let p = plan(280, 16);
        assert_eq!(p.len(), 296);
        let idle: Vec<&Member> = p.iter().filter(|m| m.kind == Kind::Idle).collect();
        assert_eq!(idle.len(), 280);
        assert_eq!(idle[0].n, 20);
        assert_eq!(idle[279].n, 200);
        assert!(idle.iter().all(|m| (20..=200).contains(&m.n)));
        assert!(p.iter().all(|m| m.name.len() <= 15));
        assert_eq!(p.iter().filter(|m| m.kind == Kind::Churn).count(), 16);
        let l = leakers(4);
        assert_eq!(l[3].name, "fdn-leak-4");
        assert!(l.iter().all(|m| m.kind == Kind::Leak && m.n == LEAK_RATE));
    }

    #[test]
    fn leak_starts_spread_over_the_window() {
        let s = leak_starts(4, Duration::from_secs(60));
        assert_eq!(s[0], Duration::from_secs(5));
        assert_eq!(s[3], Duration::from_secs(48));
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        // A window too short for the spread starts them all at once.
        assert_eq!(
            leak_starts(2, Duration::from_secs(10)),
            vec![FIRST_LEAK_AT; 2]
        );
        assert_eq!(leak_starts(1, Duration::from_secs(60)), vec![FIRST_LEAK_AT]);
    }

    #[test]
    fn reads_prometheus_samples() {
        let text = "# HELP x\n\
            namedprocess_namegroup_open_filedesc{groupname=\"fdn-leak-1\"} 43\n\
            namedprocess_namegroup_open_filedesc{groupname=\"fdn-leak-10\"} 7\n\
            namedprocess_namegroup_open_filedesc_total{groupname=\"fdn-leak-2\"} 1\n\
            other{a=\"b\",groupname=\"fdn-leak-2\"} 9.5\n";
        let m = PE_FDS_METRIC;
        assert_eq!(prom_sample(text, m, "groupname", "fdn-leak-1"), Some(43.0));
        assert_eq!(prom_sample(text, m, "groupname", "fdn-leak-10"), Some(7.0));
        assert_eq!(prom_sample(text, m, "groupname", "fdn-leak-2"), None);
        assert_eq!(
            prom_sample(text, "other", "groupname", "fdn-leak-2"),
            Some(9.5)
        );
    }

    #[test]
    fn first_growth_ignores_samples_before_the_start() {
        let s = [(-0.5, 30.0), (0.4, 23.0), (1.4, 27.0), (2.4, 33.0)];
        assert_eq!(first_growth(&s, 23.0), Some(1.4));
        assert_eq!(first_growth(&s, 40.0), None);
    }

    fn watched(cpu_s: u64, leaks: &[Option<u64>], mismatches: usize) -> WatchResult {
        Ok(Watched {
            start_cpu: Duration::from_secs(1),
            cpu: Duration::from_secs(cpu_s),
            wall: Duration::from_secs(100),
            rss_kib: 20 * 1024,
            leaks: leaks
                .iter()
                .map(|t| ("l".to_string(), t.map(Duration::from_secs)))
                .collect(),
            compared: 300,
            mismatches: vec!["m".into(); mismatches],
            drift: None,
            notes: Vec::new(),
        })
    }

    #[test]
    fn summaries_take_medians_across_rounds() {
        let rounds = [
            watched(1, &[Some(2), Some(3)], 0),
            watched(5, &[Some(4), Some(1)], 0),
            watched(2, &[Some(9), Some(2)], 0),
        ];
        let s = Summary::of(&rounds);
        assert_eq!(s.core_pct, [1.0, 5.0, 2.0]);
        assert_eq!(s.median_pct, Some(2.0));
        assert_eq!(s.slowest_leak(), Some(Duration::from_secs(9)));
        assert_eq!(s.compared, 900);
        assert_eq!(s.mismatches, 0);
        let failed = [watched(1, &[None, Some(1)], 1), Err("no binary".into())];
        let f = Summary::of(&failed);
        assert_eq!(f.slowest_leak(), None, "a leak never found");
        assert_eq!(f.failed, ["no binary"]);
        assert_eq!(f.mismatches, 1);
    }

    #[test]
    fn goals_are_judged_on_the_medians() {
        let ft = Summary::of(&[watched(1, &[Some(3)], 0), watched(3, &[Some(5)], 0)]);
        let pe = Summary::of(&[watched(10, &[Some(1)], 0)]);
        let drift = Drift {
            processes: 300,
            reports: 600,
            measured: 590,
            nonzero: 1,
            runs: Vec::new(),
        };
        let g = Goals::judge(&ft, &pe, &drift);
        assert_eq!(g.core_pct, Some(2.0));
        assert_eq!(g.share_of_pe, Some(0.2));
        assert_eq!(g.slowest_leak, Some(Duration::from_secs(5)));
        assert!(g.exact && g.drift_bounded);
        let running = Drift {
            runs: vec!["42 (2 running)".into()],
            ..drift
        };
        assert!(!Goals::judge(&ft, &pe, &running).drift_bounded);
        let bad = Summary::of(&[watched(1, &[Some(3)], 2)]);
        assert!(!Goals::judge(&bad, &pe, &drift).exact);
        assert_eq!(
            Goals::judge(&ft, &Summary::default(), &drift).share_of_pe,
            None
        );
    }

    #[test]
    fn reads_leak_findings() {
        let l = r#"{"type":"finding","ts":100.5,"pid":42,"finding":"leak","message":"m"}"#;
        assert_eq!(leak_finding(l), Some((42, 100.5)));
        let c = r#"{"type":"finding","ts":100.5,"pid":42,"finding":"close_wait"}"#;
        assert_eq!(leak_finding(c), None);
        assert_eq!(leak_finding("not json"), None);
    }
}
